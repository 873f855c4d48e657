"""FID/KID during training: every N iterations (and optionally before the first step).

Rank 0 evaluates G_ema (or G) with the same protocol as `genscale eval` and the same latents each
time, so the values form a curve; the numbers are broadcast so every rank sees the same
`eval/fid` (checkpoint ranking with trainer.checkpoint.monitor=eval/fid stays consistent).
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from trainer.counters import iteration_of, images_of


class PeriodicEvalCallback(L.Callback):
    def __init__(self, cfg: dict, run_dir: str | Path, every: int, at_start: bool = False):
        self.cfg, self.run_dir, self.every, self.at_start = cfg, Path(run_dir), every, at_start
        self.evaluator = None

    def _evaluate(self, trainer, module) -> None:
        from trainer.evaluate import GeneratorEvaluator, pgan_at

        it = iteration_of(module)
        values = torch.zeros(3, dtype=torch.float64, device=module.device)
        if trainer.is_global_zero:
            if self.evaluator is None:
                self.evaluator = GeneratorEvaluator(self.cfg, device=module.device)
            use_ema = self.cfg["eval"]["use_ema"] and module.G_ema is not None
            net = module.G_ema if use_ema else module.G
            if self.cfg["model"]["name"] == "pgan":  # where growth stands, as `genscale eval` of a checkpoint
                net = pgan_at(net, self.cfg, images_of(module)).train(net.training)  # the evaluator restores the flag
            result = self.evaluator(net, self.cfg["eval"]["num_samples"], seed=0, ema=use_ema)
            result.update({"iteration": it, "kimg": images_of(module) / 1000.0, "checkpoint": None})
            with open(self.run_dir / "eval.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
            values = torch.tensor([result["fid"], result["kid_mean"], result["kid_std"]],
                                  dtype=torch.float64, device=module.device)
        values = trainer.strategy.broadcast(values, src=0)
        metrics = {"eval/fid": float(values[0]), "eval/kid": float(values[1]), "eval/kid_std": float(values[2])}
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "iteration": float(it)}, step=it)

    def on_train_start(self, trainer, pl_module):
        if self.at_start and iteration_of(pl_module) == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and pl_module.g_stepped and iteration_of(pl_module) % self.every == 0:
            self._evaluate(trainer, pl_module)
