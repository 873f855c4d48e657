"""`genscale launch slurm` against a real one-node SLURM cluster (slurmctld, slurmd, munge), started
by tests/slurm/start_cluster.sh: a 2-task job trains to completion; a job that receives SIGUSR1
writes a checkpoint, requeues itself and finishes from that checkpoint."""
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.checkpointing import load_checkpoint

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster():
    res = subprocess.run(["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"could not start the local SLURM cluster:\n{res.stdout}\n{res.stderr}"


def _launch(root, max_iters, *extra):
    cmd = [sys.executable, "-m", "launch.cli", "launch", "slurm", "gan_digits", "--nodes", "1", "--gpus-per-node",
           "2", "--submit", "trainer.accelerator=cpu", f"logging.root={root}", f"trainer.max_iters={max_iters}",
           "logging.wandb=false", "trainer.progress_bar=false", "trainer.cpu_threads=1", "trainer.log_every=1", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"\d+", info["job_id"])
    return info["job_id"], Path(info["run_dir"])


def _state(job):
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _wait(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _iterations(run_dir):
    if not (run_dir / "metrics.csv").exists():
        return []
    with open(run_dir / "metrics.csv") as fh:
        return [int(float(r["iteration"])) for r in csv.DictReader(fh) if r.get("g/loss")]


def test_two_task_job_runs_to_completion(cluster, tmp_path):
    job, run_dir = _launch(tmp_path, 6)
    script = (run_dir / "launch.sbatch").read_text()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "srun ",
                 "resume=auto"):
        assert line in script
    assert "wandb_id" not in script  # the default, <experiment>-<run id>, is fixed with the run id
    _wait(lambda: _state(job) == "", 300, f"job {job} to finish")
    out = (run_dir / f"slurm-{job}.out").read_text()
    ckpt = load_checkpoint(run_dir)
    assert ckpt["genscale"]["iteration"] == 6, out[-3000:]
    assert ckpt["genscale"].get("world_size", 2) == 2
    assert "Starting with 2 processes" in out


def test_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    total = 300
    job, run_dir = _launch(tmp_path, total, "trainer.checkpoint.every_n_iters=100000")
    # csv rows are flushed every 10 iterations: wait until training is under way, then signal the tasks
    _wait(lambda: len(_iterations(run_dir)) >= 10, 300, "training to start")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait(lambda: "requeueing SLURM job" in (run_dir / f"slurm-{job}.out").read_text(), 120, "the requeue")
    # A requeued job waits ~2 min (BeginTime) before it may start again; let it start now.
    _wait(lambda: _state(job) == "PENDING", 120, "the job to be pending again")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _wait(lambda: _state(job) == "", 600, f"job {job} to finish after the requeue")
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "restart=0" in out and "restart=1" in out, out[-3000:]
    saved = int(re.search(r"written at iteration (\d+)", out).group(1))
    assert 0 < saved < total
    resumed = load_checkpoint(run_dir / "checkpoints" / f"iter-{saved:07d}.ckpt")["genscale"]
    final = load_checkpoint(run_dir)["genscale"]
    assert final["iteration"] == total and resumed["iteration"] == saved
    # the counters prove a continuation, not a restart: images seen add up over both parts
    assert final["images_seen"] == total * 32
    assert list(run_dir.glob("config.resume-*.yaml"))
    its = _iterations(run_dir)
    assert its == sorted(set(its)) and its[-1] == total


def test_slurm_sweep_is_a_job_array(cluster, tmp_path, sweep_file):
    spec = sweep_file()
    res = subprocess.run([sys.executable, "-m", "launch.cli", "sweep", str(spec), "--backend", "slurm", "--id", "a1",
                          "--root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout.strip().splitlines()[-1])["array_job_id"]
    array = (tmp_path / "sweeps" / "a1" / "array.sbatch").read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --signal=USR1@90", "#SBATCH --requeue"):
        assert line in array
    assert "resume=auto" in (tmp_path / "sweeps" / "a1" / "trials" / "0.cmd").read_text()  # a requeue continues
    _wait(lambda: _state(job) == "", 600, f"array job {job} to finish")
    runs = sorted((tmp_path / "runs" / "gan_digits").iterdir())
    assert [p.name for p in runs] == [f"a1-{i:03d}" for i in range(4)]  # the trial ids, not the job ids
    widths = sorted(yaml.safe_load((r / "config.yaml").read_text())["model"]["g_width"] for r in runs)
    assert widths == [8, 8, 16, 16]
    assert all(load_checkpoint(r)["genscale"]["iteration"] == 2 for r in runs)
