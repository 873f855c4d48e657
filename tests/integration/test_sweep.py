"""Sweeps in W&B's format: a local 2x2 grid gives 4 runs with the right overrides; random sweeps
draw reproducibly; the wandb backend refuses clearly when W&B is offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from tests.conftest import SWEEP_SPEC
from launch.sweep import command_for, expand, load_sweep
from trainer.checkpointing import load_checkpoint

def test_grid_and_command_expansion(sweep_file):
    spec = load_sweep(str(sweep_file()))
    trials = expand(spec)
    assert len(trials) == 4
    assert {(t["optim.d.lr"], t["model.g_width"]) for t in trials} == {(1e-4, 8), (1e-4, 16), (2e-4, 8), (2e-4, 16)}
    cmd = command_for(spec, trials[0])
    assert cmd[:5] == [sys.executable, "-m", "launch.cli", "train", "gan_digits"]
    assert "model.g_width=8" in cmd and "trainer.max_iters=2" in cmd and "${env}" not in cmd


def test_random_sweep_is_reproducible_and_in_range():
    spec = {"method": "random", "run_cap": 5, "parameters": {
        "trainer.seed": {"distribution": "int_uniform", "min": 0, "max": 9},
        "optim.g.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
        "loss.name": {"values": ["hinge", "nonsaturating"]}}}
    a, b = expand(spec, seed=3), expand(spec, seed=3)
    assert a == b and len(a) == 5 and a != expand(spec, seed=4)
    assert all(0 <= t["trainer.seed"] <= 9 and 1e-5 <= t["optim.g.lr"] <= 1e-3 for t in a)


@pytest.mark.slow
def test_local_grid_sweep_makes_four_runs_with_their_overrides(tmp_path, sweep_file):
    """Two trials at a time (--parallel 2): each its own run directory and log, all four recorded."""
    res = subprocess.run([sys.executable, "-m", "launch.cli", "sweep", str(sweep_file()), "--backend", "local",
                          "--parallel", "2", "--id", "s1", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "sweeps" / "s1" / "trials.jsonl").read_text().splitlines()]
    assert [x["returncode"] for x in lines] == [0, 0, 0, 0] and sorted(x["trial"] for x in lines) == [0, 1, 2, 3]
    assert res.stdout.count("genscale sweep: trial ") == 4 and "(output in " in res.stdout
    seen = set()
    for x in lines:
        log = Path(x["log"]).read_text()  # the trial's own output: the summary line of its run
        assert x["run_id"] in log and '"iteration": 2' in log, log[-2000:]
        run_dir = tmp_path / "runs" / "gan_digits" / x["run_id"]
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["optim"]["d"]["lr"] == x["overrides"]["optim.d.lr"]
        assert cfg["model"]["g_width"] == x["overrides"]["model.g_width"]
        assert load_checkpoint(run_dir)["genscale"]["iteration"] == 2
        seen.add((cfg["optim"]["d"]["lr"], cfg["model"]["g_width"]))
    assert len(seen) == 4


def test_bad_sweeps_and_offline_wandb_are_refused(tmp_path, capsys, monkeypatch, sweep_file):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = sweep_file("method: bayes\nparameters: {a: {values: [1]}}\n")
    assert main(["sweep", str(bad)]) == 2
    assert "use grid or random" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["sweep", str(sweep_file()), "--backend", "wandb"]) == 2
    assert "needs W&B online" in capsys.readouterr().err
    for argv in (["--parallel", "0"], ["--parallel", "2", "--backend", "slurm"]):
        assert main(["sweep", str(sweep_file()), "--root", str(tmp_path), "--id", "p", *argv]) == 2
        assert "--parallel" in capsys.readouterr().err
    assert not (tmp_path / "sweeps" / "p").exists()  # refused before anything was written
    (tmp_path / "sweeps" / "taken").mkdir(parents=True)
    assert main(["sweep", str(sweep_file()), "--root", str(tmp_path), "--id", "taken"]) == 2
    assert "choose another --id, or continue that sweep with --resume --id taken" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("parameters: {a: {values: []}}", "'values' must be a non-empty list"),
    ("parameters: {a: {values: 0.1}}", "'values' must be a non-empty list"),
    ("parameters: {a: {values: abc}}", "'values' must be a non-empty list"),
    ("parameters: {a: 0.1}", "give a mapping such as"),
    ("- a\n- b", "must be a mapping"),
    ("method: random\nrun_cap: 2\nparameters: {a: {distribution: log_uniform_values, min: 0, max: 1}}",
     "min > 0"),
    ("method: random\nrun_cap: 2\nparameters: {a: {distribution: uniform, max: 1}}", "needs numbers 'min' and 'max'"),
    ("method: random\nparameters: {a: {values: [1, 2]}}", "run_cap in the file or --count N): neither was given"),
    ("method: random\nparameters: {a: {distribution: uniform, min: 0, max: 1}}", "at least 1"),
    ("parameters: {a: {values: [1]}}\ncommand: [python, -c, pass]", "${args_no_hyphens}"),
])
def test_a_bad_sweep_file_is_refused_with_its_fault_before_any_trial(tmp_path, capsys, sweep_file, text, message):
    assert main(["sweep", str(sweep_file(text)), "--root", str(tmp_path), "--id", "b"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sweeps").exists()


def test_trial_configs_are_checked_before_the_sweep_starts(tmp_path, capsys, sweep_file):
    text = (Path(sweep_file()).read_text()).replace("optim.d.lr:", "optim.d.lrr:")
    assert main(["sweep", str(sweep_file(text)), "--root", str(tmp_path), "--id", "k"]) == 2
    err = capsys.readouterr().err
    assert "trial 0" in err and "optim.d.lrr" in err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()
    assert main(["sweep", str(sweep_file()), "--root", str(tmp_path), "--id", "k", "--gpus", "1"]) == 2
    assert "--backend slurm" in capsys.readouterr().err


def test_a_stopped_local_sweep_resumes_its_unfinished_trials(tmp_path, capsys, sweep_file):
    text = Path(sweep_file()).read_text().replace("model.g_width: {values: [8, 16]}", "model.g_width: {value: 8}")
    assert main(["sweep", str(sweep_file(text)), "--root", str(tmp_path), "--id", "r"]) == 0
    sweep = tmp_path / "sweeps" / "r"
    lines = sweep.joinpath("trials.jsonl").read_text().splitlines()
    # as if the sweep had been killed while trial 1 ran (after its checkpoint): no line of success for it
    sweep.joinpath("trials.jsonl").write_text(lines[0] + "\n" + lines[1].replace('"returncode": 0', '"returncode": -9') + "\n")
    trial1 = tmp_path / "runs" / "gan_digits" / "r-001"
    before = load_checkpoint(trial1)["genscale"]["images_seen"]
    capsys.readouterr()
    assert main(["sweep", "ignored.yaml", "--root", str(tmp_path), "--id", "r", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 trials done, 1 to run" in out and '"run": 1' in out and "r-000" not in out.split("resuming")[1]
    last = json.loads(sweep.joinpath("trials.jsonl").read_text().splitlines()[-1])
    assert last["trial"] == 1 and last["returncode"] == 0 and "resume=auto" in last["command"]
    assert load_checkpoint(trial1)["genscale"]["images_seen"] == before  # continued (at max_iters: no step)
    assert main(["sweep", "x.yaml", "--root", str(tmp_path), "--id", "nope", "--resume"]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err


def test_parallel_trials_share_the_gpus_out():
    from launch.sweep import slot_gpus

    gpus = ["0", "1", "2", "3", "4"]
    assert [slot_gpus(k, 2, gpus) for k in range(2)] == ["0,1", "2,3"]  # equal shares; the fifth stays idle
    assert [slot_gpus(k, 4, gpus) for k in range(4)] == ["0", "1", "2", "3"]
    assert slot_gpus(0, 1, gpus) == "0,1,2,3,4"
    assert slot_gpus(0, 2, ["7"]) is None and slot_gpus(1, 2, []) is None  # too few to share: as the environment is


def test_concurrent_cpu_trials_split_the_cores():
    from launch.sweep import trial_threads

    assert trial_threads(2, 0, 16, None) == 8 and trial_threads(3, 1, 16, None) == 5 and trial_threads(4, 0, 2, None) == 1
    assert trial_threads(1, 0, 16, None) is None  # one at a time: torch's default
    assert trial_threads(2, 2, 16, None) is None  # a GPU each
    assert trial_threads(2, 0, 16, "3") is None   # the user's setting stands


QUICK = """
method: grid
parameters:
  a: {values: [1, 2, 3]}
