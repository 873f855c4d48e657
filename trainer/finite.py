"""The per-step check that the loss was finite, decided on the device where the optimiser allows it.

A non-finite step must leave the weights and the optimiser's state untouched, and trainer.max_nonfinite
of them in a row stop the run. Deciding that on the host costs one device sync per optimiser phase. A
fused torch optimiser (Adam's default on CUDA) takes the decision as a device flag instead: with
``found_inf`` set (the attribute GradScaler uses) it leaves weights, moments and step count as they
were. So with trainer.finite_check=auto the modules hand it the loss's non-finite flag, count skips and
streaks on the device, and read the streaks only every trainer.log_every iterations.

One difference from the host decision: the host does not know which steps were skipped, so an EMA copy
takes its step after every step, towards the unchanged weights after a skipped one. The GANs' EMA does
that on the host path too; a flow's EMA on the host path skips that step.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses; the run stops, checkpoints are kept."""


def device_check_possible(module, opt) -> bool:
    """Whether ``module``'s step with optimiser ``opt`` can decide the skip on the device: finite_check
    auto, a fused optimiser, no loss scaler (GradScaler sets found_inf itself), no DeepSpeed engine
    (it decides on the host) and one rank (the ranks must agree before anyone steps)."""
    inner = getattr(opt, "optimizer", opt)
    if module.cfg["trainer"].get("finite_check", "auto") != "auto" or getattr(module, "_scalers", None):
        return False
    if not getattr(inner, "_step_supports_amp_scaling", False) or not all(g.get("fused") for g in inner.param_groups):
        return False
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return True
    return (trainer.world_size == 1 and getattr(trainer.precision_plugin, "scaler", None) is None
            and getattr(trainer.strategy, "engine_step", None) is None)


def flag_step(module, opt, name: str, loss: torch.Tensor) -> None:
    """Hands the fused optimiser ``opt`` the loss's non-finite flag for its next step (it then skips
    itself: weights, moments and step count untouched) and counts the step on the device: ``module``'s
    skip counter and its streak for network ``name``. ``clear_skip_flag`` after that step."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32)
    getattr(opt, "optimizer", opt).found_inf = bad
    module._device_streaks.add(name, bad)
    module.add_count_device("nonfinite_total", bad)


def clear_skip_flag(opt) -> None:
    getattr(opt, "optimizer", opt).__dict__.pop("found_inf", None)


class DeviceStreaks:
    """Consecutive non-finite steps per network, counted on the device; read on demand."""

    def __init__(self):
        self.streaks: Dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.streaks)

    def add(self, name: str, bad: torch.Tensor) -> None:
        streak = self.streaks.get(name)
        self.streaks[name] = bad if streak is None else (streak + 1.0) * bad

    def longest(self) -> Optional[Tuple[str, int]]:
        """(network, streak) of the longest current streak: one host read of all of them."""
        if not self.streaks:
            return None
        names = list(self.streaks)
        values = torch.stack([self.streaks[n] for n in names]).tolist()
        k = max(range(len(names)), key=lambda i: values[i])
        return names[k], int(values[k])


def check_streaks(module, unit: str, advice: str) -> None:
    """Stops the run (NonFiniteLossError) when one of ``module``'s device-side streaks has reached
    trainer.max_nonfinite. Called every trainer.log_every iterations (``unit``: what the module counts),
    so the stop comes at most that many late; the skipped steps left the weights untouched."""
    longest = module._device_streaks.longest()
    if longest is not None and longest[1] >= module.cfg["trainer"]["max_nonfinite"]:
        raise NonFiniteLossError(
            f"The {longest[0]} loss was non-finite for the last {longest[1]} consecutive steps, found at {unit} "
            f"{module.it} ({module.count('nonfinite_total')} skipped in all; with a fused optimiser the check runs "
            f"every trainer.log_every {unit}s). {advice}")
