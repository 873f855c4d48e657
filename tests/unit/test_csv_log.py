"""The run's CSV log: rows reach the file as they are logged, and a resume keeps the history."""
import csv

from trainer.csv_log import AppendingCSVLogger, append_row


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_rows_are_on_disk_as_soon_as_logged(tmp_path):
    log = AppendingCSVLogger(str(tmp_path), flush_logs_every_n_steps=10)
    for it in (10, 20):  # multiples of 10: Lightning's own flush rule would never fire
        log.log_metrics({"g/loss": float(it)}, step=it)
        assert [r["step"] for r in _rows(tmp_path / "metrics.csv")][-1] == str(it)


def test_resume_keeps_history_up_to_the_checkpoint_and_adds_columns(tmp_path):
    first = AppendingCSVLogger(str(tmp_path))
    for it in (1, 2, 3):
        first.log_metrics({"g/loss": float(it)}, step=it)
    resumed = AppendingCSVLogger(str(tmp_path), keep_through_step=2)  # checkpoint at 2; 3 will be redone
    resumed.log_metrics({"g/loss": 30.0, "d/loss": 1.0}, step=3)
    rows = _rows(tmp_path / "metrics.csv")
    assert [(r["step"], r["g/loss"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "30.0")]
    append_row(tmp_path / "metrics.csv", {"step": 3, "eval/fid": 12.5})
    assert _rows(tmp_path / "metrics.csv")[-1]["eval/fid"] == "12.5"