command:
  - ${interpreter}
  - -c
  - "import os, sys; print('trial', os.environ['GENSCALE_RUN_ID'], sys.argv[1:], os.environ.get('OMP_NUM_THREADS'));
     sys.exit(3 if 'a=2' in sys.argv else 0)"
  - ${args_no_hyphens}
"""


@pytest.mark.parametrize("parallel", [1, 3])
def test_local_trials_one_at_a_time_or_together_record_each_exit(tmp_path, capsys, monkeypatch, sweep_file, parallel):
    """Any program can be a sweep's command: a failing trial fails the sweep, the others still run, and
    each trial's line records its exit code (concurrent trials: and the log holding its output, and
    with no GPUs, an equal share of the CPU cores as OMP_NUM_THREADS)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rc = main(["sweep", str(sweep_file(QUICK)), "--root", str(tmp_path), "--id", "q", "--parallel", str(parallel)])
    assert rc == 1
    lines = sorted((json.loads(x) for x in (tmp_path / "sweeps" / "q" / "trials.jsonl").read_text().splitlines()),
                   key=lambda x: x["trial"])
    assert [(x["overrides"], x["returncode"]) for x in lines] == [({"a": 1}, 0), ({"a": 2}, 3), ({"a": 3}, 0)]
    printed = capsys.readouterr().out
    assert '"failed": 1' in printed
    if parallel == 1:
        assert all("log" not in x for x in lines)
    else:
        for x in lines:
            threads = max(1, os.cpu_count() // 3)
            assert Path(x["log"]).read_text().startswith(f"trial q-{x['trial']:03d} ['a={x['trial'] + 1}'] {threads}")
        assert f"trial 2 failed (exit 3); its output: {lines[1]['log']}" in printed


def test_sigterm_stops_the_running_trial_at_a_checkpoint_and_records_it(tmp_path, sweep_file):
    """A killed sweep must not leave its trial running unattended: SIGTERM to the sweep reaches the trial,
    which writes a checkpoint at its step and exits 3; the sweep records that (so --resume runs the
    trial again, from its checkpoint) and exits 128 + 15."""
    import signal
    import time

    text = SWEEP_SPEC.replace("{values: [8, 16]}", "{value: 8}").replace("{value: 2}", "{value: 1000000}")
    text += "  - trainer.log_every=1\n  - trainer.checkpoint.every_n_iters=1000000\n"
    from tests.distributed.helpers import REPO, clean_env

    # inside a SLURM allocation (SLURM_JOB_ID set), a trial must still stop, not requeue the allocation
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "sweep", str(sweep_file(text)), "--id", "st",
                             "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(clean_env(), CUDA_VISIBLE_DEVICES="", SLURM_JOB_ID="4242"),
                            start_new_session=True)
    metrics = tmp_path / "runs" / "gan_digits" / "st-000" / "metrics.csv"
    try:
        end = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
            assert time.time() < end and proc.poll() is None, "the trial did not start"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:  # never leave the sweep or its million-iteration trial behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert json.loads(out.splitlines()[-1])["stopped"] == "SIGTERM" and "--resume --id st" in err
    # one record: the grid's second trial never starts
    (record,) = [json.loads(x) for x in (tmp_path / "sweeps" / "st" / "trials.jsonl").read_text().splitlines()]
    assert record["returncode"] == 3  # the trial's "stopped early at a checkpoint"
    rows = len(metrics.read_text().splitlines())
    it = load_checkpoint(metrics.parent)["genscale"]["iteration"]
    assert 3 <= it < 1000000 and rows - 1 == it
    time.sleep(1.0)
    assert len(metrics.read_text().splitlines()) == rows  # nothing writes the run any more


