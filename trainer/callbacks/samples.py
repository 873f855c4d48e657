"""Fixed-latent sample grids: every N iterations and at the end, as PNG and to W&B (rank 0 only).

GANs: from G_ema (when kept) at the fixed latents. Flows: the same, at flow.sample_temperature, and,
when ``temperatures`` are given, one more grid per temperature from the same noise (samples/temperatures/),
since a flow's samples are judged across temperatures."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L

from trainer.images import save_grid
from trainer.tracking import log_images
from trainer.counters import iteration_of, images_of


class SampleGridCallback(L.Callback):
    def __init__(self, out_dir: str | Path, every: int, temperatures: Sequence[float] = ()):
        self.out_dir, self.every = Path(out_dir), every
        self.temperatures = [float(t) for t in temperatures]
        self.last_path: Path | None = None

    def _write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        it = iteration_of(pl_module)
        kimg = images_of(pl_module) / 1000.0
        images = pl_module.generate(pl_module.fixed_z)
        self.last_path = save_grid(images, self.out_dir / f"iter_{it:07d}.png")
        log_images(trainer, "samples", [self.last_path], [f"iteration {it}, {kimg:g} kimg"], kimg, it)
        if self.temperatures and hasattr(pl_module, "sample_images"):
            paths = [self._flow_grid(pl_module, t, it) for t in self.temperatures]
            log_images(trainer, "samples/temperatures", paths, [f"T={t:g}" for t in self.temperatures], kimg, it)

    def _flow_grid(self, module, temperature: float, it: int) -> Path:
        x = module.sample_images(len(module.fixed_z), temperature, eps=module.fixed_z.to(module.device))
        return save_grid(x, self.out_dir / "temperatures" / f"iter_{it:07d}_T{temperature:g}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = iteration_of(pl_module)
        if pl_module.g_stepped and self.every > 0 and it % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        it = iteration_of(pl_module)
        if self.every <= 0 or it % self.every != 0:
            self._write(trainer, pl_module)
