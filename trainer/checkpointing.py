"""Checkpoints that are never half-written, written every N iterations and/or minutes.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target, so
a crash leaves either the old file or the new one. `last.ckpt` is a hard link (or copy) of the
newest checkpoint, replaced atomically as well. Besides it, the best k by a monitored metric (lower
is better; a tie goes to the newer) or, without one, the newest k are kept, and the newest is never
pruned: a run resumes from it, however it ranks (between evaluations a save carries the last value).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from trainer.counters import iteration_of


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix.
    ``problem``: the message without the fix (for callers that pass over the file themselves)."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


def _atomic_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            _atomic_replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def atomic_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    _atomic_replace(tmp, dst)


class IterationCheckpoint(L.Callback):
    """Saves on G-iteration multiples and/or elapsed minutes, plus once at the end of training."""

    def __init__(self, dirpath: str | Path, every_n_iters: int = 0, every_n_minutes: float = 0.0,
                 save_top_k: int = 3, monitor: str = ""):
        self.dirpath = Path(dirpath)
        self.every_n_iters, self.every_n_minutes = every_n_iters, every_n_minutes
        self.save_top_k, self.monitor = save_top_k, monitor
        self.kept: Dict[str, float] = {}  # file name -> score (lower better) or -iteration
        self._t_last = time.monotonic()
        self.last_path: Optional[Path] = None

    def state_dict(self) -> dict:
        return {"kept": dict(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.kept = dict(state.get("kept", {}))

    def _due(self, trainer, it: int) -> bool:
        due = self.every_n_iters > 0 and it % self.every_n_iters == 0
        if self.every_n_minutes > 0:
            timed = time.monotonic() - self._t_last >= 60.0 * self.every_n_minutes
            due = due or bool(trainer.strategy.broadcast(timed, src=0))  # every rank must agree
        return due

    def save(self, trainer, pl_module) -> Path:
        it = iteration_of(pl_module)
        path = self.dirpath / f"iter-{it:07d}.ckpt"
        # Registered before writing, so the callback state stored inside this very checkpoint lists
        # it: after a resume from it, it is still pruned like any other.
        self.kept[path.name] = self._score(trainer, it)
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank calls, rank 0 writes
        self._t_last = time.monotonic()
        if trainer.is_global_zero:
            atomic_link(path, self.dirpath / "last.ckpt")
            self._prune()
        self.last_path = path
        return path

    def _score(self, trainer, it: int) -> float:
        """Lower is better. Without a monitor: newest first. A monitored save lacking the metric ranks last."""
        if not self.monitor:
            return -float(it)
        value = trainer.callback_metrics.get(self.monitor)
        return float(value) if value is not None else float("inf")

    def _prune(self) -> None:
        if self.save_top_k < 0:
            return
        newest = max(self.kept, key=iteration_in_name)
        order = sorted(self.kept, key=lambda n: (self.kept[n], -iteration_in_name(n)))
        for stale in order[self.save_top_k:]:
            if stale == newest:
                continue
            (self.dirpath / stale).unlink(missing_ok=True)
            shutil.rmtree(self.dirpath / f"{stale}.ds", ignore_errors=True)  # DeepSpeed's partitions
            del self.kept[stale]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.g_stepped and self._due(trainer, iteration_of(pl_module)):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        it = iteration_of(pl_module)
        name = f"iter-{it:07d}.ckpt"
        if self.last_path is not None and self.last_path.name == name:
            return
        if name in self.kept and (self.dirpath / name).exists():  # resumed from it, no step since
            self.last_path = self.dirpath / name
            return
        self.save(trainer, pl_module)


def iteration_in_name(name: str) -> int:
    """iter-0000042.ckpt -> 42."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its checkpoints/last.ckpt; a file is used as it is."""
    p = Path(path)
    if p.is_dir():
        cand = p / "checkpoints" / "last.ckpt"
        if not cand.exists():
            cand = p / "last.ckpt"
        if not cand.exists():
            raise CheckpointError(f"No checkpoint in '{p}': expected {p}/checkpoints/last.ckpt. "
                                  "Pass a run directory that has saved a checkpoint, or a .ckpt file.")
        return cand
    if not p.exists():
        raise CheckpointError(f"Checkpoint '{p}' does not exist. Pass a run directory or an existing .ckpt file.")
    return p


def load_checkpoint(path: str | Path) -> dict:
    """Loads and checks a genscale checkpoint on CPU; truncated or foreign files give a clear error."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        siblings = sorted(x.name for x in p.parent.glob("*.ckpt") if x != p)
        hint = f" Other checkpoints beside it: {', '.join(siblings)}." if siblings else ""
        first = str(e).splitlines()[0] if str(e) else ""
        first = first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " ..."  # never cut in a word
        problem = f"Checkpoint '{p}' is truncated or corrupt and cannot be read ({type(e).__name__}: {first})."
        raise CheckpointError(f"{problem}{hint} Nothing was changed; pass an intact checkpoint.", problem) from None
    if not isinstance(ckpt, dict) or "genscale" not in ckpt or "state_dict" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"'{p}' is not a genscale checkpoint (it has no 'genscale' section; found {keys}). "
                              "Pass a checkpoint written by `genscale train`.")
    ckpt["_path"] = str(p)
    return ckpt
