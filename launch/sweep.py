"""`genscale sweep SWEEP.yaml --backend {local,slurm,wandb}`: runs a W&B-format sweep.

The YAML is W&B's sweep format, so one file serves all three backends:

    program: launch/cli.py                 # informational here
    method: random                         # grid or random
    run_cap: 8                             # random: number of trials (or --count)
    parameters:
      optim.d.lr: {values: [1.0e-4, 2.0e-4]}
      model.g_width: {values: [8, 16]}
      trainer.seed: {distribution: int_uniform, min: 0, max: 100}
      trainer.max_iters: {value: 500}
    command:
      - ${env}
      - ${interpreter}
      - -m
      - launch.cli
      - train
      - gan_mnist5k
      - ${args_no_hyphens}

(a grid sweep takes `values` or `value` only.) The file is checked before anything runs: every
parameter's values, the command's ${args_no_hyphens}, and each trial's config (unknown keys, bad values).

Every trial is the command with ${args_no_hyphens} replaced by its `key=value` overrides (the same
form as `genscale train` takes). `local` runs the trials one after another (or --parallel N at once,
each with its share of the visible GPUs, or without GPUs of the CPU cores, and its output in
trial-NNN.log), `slurm` submits them as
one job array, `wandb` creates the sweep on the W&B server and runs an agent (online only).
Each sweep writes runs/sweeps/<id>/ with the sweep file and one line per trial in trials.jsonl.
A local sweep that was stopped continues with `--resume --id <id>`: finished trials are kept, the
others run again with resume=auto added, from their runs' newest checkpoints.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from launch.torchrun import LaunchError

DEFAULT_COMMAND = ["${env}", "${interpreter}", "-m", "launch.cli", "train", "${args_no_hyphens}"]


def load_sweep(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise LaunchError(f"Sweep file '{path}' does not exist.")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"Cannot parse sweep file '{path}': {e}") from None
    if not isinstance(spec, dict):
        raise LaunchError(f"Sweep file '{path}' must be a mapping (method, parameters, command), not a "
                          f"{type(spec).__name__}.")
    if spec.get("method", "grid") not in ("grid", "random"):
        raise LaunchError(f"Sweep method '{spec.get('method')}' is not supported here: use grid or random.")
    if not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise LaunchError(f"Sweep file '{path}' has no 'parameters' mapping (dotted config keys -> values).")
    for name, p in spec["parameters"].items():
        _check_parameter(str(name), p)
    command = spec.get("command") or DEFAULT_COMMAND
    if not isinstance(command, list) or not {"${args_no_hyphens}", "${args}"} & set(map(str, command)):
        raise LaunchError("The sweep's command must be a list holding ${args_no_hyphens} (or ${args}), where each "
                          "trial's key=value overrides go; without it every trial would run the same config.")
    return spec


def _check_parameter(name: str, p) -> None:
    """One parameter of the sweep: {value: v}, {values: [non-empty list]} or a distribution with numbers."""
    if not isinstance(p, dict):
        raise LaunchError(f"Parameter '{name}': give a mapping such as {{values: [...]}} or {{value: v}}, not {p!r}.")
    if "value" in p:
        return
    if "values" in p:
        if not isinstance(p["values"], list) or not p["values"]:
            raise LaunchError(f"Parameter '{name}': 'values' must be a non-empty list, got {p['values']!r}.")
        return
    dist = p.get("distribution", "uniform")
    if dist not in ("uniform", "int_uniform", "log_uniform_values"):
        raise LaunchError(f"Parameter '{name}': distribution '{dist}' is not supported (values, value, uniform, "
                          "int_uniform, log_uniform_values).")
    try:
        lo, hi = float(p["min"]), float(p["max"])
    except (KeyError, TypeError, ValueError):
        raise LaunchError(f"Parameter '{name}': distribution {dist} needs numbers 'min' and 'max', got "
                          f"min={p.get('min')!r} max={p.get('max')!r}.") from None
    if lo > hi or (dist == "log_uniform_values" and lo <= 0):
        raise LaunchError(f"Parameter '{name}': need min <= max{' and min > 0' if dist == 'log_uniform_values' else ''} "
                          f"for {dist}, got min={lo} max={hi}.")


def _draw(name: str, p: dict, rng: random.Random):
    if "value" in p:
        return p["value"]
    if "values" in p:
        return rng.choice(p["values"])
    dist = p.get("distribution", "uniform")
    if dist == "int_uniform":
        return rng.randint(int(p["min"]), int(p["max"]))
    if dist == "uniform":
        return rng.uniform(float(p["min"]), float(p["max"]))
    if dist == "log_uniform_values":
        import math

        return math.exp(rng.uniform(math.log(float(p["min"])), math.log(float(p["max"]))))
    raise LaunchError(f"Parameter '{name}': distribution '{dist}' is not supported (values, value, uniform, "
                      "int_uniform, log_uniform_values).")


def expand(spec: dict, count: Optional[int] = None, seed: int = 0) -> List[Dict[str, object]]:
    """The trials' parameter assignments: the grid's cartesian product, or `count` random draws."""
    params = spec["parameters"]
    names = sorted(params)
    if spec.get("method", "grid") == "grid":
        for n in names:
            if not ({"value", "values"} & set(params[n])):
                raise LaunchError(f"Grid sweeps need 'values' or 'value' for every parameter; '{n}' has neither.")
        axes = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*axes)]
    count = count if count is not None else spec.get("run_cap")
    if not isinstance(count, int) or count < 1:
        got = "neither was given" if count is None else f"got {count!r}"
        raise LaunchError(f"A random sweep needs a number of trials of at least 1 (run_cap in the file or --count N): "
                          f"{got}.")
    rng = random.Random(seed)
    return [{n: _draw(n, params[n], rng) for n in names} for _ in range(int(count))]


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def command_for(spec: dict, assignment: Dict[str, object], extra: tuple = ()) -> List[str]:
    args = [f"{k}={_fmt(v)}" for k, v in assignment.items()] + list(extra)
    out: List[str] = []
    for tok in spec.get("command") or DEFAULT_COMMAND:
        if tok == "${env}":
            continue
        elif tok == "${interpreter}":
            out.append(sys.executable)
        elif tok == "${program}":
            out.append(str(spec.get("program", "")))
        elif tok == "${args_no_hyphens}":
            out += args
        elif tok == "${args}":
            out += [f"--{a}" for a in args]
        else:
            out.append(str(tok))
    return out


def check_trial_configs(spec: dict, trials: List[dict]) -> None:
    """Each trial's config, loaded as `genscale train` will load it, so an unknown key or a bad value fails
    here and not in every trial (or in a queued job array). Commands that do not run `launch.cli train`
    are left alone."""
    from trainer.config import ConfigError, load_config

    command = [str(t) for t in spec.get("command") or DEFAULT_COMMAND]
    if "launch.cli" not in command or "train" not in command[command.index("launch.cli"):]:
        return
    rest = command[command.index("train", command.index("launch.cli")) + 1:]
    fixed = [t for t in rest if "=" in t and not t.startswith("$")]
    experiment = next((t for t in rest[:1] if "=" not in t and not t.startswith(("$", "-"))), None)
    for i, assignment in enumerate(trials):
        try:
            load_config(experiment, fixed + [f"{k}={_fmt(v)}" for k, v in assignment.items()])
        except ConfigError as e:
            raise LaunchError(f"trial {i} ({assignment}): {e}") from None


def _sweep_dir(root: str, sweep_id: str, spec_path: str) -> Path:
    d = Path(root) / "sweeps" / sweep_id
    d.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(spec_path, d / "sweep.yaml")
    return d


def visible_gpus() -> List[str]:
    """The GPUs trials may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's indices (no torch import)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def slot_gpus(slot: int, parallel: int, gpus: List[str]) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for concurrent slot ``slot`` of ``parallel``: an equal, disjoint share of
    ``gpus``; None (the environment as it is) when there are fewer GPUs than slots to share out."""
    per = len(gpus) // parallel
    return ",".join(gpus[slot * per:(slot + 1) * per]) if per else None


def trial_threads(parallel: int, n_gpus: int, cores: int, omp_env: Optional[str]) -> Optional[int]:
    """OMP_NUM_THREADS for concurrent CPU trials: the cores split among them (torch's intra-op threads
    default to every core, so N trials would each start that many and oversubscribe the machine). None
    (left as it is) for one trial at a time, when trials have GPUs to themselves, or when set already."""
    if parallel <= 1 or n_gpus >= parallel or omp_env is not None:
        return None
    return max(1, cores // parallel)


def _stop_trials(running: dict, sweep_dir: Path, grace_s: float = 300.0) -> None:
    """Each running trial gets SIGTERM, which makes `genscale train` write a checkpoint at the end of its
    step and exit 3; the trial is waited for (killed after grace_s) and recorded, so `--resume`
    continues it from that checkpoint and no trial keeps writing its run directory unattended."""
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc, (_, record, out) in running.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _finish_trial(proc, record, out, sweep_dir)


def run_local(spec: dict, trials: List[dict], sweep_dir: Path, sweep_id: str, parallel: int = 1,
              skip: frozenset = frozenset(), extra: tuple = ()) -> int:
    """Runs the trials, up to ``parallel`` at once; each finished one appends its line to trials.jsonl.
    One at a time, a trial's output goes to the console; concurrently, to sweep_dir/trial-NNN.log.
    ``skip``: trial numbers already done (a resumed sweep); ``extra``: overrides added to every trial.
    SIGTERM or Ctrl-C stops the running trials at a checkpoint (exit 128 + the signal's number). The
    handlers only note the signal, and the loop acts on it between steps, so a signal can never land
    between a trial's start and its being tracked, nor interrupt the stop itself."""
    gpus = visible_gpus() if parallel > 1 else []
    threads = trial_threads(parallel, len(gpus), os.cpu_count() or 1, os.environ.get("OMP_NUM_THREADS"))
    pending = [(i, a) for i, a in enumerate(trials) if i not in skip]
    free, running, failed, stop = list(range(parallel)), {}, 0, []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (pending or running) and not stop:
            while pending and free and not stop:
                i, assignment = pending.pop(0)
                slot = free.pop(0)
                proc, record, out = _start_trial(spec, i, assignment, len(trials), sweep_dir, sweep_id,
                                                 slot_gpus(slot, parallel, gpus), parallel > 1, threads, extra)
                running[proc] = (slot, record, out)
            proc = _wait_any(running, stop)
            if proc is not None:
                slot, record, out = running.pop(proc)
                free.append(slot)
                failed += _finish_trial(proc, record, out, sweep_dir)
        if stop:
            print(f"genscale sweep: {signal.Signals(stop[0]).name}: stopping {len(running)} running trial(s) at a "
                  f"checkpoint; continue with: genscale sweep --resume --id {sweep_id}", file=sys.stderr, flush=True)
            _stop_trials(running, sweep_dir)
            running = {}
    finally:  # an error here: no trial keeps running unattended (each stops at a checkpoint)
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"sweep_dir": str(sweep_dir), "trials": len(trials), "run": len(trials) - len(skip),
                      "failed": failed, **({"stopped": signal.Signals(stop[0]).name} if stop else {})}))
    return 128 + int(stop[0]) if stop else (1 if failed else 0)


