"""Preemption and automatic resume without SLURM: SIGUSR1/SIGTERM -> checkpoint at a step boundary,
clean exit; `resume=auto` continues from the newest complete checkpoint, passing over a torn one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.checkpointing import load_checkpoint


def _cmd(root, *extra):
    return [sys.executable, "-m", "launch.cli", "train", "gan_digits", f"logging.root={root}", "logging.run_id=p1",
            "resume=auto", "logging.wandb=false", "trainer.progress_bar=false", "trainer.sample_every=0",
            "trainer.checkpoint.every_n_iters=1000000", "trainer.log_every=1", "trainer.cpu_threads=1", *extra]


def _wait_for(path, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.stat().st_size > 0 and len(path.read_text().splitlines()) > 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} did not appear")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_resume_auto_continues(tmp_path, sig):
    run_dir = tmp_path / "gan_digits" / "p1"
    proc = subprocess.Popen(_cmd(tmp_path, "trainer.max_iters=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "metrics.csv")  # training is under way (rows are flushed every 10)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # stopped early without SLURM's requeue: status 3, said as much, and the JSON line says it too
    assert proc.returncode == 3, err[-2000:]
    ckpts = sorted((run_dir / "checkpoints").glob("iter-*.ckpt"))
    assert len(ckpts) == 1, ckpts
    k = load_checkpoint(ckpts[0])["genscale"]["iteration"]
    assert 0 < k < 100000 and f"checkpoint {ckpts[0]} written at iteration {k}" in err
    assert f"run stopped by a signal at iteration {k} of 100000; resume it to continue" in err
    assert '"stopped_early": "signal"' in out.strip().splitlines()[-1]

    # a torn newer checkpoint (killed mid-write, e.g. SIGKILL on a non-atomic filesystem) is passed over
    (run_dir / "checkpoints" / "iter-9999999.ckpt").write_bytes(ckpts[0].read_bytes()[:1000])
    res = subprocess.run(_cmd(tmp_path, f"trainer.max_iters={k + 3}"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping unusable checkpoint" in res.stderr
    final = load_checkpoint(run_dir / "checkpoints" / f"iter-{k + 3:07d}.ckpt")["genscale"]
    assert final["iteration"] == k + 3
    assert list(run_dir.glob("config.resume-*.yaml"))


def test_resume_auto_without_checkpoint_starts_fresh_in_place(tmp_path):
    run_dir = tmp_path / "gan_digits" / "p1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("experiment: gan_digits\n")  # a job that died before its first checkpoint
    # ... after logging 5 iterations: rows and W&B files of an attempt that is not continued
    (run_dir / "metrics.csv").write_text("step,iteration,g/loss\n" + "".join(f"{i},{i},9.0\n" for i in range(1, 6)))
    (run_dir / "wandb" / "offline-run-x").mkdir(parents=True)
    res = subprocess.run(_cmd(tmp_path, "trainer.max_iters=2"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(run_dir)["genscale"]["iteration"] == 2
    import csv

    with open(run_dir / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("g/loss")]
    assert [int(float(r["iteration"])) for r in rows] == [1, 2] and all(float(r["g/loss"]) != 9.0 for r in rows)
    assert len(list(run_dir.glob("wandb.abandoned-*/offline-run-x"))) == 1 and not (run_dir / "wandb").exists()
    assert "earlier attempt's W&B files" in res.stderr


def test_resume_auto_needs_a_fixed_run_id(tmp_path, capsys, monkeypatch):
    from launch.cli import main

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("GENSCALE_RUN_ID", raising=False)
    assert main(["train", "gan_digits", f"logging.root={tmp_path}", "resume=auto"]) == 2
    assert "resume=auto needs a fixed run directory" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["gan_digits", "glow_digits"])
def test_relaunching_a_finished_run_takes_no_step(tmp_path, experiment):
    """A requeue after the last step (or a relaunch of the same command) leaves a finished run as it
    is: no step past trainer.max_iters, no new or rewritten checkpoint."""
    cmd = _cmd(tmp_path, "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=1")
    cmd[cmd.index("gan_digits")] = experiment
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = tmp_path / experiment / "p1" / "checkpoints"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ckpts.glob("*.ckpt")}
    assert sorted(before) == ["iter-0000001.ckpt", "iter-0000002.ckpt", "last.ckpt"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "the run is complete and takes no step" in again.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ckpts.glob("*.ckpt")} == before
    assert '"iteration": 2' in again.stdout


def test_resume_auto_falls_back_to_an_intact_last_ckpt(tmp_path):
    """Every iter-* file torn, last.ckpt a whole copy (filesystems without hard links): resume=auto
    continues from last.ckpt instead of starting over in the directory."""
    first = subprocess.run(_cmd(tmp_path, "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=2"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = tmp_path / "gan_digits" / "p1" / "checkpoints"
    whole = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").write_bytes(whole)  # a copy, not a link
    (ckpts / "iter-0000002.ckpt").write_bytes(whole[:1000])
    res = subprocess.run(_cmd(tmp_path, "trainer.max_iters=3"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping unusable checkpoint" in res.stderr and "Trying the next older one" in res.stderr
    assert "Nothing was changed" not in res.stderr  # that advice is for an explicit resume, which stops
    meta = load_checkpoint(ckpts / "iter-0000003.ckpt")["genscale"]
    assert meta["config"]["resume"].endswith("checkpoints/last.ckpt")  # continued, not started over


def test_ctrl_c_stops_at_a_checkpoint_with_loader_workers_and_twice_aborts(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group, loader workers included: the run
    stops at the end of its step with a checkpoint and exits 3, as for SIGTERM. A second Ctrl-C aborts at
    once (exit 1, no checkpoint of its own)."""
    run_dir = tmp_path / "gan_digits" / "p1"
    proc = subprocess.Popen(_cmd(tmp_path, "trainer.max_iters=100000", "data.num_workers=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(run_dir / "metrics.csv")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err[-3000:]
    (ckpt,) = (run_dir / "checkpoints").glob("iter-*.ckpt")
    k = load_checkpoint(ckpt)["genscale"]["iteration"]
    assert "Ctrl-C: stopping at the end of this step" in err and f"written at iteration {k}" in err
    assert json.loads(out.strip().splitlines()[-1])["stopped_early"] == "signal"

    from trainer.callbacks.preemption import PreemptionCallback

    cb = PreemptionCallback(checkpointer=None)
    cb._handler(signal.SIGINT, None)
    assert cb.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        cb._handler(signal.SIGINT, None)


def test_preemption_handlers_are_restored_after_training():
    from trainer.callbacks.preemption import PreemptionCallback

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    cb = PreemptionCallback(checkpointer=None)
    cb.on_train_start(None, None)
    assert all(signal.getsignal(s) == cb._handler for s in before)
    cb.on_train_end(None, None)
    assert {s: signal.getsignal(s) for s in before} == before  # SIGTERM kills the process again after fit, Ctrl-C interrupts


@pytest.mark.parametrize("scontrol_rc", [0, 1])
def test_a_requeue_exits_0_and_a_failed_one_reports_a_stop(tmp_path, scontrol_rc):
    """Under SLURM the stop runs `scontrol requeue` (here a stand-in). Requeued: exit 0 and "requeued"
    (SLURM reruns the job). When scontrol fails the run says so and exits 3 as a plain stop: a wrapper
    must not take it for requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    say = "" if scontrol_rc == 0 else "echo 'slurm_requeue error: Invalid job id' >&2\n"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n{say}exit {scontrol_rc}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    proc = subprocess.Popen(_cmd(tmp_path, "trainer.max_iters=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(tmp_path / "gan_digits" / "p1" / "metrics.csv")
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    stopped = json.loads(out.strip().splitlines()[-1])["stopped_early"]
    if scontrol_rc == 0:
        assert proc.returncode == 0 and stopped == "requeued", err[-2000:]
    else:
        assert proc.returncode == 3 and stopped == "signal", err[-2000:]
        assert "scontrol requeue 4242 failed (slurm_requeue error: Invalid job id)" in err
