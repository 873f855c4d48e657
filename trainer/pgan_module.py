"""PGANModule: GANModule with Progressive GAN's growing schedule.

At the start of every D step the schedule (trainer/pgan_schedule.py) gives (level, alpha) from the
images seen, a checkpointed counter. G and D are called at that level and alpha; the real batch,
which arrives at data.resolution, is box-downsampled on the device to the level's resolution and,
during a fade-in, blended with its own 2x-down-then-up version exactly as G's output is blended
with its upsampled old path (otherwise D could tell reals from fakes by their sharpness alone).
When a layer is added, both optimisers' states are reset (pgan.reset_optimizer), as in the paper.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.gan_module import GANModule
from trainer.pgan_schedule import FADE, Phase, schedule_from_config


def fade_reals(x: torch.Tensor, resolution: int, alpha: float) -> torch.Tensor:
    """Reals at ``resolution`` (2x2-average pooled from theirs) and, for alpha < 1, blended with their
    own half-resolution version upsampled (nearest), like G's fade-in output."""
    if x.shape[-1] != resolution:
        x = F.avg_pool2d(x, x.shape[-1] // resolution)
    if alpha >= 1.0:
        return x
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    return low + alpha * (x - low)


class PGANModule(GANModule):
    # pgan_level: the level whose layers the optimisers have seen; a new level resets them (exact on resume)
    COUNTERS = GANModule.COUNTERS + ("pgan_level",)

    def __init__(self, G: nn.Module, D: nn.Module, cfg: dict, z_dim: int):
        super().__init__(G, D, cfg, z_dim)
        self.schedule = schedule_from_config(cfg)
        self.phase: Phase = self.schedule.at(0)
        self.grown_from: Optional[int] = None  # set for one step when the level changes (the grid callback)
        self._alpha: Optional[tuple] = None  # (alpha, the same as a device tensor): net_args' cache

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """After weights and counters are loaded (resume, sample, eval), the phase follows the restored
        images seen; without this a checkpoint would be sampled at the first level (4 px)."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.phase = self.schedule.at(int(self.images_seen))
        return out

    def compile_networks(self, mode: str) -> None:
        """G and D (and the gradient penalty through D) take the level (it drives their Python loops) and
        the fade-in branch, so torch.compile traces one graph per (level, fading) pair; dynamo's default
        of 8 per function would send the later levels back to eager without a word. Room for every
        pair, both directions."""
        if mode != "off":
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(self.schedule.resolutions))
        super().compile_networks(mode)

    @property
    def final_resolution(self) -> int:
        return self.schedule.resolutions[-1]

    def _enter_phase(self, batch: int) -> None:
        p = self.schedule.at(self.seen)
        if batch != p.batch_size:  # would mean the data and the schedule disagree: never train on it
            raise RuntimeError(f"PGAN: a batch of {batch} images arrived at {self.seen} images seen, "
                               f"where the schedule wants {p.batch_size} ({p.resolution} px).")
        self.grown_from = None
        if p.level != self.count("pgan_level"):
            self.grown_from = self.count("pgan_level")
            if self.cfg["pgan"]["reset_optimizer"]:
                for opt in self.optimizers(use_pl_optimizer=False):
                    opt.state.clear()  # Adam moments of the old layers no longer fit the new network
            self.set_count("pgan_level", p.level)
        self.phase = p

    def training_step(self, batch, batch_idx):
        self._enter_phase(batch[0].shape[0] * self.trainer.world_size)
        return super().training_step(batch, batch_idx)

    def effective_batch(self) -> int:
        return self.phase.batch_size

    def _prep(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return fade_reals(super()._prep(images, gen), self.phase.resolution, self.phase.alpha)

    def net_args(self) -> tuple:
        """(level, alpha) of the step. While a block fades in, alpha goes in as a 0-dim tensor on the
        device, so torch.compile keeps one graph per (level, fade). As a float (measured on CPU with
        inductor) the penalty recompiled at every fade-in step and G at every step of the second
        fade-in, until dynamo's limit sent them back to eager (tests/unit/test_graph_breaks.py)."""
        p = self.phase
        if p.phase != FADE:
            return (p.level,)  # alpha: the networks' default 1.0, a constant to torch.compile
        if self._alpha is None or self._alpha[0] != p.alpha or self._alpha[1].device != self.device:
            self._alpha = (p.alpha, torch.full((), p.alpha, device=self.device))  # once per step, not per call
        return p.level, self._alpha[1]

    def _d_real_fake(self, r, fake, y_real, y_fake):
        # Two D calls: the minibatch-stddev groups must not mix reals and fakes (D has no BN buffers).
        return self._d(r, None).float(), self._d(fake.to(r.dtype), None).float()

    def d_step(self, real, gen, opt, labels=None) -> dict:
        stats = super().d_step(real, gen, opt, labels)
        p = self.phase
        stats.update({"pgan/resolution": float(p.resolution), "pgan/alpha": float(p.alpha),
                      "pgan/level": float(p.level), "pgan/fade": float(p.phase == FADE)})
        return stats

    @torch.no_grad()
    def generate(self, z: torch.Tensor, use_ema: bool = True, y: Optional[torch.Tensor] = None,
                 level: Optional[int] = None, alpha: Optional[float] = None) -> torch.Tensor:
        """Images at the current level and alpha (or those given), upsampled (nearest) to the final
        resolution so grids and evaluations always have one size."""
        net = self.G_ema if (use_ema and self.G_ema is not None) else self.G
        level = self.phase.level if level is None else level
        alpha = self.phase.alpha if alpha is None else alpha
        was_training = net.training
        net.eval()
        out = net(z.to(self.device), level, alpha)
        net.train(was_training)
        if out.shape[-1] != self.final_resolution:
            out = F.interpolate(out, size=self.final_resolution, mode="nearest")
        return out.float().clamp(-1, 1)
