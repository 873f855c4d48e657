"""Experiment tracking: offline W&B runs hold the expected history keyed by kimg (read back from the binary
run file), a resume continues the same W&B run id, online without a key or network falls back to
offline with one warning, `genscale sync` refuses a directory without offline runs, and the console
prints an end-of-run summary."""
import json
import re
import warnings

import pytest

from launch.cli import main
from tests.conftest import tiny
from trainer.build import train
from trainer.tracking import WandbFallbackWarning, offline_runs, read_history, read_records, resolve_mode, run_file


def wandb_on(tmp_path, *extra):
    """tiny() with W&B on (tiny turns it off for speed)."""
    return [o for o in tiny(tmp_path, *extra) if o != "logging.wandb=false"] + ["logging.wandb=true"]


def history(run_dir, k=-1):
    return read_history(run_file(offline_runs(run_dir)[k]))


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 4-iteration offline run (checkpoints at 2 and 4), then a resume from its newest (4) to 8."""
    tmp = tmp_path_factory.mktemp("wb")
    common = ["trainer.log_every=1", "trainer.sample_every=2", "trainer.checkpoint.every_n_iters=2",
              "logging.run_id=r", "logging.wandb_group=grp", "logging.wandb_tags=[t1,t2]", "trainer.cpu_threads=1"]
    first = train("gan_digits", wandb_on(tmp, *common, "trainer.max_iters=4"))
    second = train(None, wandb_on(tmp, f"resume={first.run_dir}", "trainer.max_iters=8"))
    return first.run_dir, second


def test_offline_history_has_losses_throughput_and_images_keyed_by_kimg(resumed_run):
    run_dir, _ = resumed_run
    rows = history(run_dir, 0)
    scalars = [r for r in rows if "g/loss" in r]
    assert [r["iteration"] for r in scalars] == [1, 2, 3, 4]
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]  # W&B's step is the G iteration; grids merge into its row
    for key in ("d/loss", "d/real", "d/fake", "perf/img_per_s", "train/nonfinite_skipped"):
        assert all(key in r for r in scalars), key
    # 32 images per iteration: kimg is images seen, not Lightning's step (two optimiser steps per iteration)
    assert [r["progress/kimg"] for r in scalars] == pytest.approx([0.032, 0.064, 0.096, 0.128])
    grids = [r for r in rows if r.get("samples/_type") == "images/separated"]
    assert [g["iteration"] for g in grids] == [2, 4] and all("progress/kimg" in g for g in grids)
    media = offline_runs(run_dir)[0] / "files"
    assert all((media / g["samples/filenames"][0]).is_file() for g in grids)


def test_run_record_has_config_group_tags_and_kimg_axis(resumed_run):
    run_dir, _ = resumed_run
    recs = list(read_records(run_file(offline_runs(run_dir)[0])))
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.run_id == "gan_digits-r" and run.run_group == "grp" and list(run.tags) == ["t1", "t2"]
    assert run.project == "genscale"
    config = {u.key for u in run.config.update} | {u.key for r in recs if r.WhichOneof("record_type") == "config"
                                                   for u in r.config.update}
    assert {"trainer", "model", "loss", "data", "experiment"} <= config
    axes = {m.metric.glob_name or m.metric.name: m.metric.step_metric for m in recs
            if m.WhichOneof("record_type") == "metric"}
    assert axes.get("*") == "progress/kimg"


def test_a_run_file_still_being_written_reads_as_its_complete_records(resumed_run, tmp_path):
    """wandb's core process appends the run file after finish() may have returned: cut anywhere, the
    file reads as the records written in full so far (no decode error), and the exit record that
    close_loggers waits for is the last one."""
    from trainer.tracking import wait_for_exit_record

    path = run_file(offline_runs(resumed_run[0])[0])
    full = [r.SerializeToString() for r in read_records(path)]
    assert wait_for_exit_record(path, timeout_s=0) and read_records_kind(path)[-1] == "exit"
    data = path.read_bytes()
    cut = tmp_path / "cut.wandb"
    for n in sorted({7, 50, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1}):
        cut.write_bytes(data[:n])
        got = [r.SerializeToString() for r in read_records(cut)]
        assert got == full[:len(got)] and len(got) < len(full)
    assert not wait_for_exit_record(cut, timeout_s=0.1)


def read_records_kind(path):
    return [r.WhichOneof("record_type") for r in read_records(path)]


def test_resume_continues_the_same_wandb_run(resumed_run):
    run_dir, second = resumed_run
    dirs = offline_runs(run_dir)
    # wandb names the folder offline-run-<second>-<id>, adding -1 when two segments start in the same second
    assert len(dirs) == 2 and all(re.search(r"-gan_digits-r(-\d+)?$", d.name) for d in dirs), dirs
    ids = {next(r.run.run_id for r in read_records(run_file(d)) if r.WhichOneof("record_type") == "run") for d in dirs}
    assert ids == {"gan_digits-r"}
    rows = history(run_dir, 1)
    # The segment's steps are the iterations it covers (not 0, 1, ...), so a sync places it after the first
    assert [r["iteration"] for r in rows if "g/loss" in r] == [r["_step"] for r in rows] == [5, 6, 7, 8]
    assert second.run_dir == run_dir


def test_online_without_key_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "gan_digits", *wandb_on(tmp_path, "trainer.max_iters=1", "logging.wandb_mode=online",
                                                      "logging.run_id=o")]) == 0
    fallback = [w for w in caught if issubclass(w.category, WandbFallbackWarning)]
    assert len(fallback) == 1 and "no API key" in str(fallback[0].message)
    run_dir = tmp_path / "runs" / "gan_digits" / "o"
    assert any("g/loss" in r for r in history(run_dir))  # nothing lost
    err = capsys.readouterr().err
    assert "W&B (offline)" in err and f"genscale sync {run_dir}" in err and "genscale report" in err


def test_online_with_unreachable_server_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(WandbFallbackWarning, match="not reachable"):
        assert resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(WandbFallbackWarning):
        assert resolve_mode("offline") == "offline"  # WANDB_MODE=online asks too
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"


def test_sync_needs_offline_runs(tmp_path, capsys, resumed_run):
    assert main(["sync", str(tmp_path)]) == 2
    assert "holds no offline W&B runs" in capsys.readouterr().err
    from launch.wandb_sync import sync_command

    run_dir, _ = resumed_run
    cmd = sync_command([str(run_dir)], project="p", dry_run=True)
    assert cmd[1:4] == ["-m", "wandb", "sync"] and "--dry-run" in cmd and cmd[-2:] == [str(d) for d in offline_runs(run_dir)]


def test_callback_rows_get_kimg_and_a_failing_online_init_falls_back(tmp_path, monkeypatch):
    import wandb

    from trainer.tracking import KimgWandbLogger

    real_init = wandb.init

    def init(**kw):
        if kw.get("mode") == "online":
            raise wandb.errors.CommError("simulated: no route to host")
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", init)
    lg = KimgWandbLogger("online", log_checkpoints=True, project="genscale", id="fb", save_dir=str(tmp_path))
    lg.kimg_now = lambda: 0.16
    with pytest.warns(WandbFallbackWarning, match="simulated"):
        lg.log_metrics({"eval/fid": 3.0}, step=5)  # an eval callback's row: no kimg of its own
    assert lg.mode == "offline" and not lg.log_checkpoints
    lg.experiment.finish()
    assert read_history(run_file(offline_runs(tmp_path)[0])) [0] | {"_runtime": 0, "_timestamp": 0} == {
        "eval/fid": 3.0, "iteration": 5, "progress/kimg": 0.16, "_step": 5, "_runtime": 0, "_timestamp": 0}


def test_flow_grids_at_several_temperatures(tmp_path):
    run = train("glow_digits", wandb_on(tmp_path, "trainer.max_iters=2", "trainer.sample_every=2",
                                        "logging.flow_temperatures=[0.5,1.0]", "trainer.cpu_threads=1"))
    temps = run.run_dir / "samples" / "temperatures"
    assert sorted(p.name for p in temps.iterdir()) == ["iter_0000002_T0.5.png", "iter_0000002_T1.png"]
    rows = [r for r in history(run.run_dir) if "samples/temperatures/count" in r]
    assert len(rows) == 1 and rows[0]["samples/temperatures/count"] == 2
    assert rows[0]["samples/temperatures/captions"] == ["T=0.5", "T=1"] and rows[0]["progress/kimg"] > 0


def test_progress_bar_shows_kimg_losses_and_counts_iterations_to_max_iters():
    from types import SimpleNamespace

    import torch

    from trainer.progress import ThroughputBar

    bar = ThroughputBar()
    module = SimpleNamespace(images_seen=torch.tensor(6400), iteration=torch.tensor(200), g_stepped=True,
                             cfg={"trainer": {"max_iters": 1000}, "experiment": "x"},
                             last_logged={"d/loss": 1.2345, "g/loss": 0.5, "perf/img_per_s": 10.0})
    trainer = SimpleNamespace(progress_bar_metrics={"img/s": "512"}, loggers=[], is_global_zero=True)
    bar.setup(trainer, module, "fit")
    bar.disable()
    bar.train_progress_bar = bar.init_train_tqdm()
    # one bar for the run: the ETA is to trainer.max_iters, from the resume point
    assert bar.train_progress_bar.total == 1000 and bar.train_progress_bar.n == 200
    items = bar.get_metrics(trainer, module)
    assert items["kimg"] == "6.4" and items["D"] == "1.23" and items["G"] == "0.5" and items["img/s"] == "512"


def test_list_shows_experiment_descriptions_models_and_data(capsys):
    assert main(["list", "experiments"]) == 0
    out = capsys.readouterr().out
    assert "gan_digits: A seconds-long smoke run: vanilla GAN on scikit-learn's 8x8 digits" in out
    assert "model glow (L=2, K=2, width 16, affine), data digits 8px" in out and "no constraints" in out
    assert "WGAN-GP (Gulrajani et al. 2017)" in out  # "et al." does not end the sentence


def test_console_bar_goes_to_stderr_and_spans_a_mid_epoch_resume(tmp_path):
    """`genscale train` prints one JSON line on stdout (scripts parse it) and the progress bar on stderr.
    After a resume in the middle of an epoch (gan_digits: 50 batches per epoch, resumed at 7) the bar
    still counts to trainer.max_iters (Lightning calls no on_train_epoch_start there)."""
    import subprocess
    import sys

    from tests.distributed.helpers import REPO, clean_env

    def run(*extra):
        cmd = [sys.executable, "-m", "launch.cli", "train", "gan_digits", f"logging.root={tmp_path}",
               "logging.run_id=bar", "logging.wandb=false", "trainer.progress_bar=true", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout), proc.stderr.replace("\r", "\n")

    out, err = run("trainer.max_iters=7")
    assert out["iteration"] == 7 and "gan_digits: 100%" in err and "7/7 [" in err
    out, err = run("trainer.max_iters=15", "resume=auto")
    assert out["iteration"] == 15 and "15/15 [" in err and "/?" not in err


def test_the_logged_batch_says_how_it_is_made(tmp_path):
    """train/effective_batch is data.batch_size; train/micro_batch_per_rank divides it by the processes and
    the micro-batches of optim.accumulate (16 over 1 process and 4 micro-batches: 4)."""
    import csv

    run = train("gan_digits", tiny(tmp_path, "trainer.max_iters=1", "data.batch_size=16", "optim.accumulate=4"))
    with open(run.run_dir / "metrics.csv") as fh:
        row = [r for r in csv.DictReader(fh) if r.get("train/effective_batch")][-1]
    assert (float(row["train/effective_batch"]), float(row["train/micro_batch_per_rank"])) == (16.0, 4.0)
