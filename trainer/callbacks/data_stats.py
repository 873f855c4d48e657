"""Logs ``data/skipped``: unreadable samples the shard reader skipped, summed over ranks."""
from __future__ import annotations

import lightning as L
import torch
from trainer.counters import images_of, iteration_of


class DataSkippedCallback(L.Callback):
    def __init__(self, every: int):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped") or not getattr(pl_module, "g_stepped", False):
            return
        it = iteration_of(pl_module)
        if it % self.every and it != 1:
            return
        # Collective (every rank reaches it at the same iteration), then logged by rank 0.
        total = trainer.strategy.reduce(torch.tensor(float(dm.skipped), device=pl_module.device), reduce_op="sum")
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                # keyed like the modules' rows, so metrics.csv and the report place it by iteration and kimg
                lg.log_metrics({"data/skipped": float(total), "iteration": float(it),
                                "progress/kimg": images_of(pl_module) / 1000.0}, step=it)
