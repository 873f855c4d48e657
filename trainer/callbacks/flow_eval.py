"""Held-out bits/dim of a flow during training: every N iterations (and optionally before the first
step), with the protocol of `genscale eval` on a flow checkpoint (the first eval.num_samples val
images, dequantisation seed 0, the EMA flow when kept and eval.use_ema). Rank 0 evaluates; the value
is broadcast so every rank sees the same `eval/bpd` (checkpoint ranking stays consistent)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from trainer.counters import iteration_of, images_of


class FlowEvalCallback(L.Callback):
    def __init__(self, cfg: dict, run_dir: str | Path, every: int, at_start: bool = False):
        self.cfg, self.run_dir, self.every, self.at_start = cfg, Path(run_dir), every, at_start
        self.val = None
        self._start_done = False

    def _evaluate(self, trainer, module) -> None:
        from trainer.evaluate import _run_data

        it = iteration_of(module)
        value = torch.zeros((), dtype=torch.float64, device=module.device)
        if trainer.is_global_zero:
            if self.val is None:
                self.val = _run_data(self.cfg, "val")
            n = min(self.cfg["eval"]["num_samples"], len(self.val))
            ema = bool(self.cfg["eval"]["use_ema"] and module.glow_ema is not None)
            t0 = time.perf_counter()
            bpd = module.evaluate_bpd(self.val.images[:n], self.val.labels[:n], use_ema=ema, seed=0)
            result = {"bpd": bpd, "protocol": {"n_bits": module.n_bits, "split": "val", "num_images": n,
                                               "ema": ema, "dequantisation_seed": 0},
                      "iteration": it, "kimg": images_of(module) / 1000.0, "checkpoint": None,
                      "seconds": round(time.perf_counter() - t0, 3)}
            with open(self.run_dir / "eval.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
            value = torch.tensor(bpd, dtype=torch.float64, device=module.device)
        value = trainer.strategy.broadcast(value, src=0)
        trainer.callback_metrics["eval/bpd"] = torch.tensor(float(value))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"eval/bpd": float(value), "iteration": float(it)}, step=it)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # eval.at_start: before the first step, but after ActNorm's data-dependent init on its batch (the
        # identity ActNorm of a fresh flow is a state training never uses)
        if self.at_start and iteration_of(pl_module) == 0 and not self._start_done:
            self._start_done = True
            pl_module.init_from_batch(batch)
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and iteration_of(pl_module) % self.every == 0:
            self._evaluate(trainer, pl_module)
