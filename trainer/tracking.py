"""Weights & Biases: which mode a run gets, the logger that plots against kimg, media, artifacts, and a
reader for offline history files.

x-axis: every row we log carries ``progress/kimg`` and W&B is told (``define_metric``) to plot every
other key against it (kimg is a float; W&B's ``step`` must be an int).

W&B's ``step`` is the G iteration (not Lightning's global_step, which counts two optimiser steps per GAN
iteration): rows of one iteration (losses, sample grids, eval) merge into one history row, and the
offline segments of a resumed run carry the iterations they cover. Without it each offline segment
would number its rows from 0 and a sync could lay the second over the first (wandb #3841, #5865). The
price: an online resume from an earlier checkpoint re-logs iterations W&B already has, and W&B drops
those rows (with a warning) and keeps the first values; metrics.csv keeps the re-logged ones.
"""
from __future__ import annotations

import json
import netrc
import os
import socket
import struct
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from trainer.counters import images_of

KIMG = "progress/kimg"


class WandbFallbackWarning(UserWarning):
    """W&B online was asked for but cannot be used; the run logs offline instead."""


def _host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def has_api_key() -> bool:
    """A key in WANDB_API_KEY or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(config_mode: str) -> str:
    """'online' only when asked for (config or WANDB_MODE=online), a key exists and the server answers;
    otherwise 'offline', with one warning when online was asked for. Checked before wandb.init so that
    a cluster without internet never waits on W&B's 90 s init timeout."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return "disabled"
    wanted = config_mode == "online" or os.environ.get("WANDB_MODE", "").lower() == "online"
    if not wanted:
        return "offline"
    why = ("no API key (set WANDB_API_KEY or run `wandb login`)" if not has_api_key() else
           f"{_host()} is not reachable" if not reachable(_host()) else "")
    if why:
        warn_fallback(why)
        return "offline"
    return "online"


def warn_fallback(why: str) -> None:
    warnings.warn(f"W&B online logging is not possible: {why}. Logging offline instead; nothing is lost: "
                  "upload later with `genscale sync RUN_DIR`.", WandbFallbackWarning, stacklevel=2)


class KimgWandbLogger(WandbLogger):
    """Lightning's WandbLogger with kimg as the x-axis of every chart (see the module doc) and an
    online start that falls back to offline instead of failing the run."""

    def __init__(self, mode: str, log_checkpoints: bool = False, **kwargs):
        # offline=False: Lightning would otherwise set WANDB_MODE=dryrun for the whole process.
        super().__init__(offline=False, mode=mode, **kwargs)
        self.mode = mode
        self.log_checkpoints = log_checkpoints and mode == "online"
        self.kimg_now = None  # set by KimgAxis: rows from callbacks (eval, data, knowledge) lack kimg

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._experiment = self._init_run()
            self._experiment.define_metric(KIMG)
            self._experiment.define_metric("*", step_metric=KIMG, step_sync=True)
        return self._experiment

    def _init_run(self):
        import wandb

        if wandb.run is not None:  # one run per process; a leftover one would swallow our rows
            wandb.run.finish()
        try:
            return wandb.init(**self._wandb_init)
        except Exception as e:  # noqa: BLE001 - W&B raises many types for network/auth problems
            if self._wandb_init.get("mode") != "online":
                raise
            warn_fallback(f"wandb.init failed ({type(e).__name__}: {e})")
            self._wandb_init["mode"] = self.mode = "offline"
            self.log_checkpoints = False
            return wandb.init(**self._wandb_init)

    @rank_zero_only
    def log_metrics(self, metrics, step: Optional[int] = None) -> None:
        row = dict(metrics)
        if step is not None and "iteration" not in row:
            row["iteration"] = float(step)
        if KIMG not in row and self.kimg_now is not None:
            row[KIMG] = self.kimg_now()
        self.experiment.log(row, step=None if step is None else int(step))

    @rank_zero_only
    def log_media(self, media: Dict[str, object], kimg: float, iteration: int) -> None:
        self.experiment.log({**media, KIMG: kimg, "iteration": float(iteration)}, step=int(iteration))

    @rank_zero_only
    def log_checkpoint(self, path: str | os.PathLike, iteration: int, kimg: float) -> None:
        """Uploads a checkpoint as a model artifact (online only: offline it would double the disk use)."""
        if not self.log_checkpoints:
            return
        import wandb

        art = wandb.Artifact(f"model-{self.experiment.id}", type="model",
                             metadata={"iteration": iteration, "kimg": kimg})
        art.add_file(str(path))
        self.experiment.log_artifact(art, aliases=[f"iter-{iteration}", "latest"])


