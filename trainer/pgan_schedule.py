"""Progressive GAN growing schedule: a pure function of the number of real images seen.

Level 0 (the start resolution) is trained for ``stable[0]`` images. Every later level l first fades
in over ``fade[l-1]`` images (alpha rising linearly from 0 to 1), then stabilises for ``stable[l]``
images (alpha 1); the last level stabilises for ever. Because (level, alpha, phase, batch size)
depend on images seen only, and that count is checkpointed, a resume continues the schedule exactly.

The phase of a step is decided by the images seen when the step starts, so a step's whole batch is
one resolution and one batch size; a batch that crosses a boundary finishes in the old phase.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

FADE, STABLE = "fade", "stable"


class ScheduleError(ValueError):
    """Phase lengths, resolutions and batch sizes that do not fit together."""


@dataclass(frozen=True)
class Phase:
    level: int
    alpha: float
    phase: str
    resolution: int
    batch_size: int


def _per(values: Sequence[int], n: int, what: str, resolutions: List[int]) -> List[int]:
    """One value per entry: a single value is used for all of them."""
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ScheduleError(f"pgan.{what} has {len(values)} entries but the resolutions "
                            f"{resolutions} need 1 or {n}" + (" (one per resolution)" if what != "fade_images"
                                                                else " (one per resolution after the first)") + ".")
    return values


class GrowSchedule:
    def __init__(self, resolutions: List[int], fade_images: Sequence[int], stable_images: Sequence[int],
                 batch_sizes: Sequence[int]):
        if not resolutions:
            raise ScheduleError("pgan: no resolutions to grow through.")
        n = len(resolutions)
        self.resolutions = list(resolutions)
        self.fade = _per(fade_images, max(n - 1, 1), "fade_images", self.resolutions)[: n - 1]
        self.stable = _per(stable_images, n, "stable_images", self.resolutions)
        self.batch_sizes = _per(batch_sizes, n, "batch_sizes", self.resolutions)
        if any(v <= 0 for v in self.fade + self.stable + self.batch_sizes):
            raise ScheduleError(f"pgan: phase lengths and batch sizes must be positive, got fade_images "
                                f"{self.fade}, stable_images {self.stable}, batch_sizes {self.batch_sizes}.")
        # images seen when each level starts (its fade-in; level 0 has none)
        self.starts = [0]
        for lv in range(1, n):
            self.starts.append(self.starts[-1] + self.stable[lv - 1] + (self.fade[lv - 2] if lv > 1 else 0))

    def at(self, images_seen: int) -> Phase:
        level = max(lv for lv, s in enumerate(self.starts) if images_seen >= s)
        into = images_seen - self.starts[level]
        if level > 0 and into < self.fade[level - 1]:
            alpha, phase = into / self.fade[level - 1], FADE
        else:
            alpha, phase = 1.0, STABLE
        return Phase(level, alpha, phase, self.resolutions[level], self.batch_sizes[level])

    def batch_at(self, images_seen: int) -> int:
        """The global batch of the step that starts after ``images_seen`` images (the data sampler's view)."""
        return self.at(images_seen).batch_size

    def total_images(self) -> int:
        """Images until the final level has faded in and stabilised once."""
        return self.starts[-1] + (self.fade[-1] if len(self.resolutions) > 1 else 0) + self.stable[-1]


def schedule_from_config(cfg: dict) -> GrowSchedule:
    """The schedule of a run config (plain dict): resolutions pgan.start_resolution .. data.resolution."""
    from models.pgan import level_resolutions

    p = cfg["pgan"]
    final = p["final_resolution"] or cfg["data"]["resolution"]
    try:
        res = level_resolutions(p["start_resolution"], final)
    except ValueError as e:
        raise ScheduleError(f"pgan: {e}") from None
    return GrowSchedule(res, p["fade_images"], p["stable_images"], p["batch_sizes"] or [cfg["data"]["batch_size"]])
