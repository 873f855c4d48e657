"""Preemption: on SIGUSR1 or SIGTERM, finish the current step, write a checkpoint, requeue, stop.
Ctrl-C (SIGINT) stops the same way, without a requeue; a second Ctrl-C aborts at once, without one.

The handler only sets a flag: the checkpoint is written at the end of a training step, where the
weights, optimiser states and counters agree (a checkpoint written from inside the signal handler
could land between a D update and its counter). All ranks agree on the flag each step (one tiny
all-reduce), because the save is collective. Under SLURM rank 0 then runs `scontrol requeue`;
the requeued job starts with `resume=auto` and continues from the newest complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L
import torch
import torch.distributed as dist
from trainer.counters import iteration_of


class PreemptionCallback(L.Callback):
    def __init__(self, checkpointer, signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT), requeue: bool = True):
        self.checkpointer, self.signals, self.requeue = checkpointer, signals, requeue
        self.received = 0
        self.preempted = False
        self.requeued = False  # the stop was handed to SLURM, which reruns the job
        self._previous = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
            print("genscale: Ctrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again to abort "
                  "without one)", file=sys.stderr, flush=True)
        self.received = signum

    def on_train_start(self, trainer, pl_module):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _agreed(self, pl_module) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return bool(self.received)  # one process: nothing to agree on, no device round trip
        # Several processes must agree at the same step (a signal reaches ranks at different times):
        # one tiny collective and its host read per step, the price of a checkpoint at a step boundary.
        flag = torch.tensor([1.0 if self.received else 0.0], device=pl_module.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.preempted or not self._agreed(pl_module):
            return
        self.preempted = True
        path = self.checkpointer.save(trainer, pl_module)
        # a user's Ctrl-C is not a preemption: nothing to rerun (another rank's signal reads as a preemption)
        job = os.environ.get("SLURM_JOB_ID") if self.received != signal.SIGINT else None
        if trainer.is_global_zero:
            print(f"genscale: signal {self.received or 'on another rank'}: checkpoint {path} written at "
                  f"iteration {iteration_of(pl_module)}" + (f"; requeueing SLURM job {job}" if job and self.requeue else ""),
                  file=sys.stderr, flush=True)
            if job and self.requeue:
                subprocess.run(["scontrol", "requeue", job], check=False)
        self.requeued = bool(job and self.requeue)
        trainer.should_stop = True
