"""`genscale launch torchrun`: builds (prints) and runs the torchrun command of a multi-process run.

    genscale launch torchrun EXPERIMENT --nodes N --gpus-per-node G [--node-rank R --master ADDR:PORT]
                             [--timeout S] [--dry-run] [key=value ...]

Run the same command on every node, changing only --node-rank. Every node then starts
``G`` processes of ``genscale train EXPERIMENT ... trainer.num_nodes=N trainer.devices=G
logging.run_id=ID``, where ID is the same on every node (an explicit ``logging.run_id=`` override,
$GENSCALE_RUN_ID or $SLURM_JOB_ID, else derived from the master address and port), so all ranks
write one run directory (only rank 0 writes in it).

``--timeout`` bounds every wait for the other nodes: torchrun's rendezvous (a master that does not
answer fails after it) and, through ``trainer.dist_timeout_s``, the process group and its
collectives. This module imports nothing heavy: a dry run is instant.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

DEFAULT_TIMEOUT_S = 900


class LaunchError(ValueError):
    """A launch request that cannot work; the message says what to change."""


def parse_master(value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--master '{value}' is not ADDR:PORT (e.g. --master 10.0.0.1:29500).")
    return host, int(port)


def _override(overrides: List[str], key: str) -> Optional[str]:
    vals = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return vals[-1] if vals else None


def run_id_for(overrides: List[str], nodes: int, master: Optional[Tuple[str, int]]) -> str:
    explicit = _override(overrides, "logging.run_id")
    if explicit:
        return explicit
    for var in ("GENSCALE_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var]
    if nodes > 1 and master is not None:  # every node computes the same id from the shared arguments
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"torchrun-{master[0]}-{master[1]}")
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def torchrun_executable() -> List[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def build_command(experiment: str, nodes: int, gpus_per_node: int, node_rank: Optional[int] = None,
                  master: Optional[str] = None, overrides: Optional[List[str]] = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> List[str]:
    overrides = list(overrides or [])
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(f"--nodes and --gpus-per-node must be at least 1 (got {nodes} and {gpus_per_node}).")
    if timeout_s <= 0:
        raise LaunchError(f"--timeout must be positive, got {timeout_s}.")
    for o in overrides:
        if "=" not in o or o.startswith("-"):
            raise LaunchError(f"'{o}' is not a key=value override (e.g. trainer.max_iters=100).")
    for key, want in (("trainer.num_nodes", nodes), ("trainer.devices", gpus_per_node)):
        given = _override(overrides, key)
        if given is not None and given != str(want):
            raise LaunchError(f"{key}={given} contradicts the launch ({'--nodes' if 'nodes' in key else '--gpus-per-node'} "
                              f"{want}); drop the override, the launcher sets it.")
    cmd = torchrun_executable() + ["--nnodes", str(nodes), "--nproc-per-node", str(gpus_per_node)]
    addr = None
    if master is None:
        if nodes > 1:
            raise LaunchError(f"--nodes {nodes} needs --master ADDR:PORT (an address of node rank 0 that every "
                              "node can reach, and a free port) and --node-rank on each node.")
        if node_rank not in (None, 0):
            raise LaunchError(f"--node-rank {node_rank} with a single node: node ranks go from 0 to --nodes - 1.")
        cmd += ["--standalone"]
    else:
        addr = parse_master(master)
        if node_rank is None:
            raise LaunchError("--master needs --node-rank (0 on the node at the master address, 1..N-1 elsewhere).")
        if not 0 <= node_rank < nodes:
            raise LaunchError(f"--node-rank {node_rank} is out of range for --nodes {nodes} (0..{nodes - 1}).")
        cmd += ["--node-rank", str(node_rank), "--master-addr", addr[0], "--master-port", str(addr[1]),
                "--rdzv-conf", f"timeout={int(timeout_s)}"]
    cmd += ["--max-restarts", "0", "-m", "launch.cli", "train", experiment, *overrides,
            f"trainer.num_nodes={nodes}", f"trainer.devices={gpus_per_node}", f"trainer.dist_timeout_s={timeout_s:g}"]
    if _override(overrides, "resume") is None and _override(overrides, "logging.run_id") is None:
        cmd.append(f"logging.run_id={run_id_for(overrides, nodes, addr)}")
    return cmd


_UNREACHABLE = re.compile(r"DistNetworkError|DistStoreError|timed out .*connect|waiting for clients|"
                          r"Connection refused|RendezvousTimeoutError|Socket Timeout|wait timeout", re.I)


def run(cmd: List[str], node_rank: Optional[int], master: Optional[str], timeout_s: float) -> int:
    """Runs torchrun, passing its output through; a failure to meet the other nodes is summarised."""
    unreachable = False
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            unreachable = unreachable or bool(_UNREACHABLE.search(line))
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    if rc != 0:
        if unreachable and master and node_rank == 0:
            print(f"genscale launch torchrun: error: node rank 0 could not meet the other nodes at {master} within "
                  f"{timeout_s:g} s: they did not join. Start the same command on every other node with its own "
                  "--node-rank, check that they can reach this address and port, or raise --timeout.", file=sys.stderr)
        elif unreachable and master:
            print(f"genscale launch torchrun: error: node rank {node_rank} could not meet the other nodes at "
                  f"{master} within {timeout_s:g} s. Start node rank 0 (the machine at that address) with the same "
                  "--nodes/--master, check the address, port and firewall, or raise --timeout.", file=sys.stderr)
        else:
            print(f"genscale launch torchrun: error: torchrun exited with code {rc} (its output is above).",
                  file=sys.stderr)
    return rc


def cmd_torchrun(args) -> int:
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.experiment, list(args.overrides))  # a bad config fails here, not on every rank
        nodes = args.nodes if args.nodes is not None else cfg.launch.nodes
        gpus = args.gpus_per_node if args.gpus_per_node is not None else cfg.launch.gpus_per_node
        cmd = build_command(args.experiment, nodes, gpus, args.node_rank, args.master, list(args.overrides),
                            args.timeout)
    except (LaunchError, ConfigError) as e:
        print(f"genscale launch torchrun: error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run(cmd, args.node_rank, args.master, args.timeout)


def add_parser(launch_subparsers) -> argparse.ArgumentParser:
    t = launch_subparsers.add_parser(
        "torchrun", help="run EXPERIMENT on N nodes x G processes with torchrun",
        description=("Prints and runs the torchrun command for EXPERIMENT. On several nodes, run it on each with "
                     "the same --nodes/--gpus-per-node/--master and its own --node-rank. key=value overrides "
                     "go to `genscale train`."))
    t.add_argument("experiment", help="experiment name or path to a .yaml")
    t.add_argument("overrides", nargs="*", help="key=value config overrides")
    t.add_argument("--nodes", type=int, default=None, help="number of nodes (default: the config's launch.nodes, 1)")
    t.add_argument("--gpus-per-node", type=int, default=None,
                   help="processes (GPUs) per node (default: the config's launch.gpus_per_node, 1)")
    t.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..nodes-1")
    t.add_argument("--master", default=None, help="ADDR:PORT of node rank 0 (needed for more than one node)")
    t.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds any process waits for the others before failing (default {DEFAULT_TIMEOUT_S})")
    t.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    t.set_defaults(fn=cmd_torchrun, takes_overrides=True)
    return t