def make_wandb_logger(cfg, run_dir: Path, config: dict) -> Optional[KimgWandbLogger]:
    lg = cfg.logging
    mode = resolve_mode(lg.wandb_mode) if rank_zero_only.rank == 0 else "offline"
    if mode == "disabled":
        return None
    run_id = (lg.wandb_id or f"{cfg.experiment}-{run_dir.name}").replace("/", "-")
    return KimgWandbLogger(
        mode, log_checkpoints=lg.wandb_log_checkpoints, project=lg.wandb_project, entity=lg.wandb_entity or None,
        group=lg.wandb_group or cfg.experiment or None, tags=list(lg.wandb_tags) or None,
        name=f"{cfg.experiment}/{run_dir.name}", id=run_id, save_dir=str(run_dir), config=config, resume="allow")


class KimgAxis(L.Callback):
    """Gives the W&B loggers the module's images seen, so that every row is placed at its kimg (W&B's
    step_sync would otherwise repeat the last logged kimg, which lags by up to trainer.log_every)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        for lg in wandb_loggers(trainer):
            lg.kimg_now = lambda: images_of(pl_module) / 1000.0


def wandb_loggers(trainer) -> List[KimgWandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, KimgWandbLogger)]


def log_images(trainer, key: str, paths: List[Path], captions: List[str], kimg: float, iteration: int) -> None:
    """Image files to every W&B logger as one row at this kimg (rank 0 only)."""
    loggers = wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return
    import wandb

    images = [wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)]
    for lg in loggers:
        lg.log_media({key: images}, kimg, iteration)


# ---- offline run files ------------------------------------------------------------------------

def offline_runs(run_dir: str | os.PathLike) -> List[Path]:
    """The offline W&B run directories (wandb/offline-run-*) of a run directory, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))


def read_records(path: str | os.PathLike) -> Iterator[object]:
    """The protobuf records of a W&B run file (run-<id>.wandb).

    wandb 0.31 ships no Python reader (its core is Go); the file is LevelDB's log format: a 7-byte
    header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks (crc32c, length, type) whose
    payloads, joined across FIRST/MIDDLE/LAST chunks, are serialised wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written (a live run's file): stop before it
            return
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wait_for_exit_record(path: str | os.PathLike, timeout_s: float = 30.0) -> bool:
    """Whether the run file at ``path`` ends with its exit record within ``timeout_s``: wandb 0.31's
    ``finish()`` can return while its core process is still writing the file's last records."""
    deadline = time.monotonic() + timeout_s
    while True:
        if Path(path).exists() and any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _item_value(item):
    for kind in ("number", "integer", "boolean", "text"):
        if item.HasField(kind):
            return getattr(item, kind)
    return json.loads(item.value_json) if item.value_json else None


def read_history(path: str | os.PathLike) -> List[dict]:
    """History rows (key -> value; media as their JSON descriptions) of a W&B run file."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): _item_value(it) for it in rec.history.item})
    return rows


def run_file(offline_dir: str | os.PathLike) -> Path:
    files = sorted(Path(offline_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"No run-*.wandb file in {offline_dir}")
    return files[0]
