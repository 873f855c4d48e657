"""Console output: the training progress bar and the end-of-run summary."""
from __future__ import annotations

import shlex
from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

from trainer.tracking import offline_runs, wandb_loggers
from trainer.counters import iteration_of, images_of

# Scalars worth a place on one console line; everything else is in metrics.csv and W&B.
_BAR_KEYS = ("d/loss", "g/loss", "train/bpd", "eval/fid", "eval/bpd")


class ThroughputBar(TQDMProgressBar):
    """One bar for the whole run, counted in G iterations up to trainer.max_iters (tqdm's ETA is then the
    time to the configured length, also after a resume), with images/s, kimg and the latest losses.
    Lightning's default counts batches of one epoch, which means nothing here."""

    def on_train_epoch_start(self, trainer, pl_module=None, *_) -> None:
        bar = self.train_progress_bar
        if bar.total is None or bar.total != pl_module.cfg["trainer"]["max_iters"]:
            bar.reset(total=pl_module.cfg["trainer"]["max_iters"])
            bar.initial = iteration_of(pl_module)
            bar.n = iteration_of(pl_module)
            bar.set_description(f"{pl_module.cfg.get('experiment') or 'train'}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = iteration_of(pl_module)  # the host mirror: no device sync on steps the bar does not redraw
        if pl_module.g_stepped and self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the bar spans epochs

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
             f"  samples        {d / 'samples'} ({len(samples)} grids"
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
