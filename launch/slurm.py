"""`genscale launch slurm`: writes an sbatch script into the run directory and, with --submit, submits it.

    genscale launch slurm EXPERIMENT --nodes N --gpus-per-node G [--partition P] [--time T]
                          [--account A] [--submit] [key=value ...]

The script runs one task per GPU (`--ntasks-per-node` = G, as Lightning's SLURM environment
requires) through srun, asks SLURM for SIGUSR1 90 s before the time limit (genscale then writes a
checkpoint at the end of the current step and requeues the job), and trains with a fixed run
directory and `resume=auto`, so a requeued or restarted job continues from the newest complete
checkpoint. The run id is fixed when the script is written, and the W&B run id derives from it
(`<experiment>-<run id>`, unless logging.wandb_id is given), so a requeued or resubmitted job
continues the same W&B run.
With `trainer.accelerator=cpu` the script asks for no GPUs (CPU clusters and tests).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from launch.torchrun import LaunchError, _override


def _run_dir(experiment: str, overrides: List[str]) -> tuple:
    """Validates the whole config now (a typo fails here, not in the queue) and fixes the run id."""
    from trainer.config import load_config

    cfg = load_config(experiment, overrides)
    # a random part: two launches in the same second must not share a directory
    run_id = cfg.logging.run_id or f"slurm-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    run_dir = Path(cfg.logging.root).resolve() / cfg.experiment / run_id
    if (run_dir / "config.yaml").exists() and not (run_dir / "launch.sbatch").exists():
        raise LaunchError(f"Run directory {run_dir} already holds a run that was not launched with SLURM; "
                          "choose a new logging.run_id.")
    return cfg, run_id, run_dir


def render_script(experiment: str, nodes: int, gpus_per_node: int, run_dir: Path, run_id: str,
                  overrides: List[str], partition: str = "", time: str = "", account: str = "",
                  cpus_per_task: int = 0, gpu: bool = True) -> str:
    sb = [f"--job-name=genscale-{Path(experiment).stem}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
          "--signal=USR1@90", "--requeue", "--open-mode=append", f"--output={run_dir}/slurm-%j.out"]
    if gpu:
        sb.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        sb.append(f"--cpus-per-task={cpus_per_task}")
    sb += [f"--partition={partition}"] * bool(partition) + [f"--time={time}"] * bool(time)
    sb += [f"--account={account}"] * bool(account)
    # the script sets the run id, root and resume itself: a user's logging.run_id=... is not repeated
    overrides = [o for o in overrides if not o.startswith(("logging.run_id=", "logging.root=", "resume="))]
    train = [sys.executable, "-m", "launch.cli", "train", experiment, *overrides, f"trainer.num_nodes={nodes}",
             f"trainer.devices={gpus_per_node}", f"logging.root={run_dir.parent.parent}",
             f"logging.run_id={run_id}", "resume=auto"]
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb), "",
             "# Written by `genscale launch slurm`. A requeued job (SIGUSR1 before the time limit, or",
             "# `scontrol requeue`) reruns this script and resumes from the newest complete checkpoint.",
             "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
             'echo "genscale: job ${SLURM_JOB_ID} start $(date -Is) restart=${SLURM_RESTART_COUNT:-0}"',
             f"srun --kill-on-bad-exit=1 {shlex.join(train)}"]
    return "\n".join(lines) + "\n"


def submit(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch was not found on PATH: run this on a SLURM login node, or drop --submit and "
                          f"submit {script} yourself.")
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip().split(";")[0]


def cmd_slurm(args) -> int:
    overrides = list(args.overrides)
    try:
        for key in ("trainer.num_nodes", "trainer.devices", "resume"):
            if _override(overrides, key) is not None:
                raise LaunchError(f"Drop the {key}= override: the SLURM launcher sets it.")
        cfg, run_id, run_dir = _run_dir(args.experiment, overrides)
        la = cfg.launch  # the options not given on the command line come from the config's launch section
        nodes = args.nodes if args.nodes is not None else la.nodes
        gpus = args.gpus_per_node if args.gpus_per_node is not None else la.gpus_per_node
        if nodes < 1 or gpus < 1:
            raise LaunchError(f"--nodes and --gpus-per-node (launch.nodes, launch.gpus_per_node) must be at least 1 "
                              f"(got {nodes}, {gpus}).")
        gpu = cfg.trainer.accelerator != "cpu"
        script = render_script(args.experiment, nodes, gpus, run_dir, run_id, overrides,
                               args.partition if args.partition is not None else la.partition,
                               args.time if args.time is not None else la.time,
                               args.account if args.account is not None else la.account, args.cpus_per_task, gpu)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "launch.sbatch"
        if path.exists() and path.read_text() != script:
            raise LaunchError(f"{path} already holds this run's script, with other settings: resubmit it as it is "
                              f"(sbatch {path}), or choose a new logging.run_id for the new settings.")
        tmp = path.with_name(".launch.sbatch.tmp")
        tmp.write_text(script)
        os.replace(tmp, path)
        job = submit(path) if args.submit else None
    except LaunchError as e:
        print(f"genscale launch slurm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"script": str(path), "run_dir": str(run_dir), "job_id": job}))
    return 0


def add_parser(launch_subparsers) -> argparse.ArgumentParser:
    s = launch_subparsers.add_parser(
        "slurm", help="write (and --submit) an sbatch script for EXPERIMENT",
        description=("Writes <run dir>/launch.sbatch for EXPERIMENT on N nodes x G GPUs (one task per GPU, srun, "
                     "SIGUSR1 90 s before the limit -> checkpoint and requeue, resume=auto) and, with --submit, "
                     "submits it and prints the job id. key=value overrides go to `genscale train`."))
    s.add_argument("experiment", help="experiment name or path to a .yaml")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.add_argument("--nodes", type=int, default=None, help="default: the config's launch.nodes (1)")
    s.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node = tasks per node; default: the config's launch.gpus_per_node (1)")
    s.add_argument("--partition", default=None, help="default: the config's launch.partition")
    s.add_argument("--time", default=None, help="time limit, e.g. 24:00:00; default: the config's launch.time")
    s.add_argument("--account", default=None, help="default: the config's launch.account")
    s.add_argument("--cpus-per-task", type=int, default=0)
    s.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    s.set_defaults(fn=cmd_slurm, takes_overrides=True)
    return s
