"""A CSV logger that appends across resumes instead of deleting the previous metrics.csv.

Lightning's CSVLogger removes an existing metrics.csv when it starts in a non-empty directory; a
resumed run would lose its history. This one keeps the old rows (dropping any logged after the
checkpoint being resumed, which the resumed run will log again) and keeps the header's columns.
"""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_through_step: int | None) -> None:
        self._keep_through = keep_through_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as fh:
            reader = csv.DictReader(fh)
            self.metrics_keys = sorted(reader.fieldnames or [])
            rows = [r for r in reader if self._keep_through is None or int(float(r["step"])) <= self._keep_through]
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    def __init__(self, save_dir: str, keep_through_step: int | None = None, **kwargs) -> None:
        super().__init__(save_dir=save_dir, name="", version="", **kwargs)
        self._keep_through = keep_through_step

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        # Written at once: rows are sparse (every trainer.log_every iterations), and Lightning's
        # "(step + 1) % flush_every" rule never fires when the steps logged are multiples of 10.
        super().log_metrics(metrics, step)
        self.save()

    @property
    @rank_zero_only
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._keep_through)
        return self._experiment


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Appends one row to a CSV log, widening its header when the row brings new columns (atomic)."""
    rows, keys = [], []
    if os.path.isfile(path):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            keys, rows = list(reader.fieldnames or []), list(reader)
    keys = sorted(set(keys) | set(row))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows + [row])
    os.replace(tmp, path)
