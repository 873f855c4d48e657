import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GENSCALE_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def start_worker(out: Path, experiment: str, *overrides: str, flags=()) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), *flags, str(out), experiment, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        raise AssertionError(f"worker timed out after {timeout} s:\n{text[-4000:]}")
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{text[-4000:]}"
    return text


def run_worker(out: Path, experiment: str, *overrides: str, flags=(), timeout: float = 240) -> str:
    return finish(start_worker(out, experiment, *overrides, flags=flags), timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, experiment: str, *overrides: str, world: int = 2, flags=()) -> list:
    """Starts all ranks at once, as torchrun would (Lightning then launches nothing itself): their
    imports overlap instead of rank 1 starting only when rank 0 reaches fit."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = clean_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), NODE_RANK="0",
                   LOCAL_RANK=str(r))
        cmd = [sys.executable, str(WORKER), *flags, str(out), experiment, *overrides, f"trainer.devices={world}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish_all(procs: list, timeout: float = 240) -> None:
    try:
        for p in procs:
            finish(p, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