def _start_trial(spec: dict, i: int, assignment: dict, n: int, sweep_dir: Path, sweep_id: str,
                 devices: Optional[str], to_log: bool, threads: Optional[int] = None, extra: tuple = ()):
    cmd = command_for(spec, assignment, extra)
    # Not the SLURM job's variables: a local sweep may run inside an allocation, and a trial stopped by the
    # sweep would otherwise requeue that whole allocation (and report itself done) instead of stopping.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["GENSCALE_RUN_ID"] = f"{sweep_id}-{i:03d}"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    record = {"trial": i, "overrides": assignment, "command": cmd, "run_id": env["GENSCALE_RUN_ID"]}
    log = sweep_dir / f"trial-{i:03d}.log"
    notes = ([f"GPUs {devices}"] if devices else []) + ([f"output in {log}"] if to_log else [])
    if to_log and log.exists():  # a resumed sweep: the earlier attempt's output stays beside
        log.rename(sweep_dir / f"trial-{i:03d}.{_dt.datetime.now():%Y%m%d-%H%M%S}.log")
    print(f"genscale sweep: trial {i + 1}/{n}{' (' + '; '.join(notes) + ')' if notes else ''}: {shlex.join(cmd)}",
          flush=True)
    out = None
    if to_log:
        record["log"] = str(log)
        out = open(record["log"], "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    return proc, record, out


def _finish_trial(proc: subprocess.Popen, record: dict, out, sweep_dir: Path) -> bool:
    """Appends the finished trial's line to trials.jsonl; whether it failed."""
    if out:
        out.close()
    record["returncode"] = proc.returncode
    if proc.returncode and "log" in record:
        print(f"genscale sweep: trial {record['trial'] + 1} failed (exit {proc.returncode}); its output: "
              f"{record['log']}", flush=True)
    with open(sweep_dir / "trials.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return proc.returncode != 0


def _wait_any(running: dict, stop: list) -> Optional[subprocess.Popen]:
    """The first of the running trials to finish; None as soon as a stop signal has been noted."""
    while not stop:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.2)
    return None


def run_slurm(spec: dict, trials: List[dict], sweep_dir: Path, sweep_id: str, partition: str = "",
              time: str = "", gpus: int = 0) -> int:
    """One job array, a task per trial: ``gpus`` GPUs each (0: none, CPU trials), SIGUSR1 90 s before
    the time limit and requeue (genscale checkpoints and requeues), resume=auto in the trial's fixed run
    directory, so a requeued task continues instead of failing on its own directory."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch was not found on PATH: the slurm backend must run on a SLURM login node.")
    tdir = sweep_dir / "trials"
    tdir.mkdir()
    for i, assignment in enumerate(trials):
        (tdir / f"{i}.cmd").write_text(shlex.join(command_for(spec, assignment, ("resume=auto",))) + "\n")
        with open(sweep_dir / "trials.jsonl", "a") as fh:
            fh.write(json.dumps({"trial": i, "overrides": assignment, "run_id": f"{sweep_id}-{i:03d}"}) + "\n")
    head = [f"#SBATCH --job-name=genscale-sweep-{sweep_id}", f"#SBATCH --array=0-{len(trials) - 1}",
            "#SBATCH --ntasks=1", "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
            f"#SBATCH --output={sweep_dir}/slurm-%A_%a.out"]
    head += [f"#SBATCH --gpus-per-task={gpus}"] * bool(gpus)
    head += [f"#SBATCH --partition={partition}"] * bool(partition) + [f"#SBATCH --time={time}"] * bool(time)
    script = "\n".join(["#!/bin/bash", *head, "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}",
                        f"export GENSCALE_RUN_ID={sweep_id}-$(printf %03d $SLURM_ARRAY_TASK_ID)",
                        f'eval "$(cat {tdir}/${{SLURM_ARRAY_TASK_ID}}.cmd)"']) + "\n"
    (sweep_dir / "array.sbatch").write_text(script)
    res = subprocess.run(["sbatch", "--parsable", str(sweep_dir / "array.sbatch")], capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        raise LaunchError(f"sbatch refused the sweep array: {res.stderr.strip()}")
    job = res.stdout.strip().split(";")[0]
    print(json.dumps({"sweep_dir": str(sweep_dir), "trials": len(trials), "array_job_id": job}))
    return 0


def run_wandb(spec: dict, project: str) -> int:
    import wandb

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or not (
            os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").exists()):
        raise LaunchError("The wandb backend needs W&B online (a sweep lives on the W&B server): log in with "
                          "`wandb login` and unset WANDB_MODE=offline, or use --backend local or slurm.")
    sweep_id = wandb.sweep(sweep=spec, project=project)
    return subprocess.run([sys.executable, "-m", "wandb", "agent", f"{project}/{sweep_id}"]).returncode


def _resume_local(args) -> int:
    """`--resume --id ID`: the sweep as it was recorded (its saved file, count and seed); trials whose last
    attempt exited 0 are kept, the others run again with resume=auto, so each continues from its run's
    newest checkpoint (or starts afresh in its directory)."""
    sweep_dir = Path(args.root) / "sweeps" / (args.id or "")
    if not args.id or not (sweep_dir / "sweep.json").is_file():
        raise LaunchError(f"--resume needs the --id of a local sweep started here (with --root {args.root}): "
                          f"{sweep_dir} holds no sweep.json.")
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    spec = load_sweep(str(sweep_dir / "sweep.yaml"))
    trials = expand(spec, meta["count"], meta["seed"])
    last = {}
    if (sweep_dir / "trials.jsonl").exists():
        for line in (sweep_dir / "trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            last[rec["trial"]] = rec.get("returncode")
    done = frozenset(i for i, rc in last.items() if rc == 0)
    print(f"genscale sweep: resuming {sweep_dir}: {len(done)} of {len(trials)} trials done, "
          f"{len(trials) - len(done)} to run", flush=True)
    return run_local(spec, trials, sweep_dir, args.id, args.parallel, done, ("resume=auto",))


def _check_sweep_id(sweep_id: Optional[str]) -> None:
    """The id names sweeps/<id>/ and is the stem of every trial's run id: one directory name."""
    from trainer.config import ConfigError, check_run_id

    if sweep_id is not None:
        try:
            check_run_id(sweep_id, "--id")
        except ConfigError as e:
            raise LaunchError(str(e)) from None


def cmd_sweep(args) -> int:
    try:
        _check_sweep_id(args.id)
        if args.resume:
            if args.backend != "local":
                raise LaunchError("--resume is for local sweeps (a SLURM array's tasks resume themselves on requeue).")
            return _resume_local(args)
        spec = load_sweep(args.sweep)
        if args.backend == "wandb":
            return run_wandb(spec, args.project)
        if args.parallel < 1 or (args.parallel > 1 and args.backend != "local"):
            raise LaunchError(f"--parallel {args.parallel}: give a number of trials of at least 1, with --backend "
                              "local (a SLURM array's trials run as the scheduler places them).")
        if args.gpus < 0 or (args.gpus and args.backend != "slurm"):
            raise LaunchError(f"--gpus {args.gpus}: GPUs per trial, at least 0, for --backend slurm (locally, "
                              "--parallel shares out the visible GPUs).")
        trials = expand(spec, args.count, args.seed)
        check_trial_configs(spec, trials)
        sweep_id = args.id or f"sweep-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        sweep_dir = _sweep_dir(args.root, sweep_id, args.sweep)
        (sweep_dir / "sweep.json").write_text(json.dumps({"count": args.count, "seed": args.seed,
                                                           "backend": args.backend}) + "\n")
        if args.backend == "local":
            return run_local(spec, trials, sweep_dir, sweep_id, args.parallel)
        try:
            return run_slurm(spec, trials, sweep_dir, sweep_id, args.partition, args.time, args.gpus)
        except LaunchError:
            shutil.rmtree(sweep_dir, ignore_errors=True)  # nothing was submitted: the --id stays free
            raise
    except FileExistsError as e:
        print(f"genscale sweep: error: sweep directory {e.filename} exists: choose another --id, or continue that "
              f"sweep with --resume --id {Path(e.filename).name}.", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"genscale sweep: error: {e}", file=sys.stderr)
        return 2


def add_parser(sp) -> argparse.ArgumentParser:
    s = sp.add_parser("sweep", help="run a W&B-format sweep locally, as a SLURM job array, or on W&B",
                      description=__doc__.split("\n\n")[0] + " See launch/sweep.py for the file format.")
    s.add_argument("sweep", help="sweep YAML (W&B format); with --resume, ignored (the sweep's saved copy is used)")
    s.add_argument("--backend", choices=["local", "slurm", "wandb"], default="local")
    s.add_argument("--count", type=int, default=None, help="random sweeps: number of trials")
    s.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="local backend: trials run at once (default 1); each gets an equal share of the visible "
                        "GPUs when there are at least N (else of the CPU cores, as OMP_NUM_THREADS unless set), "
                        "and writes its output to trial-NNN.log in the sweep directory")
    s.add_argument("--seed", type=int, default=0, help="random sweeps: seed of the draws")
    s.add_argument("--id", default=None, help="sweep id (default: sweep-<time>)")
    s.add_argument("--root", default="runs", help="sweep records go to ROOT/sweeps/<id>/")
    s.add_argument("--partition", default="", help="slurm backend: partition")
    s.add_argument("--time", default="", help="slurm backend: time limit per trial")
    s.add_argument("--gpus", type=int, default=0, help="slurm backend: GPUs per trial (default 0: CPU trials)")
    s.add_argument("--resume", action="store_true",
                   help="local backend: continue the sweep --id: trials that finished are kept, the others run "
                        "again with resume=auto (from their newest checkpoints)")
    s.add_argument("--project", default="genscale", help="wandb backend: project")
    s.set_defaults(fn=cmd_sweep)
    return s
