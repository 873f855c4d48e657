"""`genscale launch torchrun`: the command it builds, a real two-node job on localhost, and a master
that does not answer."""
import subprocess
import sys
import time

import pytest

from launch.cli import main
from launch.torchrun import LaunchError, build_command
from tests.conftest import tiny
from tests.distributed.helpers import REPO, clean_env, free_port
from trainer.checkpointing import load_checkpoint


def _launch(*args):
    return [sys.executable, "-m", "launch.cli", "launch", "torchrun", *args]


def test_dry_run_prints_the_torchrun_command(capsys):
    rc = main(["launch", "torchrun", "gan_digits", "--nodes", "2", "--gpus-per-node", "4", "--node-rank", "1",
               "--master", "10.1.2.3:29555", "--timeout", "60", "--dry-run", "trainer.max_iters=7", "data.batch_size=64"])
    assert rc == 0
    out = capsys.readouterr().out.strip().split()
    assert out[0].endswith("torchrun") or out[1:3] == ["-m", "torch.distributed.run"]
    joined = " ".join(out)
    for flag in ("--nnodes 2", "--nproc-per-node 4", "--node-rank 1", "--master-addr 10.1.2.3",
                 "--master-port 29555", "--rdzv-conf timeout=60", "--max-restarts 0",
                 "-m launch.cli train gan_digits trainer.max_iters=7 data.batch_size=64",
                 "trainer.num_nodes=2", "trainer.devices=4", "trainer.dist_timeout_s=60",
                 "logging.run_id=torchrun-10.1.2.3-29555"):
        assert flag in joined, flag
    # every node derives the same run id; an explicit one wins
    other = build_command("gan_digits", 2, 4, 0, "10.1.2.3:29555")
    assert "logging.run_id=torchrun-10.1.2.3-29555" in other
    mine = build_command("gan_digits", 2, 4, 0, "10.1.2.3:29555", ["logging.run_id=abc"])
    assert [a for a in mine if a.startswith("logging.run_id=")] == ["logging.run_id=abc"]
    assert "--standalone" in build_command("gan_digits", 1, 2)


