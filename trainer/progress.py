"""Console output: the training progress bar and the end-of-run summary."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n

from trainer.tracking import offline_runs, wandb_loggers
from trainer.counters import iteration_of, images_of

# Scalars worth a place on one console line; everything else is in metrics.csv and W&B.
_BAR_KEYS = ("d/loss", "g/loss", "train/bpd", "eval/fid", "eval/bpd")


class ThroughputBar(TQDMProgressBar):
    """One bar for the whole run, counted in G iterations up to trainer.max_iters (tqdm's ETA is then the
    time to the configured length, also after a resume), with images/s, kimg and the latest losses.
    Lightning's default counts batches of one epoch, which means nothing here."""

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's train bar, but on stderr (stdout carries `genscale train`'s one JSON line), named
        after the experiment and spanning the run from the iteration it starts at (after a resume too:
        made at on_train_start, once the checkpoint is restored)."""
        m = self._module
        return Tqdm(desc=m.cfg.get("experiment") or "train", total=m.cfg["trainer"]["max_iters"],
                    initial=iteration_of(m), position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def _on_stderr(self, make):
        saved, sys.stdout = sys.stdout, sys.stderr  # Lightning reads sys.stdout when it makes a bar
        try:
            return make()
        finally:
            sys.stdout = saved

    def init_validation_tqdm(self) -> Tqdm:
        return self._on_stderr(super().init_validation_tqdm)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._on_stderr(super().init_sanity_tqdm)

    def on_train_epoch_start(self, trainer, pl_module=None, *_) -> None:
        pass  # the bar spans epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = iteration_of(pl_module)  # the host mirror: no device sync on steps the bar does not redraw
        if pl_module.g_stepped and self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items["kimg"] = f"{images_of(pl_module) / 1000:.1f}"
        if getattr(pl_module, "img_per_s", 0.0):
            items["img/s"] = f"{pl_module.img_per_s:.1f}"
        latest = getattr(pl_module, "last_logged", None) or {}
        items.update({k.split("/")[-1] if k.startswith(("d/", "g/")) else k: f"{latest[k]:.3g}"
                      for k in _BAR_KEYS if k in latest})
        if "img/s" not in items and latest.get("perf/img_per_s"):  # flows log it only with their rows
            items["img/s"] = f"{latest['perf/img_per_s']:.0f}"
        if "d/loss" in latest:  # d/loss and g/loss would both shorten to "loss"
            items.pop("loss", None)
            items["D"], items["G"] = f"{latest['d/loss']:.3g}", f"{latest.get('g/loss', float('nan')):.3g}"
        return items


def stopped_early(run) -> str:
    """'' for a run that ended by itself (trainer.max_iters, or an error), 'signal' for one a preemption
    signal stopped early, 'requeued' when that stop was handed to SLURM's requeue."""
    from trainer.callbacks.preemption import PreemptionCallback

    cb = next((c for c in run.trainer.callbacks if isinstance(c, PreemptionCallback)), None)
    if cb is None or not cb.preempted:
        return ""
    return "requeued" if cb.requeued else "signal"


def run_summary(run) -> str:
    """Where everything of a finished run is, and the commands that come next."""
    d = run.run_dir
    ckpt = run.checkpointer.last_path
    samples = sorted((d / "samples").glob("*.png"))
    stop = stopped_early(run)
    head = (f"genscale: run stopped by a signal at iteration {iteration_of(run.module)} of {run.cfg.trainer.max_iters}"
            + (" (requeued)" if stop == "requeued" else "; resume it to continue") if stop else
            f"genscale: run finished at iteration {iteration_of(run.module)}")
    lines = [f"{head} ({images_of(run.module) / 1000:g} kimg)",
             f"  run directory  {d}",
             f"  checkpoints    {d / 'checkpoints'} (last: {ckpt.name if ckpt else 'none'})",
             f"  samples        {d / 'samples'} ({len(samples)} grid{'' if len(samples) == 1 else 's'}"
             + (f", last: {samples[-1].name})" if samples else ")"),
             f"  metrics        {d / 'metrics.csv'}",
             f"  report         genscale report {shlex.quote(str(d))} --out {shlex.quote(str(d / 'report.html'))}"]
    lines += _wandb_lines(run)
    return "\n".join(lines)


def _wandb_lines(run) -> list:
    loggers = wandb_loggers(run.trainer)
    if not loggers:
        return ["  W&B            off (logging.wandb=false or WANDB_MODE=disabled)"]
    lg = loggers[0]
    if lg.mode == "online" and lg._experiment is not None:
        return [f"  W&B            online: {getattr(lg._experiment, 'url', '') or lg.name}"]
    runs = offline_runs(run.run_dir)
    where = runs[-1] if runs else Path(run.run_dir) / "wandb"
    return [f"  W&B (offline)  {where}",
            f"  upload with    genscale sync {shlex.quote(str(run.run_dir))}"]
