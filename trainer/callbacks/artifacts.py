"""Checkpoints as W&B model artifacts (online runs only), after the checkpoint callback has written them."""
from __future__ import annotations

import lightning as L

from trainer.tracking import wandb_loggers
from trainer.counters import iteration_of, images_of


class CheckpointArtifacts(L.Callback):
    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self._logged = None

    def _maybe_log(self, trainer, pl_module) -> None:
        path = self.checkpointer.last_path
        if path is None or path == self._logged or not trainer.is_global_zero:
            return
        self._logged = path
        for lg in wandb_loggers(trainer):
            lg.log_checkpoint(path, iteration_of(pl_module), images_of(pl_module) / 1000.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe_log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._maybe_log(trainer, pl_module)
