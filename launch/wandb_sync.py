"""`genscale sync RUN_DIR [RUN_DIR ...]`: uploads a run's offline W&B runs with `wandb sync`.

A resumed or requeued run has one offline directory per process start, all with the same run id;
`wandb sync` uploads them in order of start time into that one W&B run."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

from trainer.tracking import offline_runs


class SyncError(ValueError):
    pass


def sync_command(run_dirs: List[str], project: str = "", entity: str = "", dry_run: bool = False) -> List[str]:
    dirs = []
    for d in run_dirs:
        if not Path(d).is_dir():
            raise SyncError(f"'{d}' is not a directory: give a run directory (runs/<experiment>/<run_id>/).")
        found = offline_runs(d)
        if not found:
            raise SyncError(f"'{d}' holds no offline W&B runs (no {Path(d) / 'wandb'}/offline-run-*). Runs log "
                            "offline unless logging.wandb=false (or WANDB_MODE=disabled); online runs are "
                            "uploaded already.")
        dirs += [str(p) for p in found]
    cmd = [sys.executable, "-m", "wandb", "sync", "--yes"]
    cmd += ["--project", project] * bool(project) + ["--entity", entity] * bool(entity)
    return cmd + ["--dry-run"] * dry_run + dirs


def cmd_sync(args) -> int:
    try:
        cmd = sync_command(args.runs, args.project, args.entity, args.dry_run)
    except SyncError as e:
        print(f"genscale sync: error: {e}", file=sys.stderr)
        return 2
    print(f"genscale sync: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


def add_parser(sp) -> argparse.ArgumentParser:
    s = sp.add_parser("sync", help="upload a run's offline W&B runs (wraps `wandb sync`)",
                      description=__doc__.split("\n\n")[0] + " Needs an API key (`wandb login` or WANDB_API_KEY).")
    s.add_argument("runs", nargs="+", help="run directories")
    s.add_argument("--project", default="", help="upload into this project instead of the run's own")
    s.add_argument("--entity", default="", help="upload into this entity instead of the run's own")
    s.add_argument("--dry-run", action="store_true", help="show what would be uploaded, upload nothing")
    s.set_defaults(fn=cmd_sync)
    return s
