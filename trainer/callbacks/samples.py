"""Fixed-latent sample grids: every N iterations and at the end, as PNG and to W&B (rank 0 only)."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from trainer.images import save_grid


class SampleGridCallback(L.Callback):
    def __init__(self, out_dir: str | Path, every: int):
        self.out_dir, self.every = Path(out_dir), every
        self.last_path: Path | None = None

    def _write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        it = int(pl_module.iteration)
        images = pl_module.generate(pl_module.fixed_z)
        self.last_path = save_grid(images, self.out_dir / f"iter_{it:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(self.last_path)], step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = int(pl_module.iteration)
        if pl_module.g_stepped and self.every > 0 and it % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        it = int(pl_module.iteration)
        if self.every <= 0 or it % self.every != 0:
            self._write(trainer, pl_module)