def test_random_sweep_distributions():
    from launch.sweep import expand

    spec = {"method": "random", "parameters": {
        "a": {"distribution": "int_uniform", "min": 0, "max": 1},
        "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1}}}
    trials = expand(spec, count=400, seed=0)
    assert {t["a"] for t in trials} == {0, 1}  # max is inclusive
    lrs = sorted(t["lr"] for t in trials)
    assert 1e-5 <= lrs[0] and lrs[-1] <= 1e-1
    # log-uniform: the median is the geometric mean 1e-3 (uniform would put it near 0.05)
    assert 3e-4 < lrs[200] < 3e-3
    assert sum(lr < 1e-3 for lr in lrs) > 150


def test_local_trials_do_not_inherit_the_allocations_slurm_variables(tmp_path, monkeypatch, sweep_file):
    """A trial that saw SLURM_JOB_ID would requeue the whole allocation when the sweep stops it."""
    import launch.sweep as sweep

    seen = []

    class Done:
        returncode = 0

        def __init__(self, cmd, env=None, **kw):
            seen.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Done)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    spec = load_sweep(str(sweep_file()))
    (tmp_path / "sw").mkdir()
    assert sweep.run_local(spec, expand(spec)[:2], tmp_path / "sw", "sw") == 0
    assert len(seen) == 2 and all(not any(k.startswith("SLURM_") for k in env) for env in seen)
    assert [env["GENSCALE_RUN_ID"] for env in seen] == ["sw-000", "sw-001"]
