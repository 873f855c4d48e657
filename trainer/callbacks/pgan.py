"""Progressive GAN: a sample grid of each resolution when training leaves it (and logs via W&B).

Written before the first step of the next level, from G_ema at the finished level with alpha 1, at
that level's own resolution (upsampled nearest to the final one, as every grid of the run), so the
run directory keeps one grid per resolution phase: samples/resolutions/res_<R>px_iter_<it>.png.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from trainer.images import save_grid
from trainer.tracking import log_images
from trainer.counters import count_of, images_of, iteration_of


class ResolutionGridCallback(L.Callback):
    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.paths: list = []

    def write(self, trainer, module, level: int) -> None:
        if not trainer.is_global_zero:
            return
        res = module.schedule.resolutions[level]
        it, kimg = iteration_of(module), images_of(module) / 1000.0
        images = module.generate(module.fixed_z, level=level, alpha=1.0)
        path = save_grid(images, self.out_dir / f"res_{res:04d}px_iter_{it:07d}.png")
        self.paths.append(path)
        log_images(trainer, "samples/resolution", [path], [f"{res} px, iteration {it}, {kimg:g} kimg"], kimg, it)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        level = pl_module.schedule.at(images_of(pl_module)).level
        grown = count_of(pl_module, "pgan_level")
        if level != grown:  # the module grows in this step's training_step
            self.write(trainer, pl_module, grown)