def test_launch_options_default_to_the_configs_launch_section_and_the_config_is_checked_first(capsys, tmp_path):
    rc = main(["launch", "torchrun", "gan_digits", "--master", "10.1.2.3:29555", "--node-rank", "0", "--dry-run",
               "launch.nodes=2", "launch.gpus_per_node=3"])
    assert rc == 0
    joined = capsys.readouterr().out
    assert "--nnodes 2" in joined and "--nproc-per-node 3" in joined
    rc = main(["launch", "torchrun", "gan_digits", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
               "launch.nodes=2"])  # the flags win
    assert rc == 0 and "--nproc-per-node 2" in capsys.readouterr().out
    assert main(["launch", "torchrun", "gan_digits", "--dry-run", "optim.d.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.d.lrr" in err and "Traceback" not in err
    # genscale launch slurm: the same defaults (the script is written, not submitted)
    assert main(["launch", "slurm", "gan_digits", f"logging.root={tmp_path}", "launch.nodes=2",
                 "launch.partition=gpuq", "launch.time=01:00:00", "logging.run_id=s"]) == 0
    script = (tmp_path / "gan_digits" / "s" / "launch.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpuq" in script and "--time=01:00:00" in script
    assert script.count("logging.run_id=") == 1 and script.count("logging.root=") == 1  # set once, by the script
    # launching again into that run id with other settings would overwrite its script: refused
    assert main(["launch", "slurm", "gan_digits", f"logging.root={tmp_path}", "logging.run_id=s"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=2, gpus_per_node=1), "needs --master"),
    (dict(nodes=2, gpus_per_node=1, master="10.0.0.1"), "not ADDR:PORT"),
    (dict(nodes=2, gpus_per_node=1, master="10.0.0.1:29500"), "needs --node-rank"),
    (dict(nodes=2, gpus_per_node=1, master="10.0.0.1:29500", node_rank=2), "out of range"),
    (dict(nodes=1, gpus_per_node=2, overrides=["trainer.devices=4"]), "contradicts"),
    (dict(nodes=1, gpus_per_node=0), "at least 1"),
])
def test_bad_launch_requests_are_refused(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        build_command("gan_digits", **kwargs)


def test_bad_launch_request_exits_2_with_a_message(capsys):
    assert main(["launch", "torchrun", "gan_digits", "--nodes", "2", "--dry-run"]) == 2
    assert "--master" in capsys.readouterr().err


# A worker that aborts in C++ right after the process group forms ("terminate called without an active
# exception", exit -6): seen once in a full CI run (bb06a9d), never in isolation (0 of 5 reruns); torch's
# gloo/elastic start-up, not genscale. Such an attempt is retried once in a fresh run directory.
GLOO_START_ABORT = "terminate called without an active exception"


def _two_nodes(tmp_path, overrides):
    """Starts both nodes; as soon as one fails the other is stopped (instead of waiting out torch elastic's
    exit barrier). Returns (returncodes, outputs, port)."""
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in (0, 1)]  # files, not pipes: polling never blocks them
    nodes = [subprocess.Popen(_launch("gan_digits", "--nodes", "2", "--gpus-per-node", "1", "--node-rank", str(r),
                                      "--master", f"127.0.0.1:{port}", "--timeout", "120", *overrides),
                              cwd=REPO, env=clean_env(), stdout=logs[r], stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    # Training takes about 12 s. The limit is above torch elastic's exit barrier (300 s), where an agent
    # waits for the other node's agent at the end: once in a CI run (f331fc4) node 0's agent stayed there
    # after both workers had finished and checkpointed.
    deadline = time.monotonic() + 360
    try:
        while any(p.poll() is None for p in nodes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in nodes):
                break  # one node failed: the other would only wait for it
            time.sleep(0.5)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p in nodes:
        p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    return [p.returncode for p in nodes], outs, port


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_checkpoint_together(tmp_path):
    for attempt in (1, 2):
        root = tmp_path / f"attempt{attempt}"
        overrides = tiny(root, "trainer.accelerator=cpu", "trainer.max_iters=4", "trainer.sample_every=0",
                          "trainer.checkpoint.every_n_iters=0", "data.batch_size=16", "trainer.log_every=1")
        rcs, outs, port = _two_nodes(root, overrides)
        if attempt == 1 and rcs != [0, 0] and any(GLOO_START_ABORT in out for out in outs):
            continue
        break
    for r, (rc, out) in enumerate(zip(rcs, outs)):
        assert rc == 0, f"node {r} failed (exit {rc}):\n{out[-4000:]}"
    assert "GLOBAL_RANK: 1" in outs[1] and "MEMBER: 2/2" in outs[1]  # node 1 ran global rank 1 of 2
    runs = list((root / "runs" / "gan_digits").iterdir())
    assert [r.name for r in runs] == [f"torchrun-127.0.0.1-{port}"]
    ckpts = sorted(p.name for p in (runs[0] / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["iter-0000004.ckpt", "last.ckpt"]  # one checkpoint, written once
    meta = load_checkpoint(runs[0] / "checkpoints" / "last.ckpt")["genscale"]
    assert meta["iteration"] == 4 and meta["config"]["trainer"]["num_nodes"] == 2


@pytest.mark.slow
def test_a_rendezvous_that_nobody_answers_fails_in_bounded_time(tmp_path):
    """Node rank 1 pointed at a master nobody listens on, and node rank 0 whose peer never comes:
    both fail after about --timeout seconds with a message, never hang."""
    ports = free_port(), free_port()
    t0 = time.monotonic()
    procs = [subprocess.Popen(_launch("gan_digits", "--nodes", "2", "--gpus-per-node", "1", "--node-rank", str(r),
                                      "--master", f"127.0.0.1:{port}", "--timeout", "5", "trainer.accelerator=cpu",
                                      *tiny(tmp_path)),
                              cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, port in zip((1, 0), ports)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    assert all(p.returncode != 0 for p in procs)
    assert f"node rank 1 could not meet the other nodes at 127.0.0.1:{ports[0]} within 5 s" in errs[0], errs[0][-2000:]
    assert f"node rank 0 could not meet the other nodes at 127.0.0.1:{ports[1]} within 5 s" in errs[1], errs[1][-2000:]
    assert elapsed < 60
    assert not list((tmp_path / "runs").glob("*/*/checkpoints"))  # no training happened


def test_the_slurm_script_asks_for_what_lightning_and_the_resume_need(tmp_path):
    """render_script is the whole job: one task per GPU (Lightning's SLURM environment requires it),
    GPUs per node, the early signal and requeue that preemption relies on, and resume=auto in the fixed
    run directory. Checked line by line here; tests/slurm runs such a script on a real controller."""
    from launch.slurm import render_script

    run_dir = tmp_path / "runs" / "gan_digits" / "x"
    text = render_script("gan_digits", 2, 4, run_dir, "x", ["optim.g.lr=0.001", "logging.run_id=x"],
                         partition="gpuq", time="02:00:00", account="proj", cpus_per_task=8)
    lines = text.splitlines()
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --partition=gpuq", "#SBATCH --time=02:00:00", "#SBATCH --account=proj",
                 f"#SBATCH --output={run_dir}/slurm-%j.out"):
        assert want in lines, want
    (srun,) = [x for x in lines if x.startswith("srun ")]
    for want in ("train gan_digits", "optim.g.lr=0.001", "trainer.num_nodes=2", "trainer.devices=4",
                 f"logging.root={tmp_path / 'runs'}", "logging.run_id=x", "resume=auto"):
        assert want in srun, want
    assert "--gpus-per-node" not in render_script("gan_digits", 1, 2, run_dir, "x", [], gpu=False)


def test_a_slurm_sweep_submits_one_array_task_per_trial(tmp_path, monkeypatch, sweep_file):
    """With a stand-in sbatch on PATH (it records its argument): 4 trials give --array=0-3, each task's
    command resumes its own run (resume=auto, run id <id>-NNN)."""
    import json
    import os
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch.args\necho 4242\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["sweep", str(sweep_file()), "--backend", "slurm", "--id", "arr", "--root", str(tmp_path)]) == 0
    sweep_dir = tmp_path / "sweeps" / "arr"
    script = (sweep_dir / "array.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@90" in script
    assert "export GENSCALE_RUN_ID=arr-$(printf %03d $SLURM_ARRAY_TASK_ID)" in script
    cmds = sorted((sweep_dir / "trials").glob("*.cmd"))
    assert [c.name for c in cmds] == ["0.cmd", "1.cmd", "2.cmd", "3.cmd"]
    assert all("resume=auto" in c.read_text() for c in cmds)
    assert [json.loads(x)["run_id"] for x in (sweep_dir / "trials.jsonl").read_text().splitlines()] == \
        ["arr-000", "arr-001", "arr-002", "arr-003"]
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(sweep_dir / "array.sbatch")]
