"""EMA generator: G_ema <- beta * G_ema + (1 - beta) * G after every G step; buffers copied.

beta is a pure function of the G iteration (checkpointed), so resume needs no callback state:
  iteration < start_iter                   -> beta = 0 (G_ema is a copy of G, BigGAN's warm start)
  start_iter <= it < start + rampup_iters  -> beta = decay * (it - start) / rampup_iters
  later                                    -> beta = decay
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
from trainer.bench_profile import phase
from trainer.counters import iteration_of


def ema_beta(iteration: int, decay: float, start_iter: int = 0, rampup_iters: int = 0) -> float:
    if iteration < start_iter:
        return 0.0
    if rampup_iters > 0:
        return decay * min(1.0, (iteration - start_iter) / rampup_iters)
    return decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    ema_p = list(ema.parameters())
    src_p = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
    if beta == 0.0:
        torch._foreach_copy_(ema_p, src_p)
    else:
        torch._foreach_lerp_(ema_p, src_p, 1.0 - beta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class EMACallback(L.Callback):
    def __init__(self, decay: float, start_iter: int = 0, rampup_iters: int = 0):
        self.decay, self.start_iter, self.rampup_iters = decay, start_iter, rampup_iters

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.G_ema is None or not pl_module.g_stepped:
            return
        # `iteration` already counts the step just taken; the schedule uses the step's own index.
        it = iteration_of(pl_module) - 1
        with phase("EMA"):
            ema_update(pl_module.G_ema, pl_module.G, ema_beta(it, self.decay, self.start_iter, self.rampup_iters))
