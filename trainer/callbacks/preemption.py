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
            if self.received:
                raise KeyboardInterrupt  # Ctrl-C after a stop was asked for: the user wants out now
            # os.write, not print: a handler that interrupts a print to stderr must not print itself
            os.write(2, b"genscale: Ctrl-C: stopping at the end of this step with a checkpoint "
                        b"(Ctrl-C again to abort without one)\n")
        self.received = self.received or signum  # the first signal decides (a preemption requeues)

    def _kind(self) -> int:
        """0: no signal; 1: Ctrl-C (stop); 2: a preemption signal (stop and requeue under SLURM)."""
        return 0 if not self.received else (1 if self.received == signal.SIGINT else 2)

    def on_train_start(self, trainer, pl_module):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _agreed(self, pl_module) -> int:
        """The stop every rank takes at this step: the largest _kind() over the ranks."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._kind()  # one process: nothing to agree on, no device round trip
        # Several processes must agree at the same step (a signal reaches ranks at different times):
        # one tiny collective and its host read per step, the price of a checkpoint at a step boundary.
        flag = torch.tensor([float(self._kind())], device=pl_module.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        kind = 0 if self.preempted else self._agreed(pl_module)
        if not kind:
            return
        self.preempted = True
        path = self.checkpointer.save(trainer, pl_module)
        # a user's Ctrl-C is not a preemption: nothing to rerun
        job = os.environ.get("SLURM_JOB_ID") if kind == 2 and self.requeue else None
        ok = False
        if trainer.is_global_zero:
            print(f"genscale: signal {self.received or 'on another rank'}: checkpoint {path} written at "
                  f"iteration {iteration_of(pl_module)}" + (f"; requeueing SLURM job {job}" if job else ""),
                  file=sys.stderr, flush=True)
            if job:
                try:
                    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
                    ok, why = res.returncode == 0, res.stderr.strip() or f"exit {res.returncode}"
                except OSError as e:  # no scontrol on this node's PATH
                    ok, why = False, str(e)
                if not ok:
                    print(f"genscale: scontrol requeue {job} failed ({why}): the run stopped at its checkpoint; "
                          "resume it to continue", file=sys.stderr, flush=True)
        # every rank reports the same outcome (exit 0 when requeued, 3 when stopped)
        self.requeued = bool(job) and bool(trainer.strategy.broadcast(ok, src=0))
        trainer.should_stop = True
