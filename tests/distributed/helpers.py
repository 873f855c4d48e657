"""Starting the distributed tests' worker processes: each rank its own process, forked from a server
that has imported the heavy libraries once (tests/distributed/forked.py says why)."""
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GENSCALE_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


_CONTEXT = None


def _forkserver():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["tests.distributed.forked"])
    return _CONTEXT


def _run_script(script: str, argv: list, env: dict, log: str) -> None:
    """In the forked worker: the environment, directory, argv and output a `python script argv` launch
    would have, then the script as __main__; its exit status is the process's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))  # as for `python script` (the parent's path, REPO in it, follows)
    multiprocessing.set_start_method(None, force=True)  # unset, as in a fresh process: not the forkserver's
    code = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    import atexit

    atexit._run_exitfuncs()  # what the interpreter's exit runs (W&B's, torch's ...); a Process's bootstrap would not
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedWorker:
    """A worker forked from the preloaded server (tests/distributed/forked.py), with the part of
    subprocess.Popen's interface the tests use: communicate (its output), poll, kill, returncode."""

    def __init__(self, script: Path, argv: list, env: dict):
        fd, self.log = tempfile.mkstemp(prefix="worker-", suffix=".log")
        os.close(fd)
        self.process = _forkserver().Process(target=_run_script, args=(str(script), [str(a) for a in argv], env,
                                                                       self.log))
        self.process.start()

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def communicate(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.process), timeout)
        with open(self.log) as fh:
            text = fh.read()
        os.unlink(self.log)
        return text, None


def start_worker(out: Path, experiment: str, *overrides: str, flags=()) -> ForkedWorker:
    return ForkedWorker(WORKER, [*flags, out, experiment, *overrides], clean_env())


def finish(proc, timeout: float = 240) -> str:
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
    """Starts all ranks at once, as torchrun would (Lightning then launches nothing itself), each a
    process forked from the preloaded server."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = clean_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), NODE_RANK="0",
                   LOCAL_RANK=str(r))
        procs.append(ForkedWorker(WORKER, [*flags, out, experiment, *overrides, f"trainer.devices={world}"], env))
    return procs


def finish_all(procs: list, timeout: float = 240) -> None:
    try:
        for p in procs:
            finish(p, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
