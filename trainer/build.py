"""The one assembly point: config -> (LightningModule, DataModule, Trainer) and the run directory."""
from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from data_pipelines.builtin import load_split
from data_pipelines.datamodule import ArrayDataModule, ShardDataModule
from models.registry import build_gan
from trainer.callbacks.artifacts import CheckpointArtifacts
from trainer.callbacks.data_stats import DataSkippedCallback
from trainer.callbacks.ema import EMACallback
from trainer.callbacks.preemption import PreemptionCallback
from trainer.callbacks.evaluation import PeriodicEvalCallback
from trainer.callbacks.samples import SampleGridCallback
from trainer.csv_log import AppendingCSVLogger
from trainer.checkpointing import (AtomicCheckpointIO, CheckpointError, IterationCheckpoint, iteration_in_name,
                                  load_checkpoint)
from trainer.config import ConfigError, check_run_id, ignored_settings, is_flow, load_config, to_dict, to_yaml
from trainer.gan_module import GANModule, NonFiniteLossError
from trainer.progress import ThroughputBar
from trainer.strategies.gan_ddp import STRATEGY_NAME as GAN_DDP, GANDDPStrategy
from trainer.tracking import KimgAxis, make_wandb_logger, wait_for_exit_record, wandb_loggers


class RunDirError(ValueError):
    """The run directory would overwrite an existing run."""


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    module: GANModule
    datamodule: ArrayDataModule
    trainer: L.Trainer
    ckpt_path: Optional[str]
    checkpointer: IterationCheckpoint
    sampler: SampleGridCallback
    fresh_dir: bool = False  # this process made run_dir: a failure before the first step removes it


def discard_unstarted(run_dir: Path, module) -> bool:
    """After a failure: remove a run directory this process made if nothing was trained into it (no
    step, no checkpoint), so the same logging.run_id can simply be run again. True if removed."""
    import shutil

    from trainer.counters import iteration_of

    ckpts = run_dir / "checkpoints"
    if (module is not None and iteration_of(module) > 0) or (ckpts.is_dir() and any(ckpts.iterdir())):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"genscale: the run failed before its first step, so its directory {run_dir} was removed "
          "(nothing had been trained); fix the cause and run the same command again.", file=sys.stderr, flush=True)
    return True


def default_run_id() -> str:
    # GENSCALE_RUN_ID first: a sweep's trial (or a rank joining rank 0) names its run inside a SLURM job too
    for var in ("GENSCALE_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return check_run_id(os.environ[var], f"${var}")
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def launched_follower() -> bool:
    """True in a process that a launcher started as a rank other than 0 (torchrun, srun, or
    Lightning re-running the script for devices > 1): it joins rank 0's run directory."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"]) != 0
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS") or 1) > 1:
        return int(env["SLURM_PROCID"]) != 0
    return int(env.get("LOCAL_RANK") or 0) != 0 or int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0) != 0


def auto_run_dir(experiment: Optional[str], overrides: List[str]) -> Path:
    """The run directory `resume=auto` looks in: it needs a fixed run id."""
    cfg = load_config(experiment, overrides)
    run_id = cfg.logging.run_id or os.environ.get("GENSCALE_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if not run_id:
        raise ConfigError("resume=auto needs a fixed run directory: set logging.run_id=ID "
                          "(`genscale launch slurm` does).")
    return Path(cfg.logging.root) / (cfg.experiment or "default") / run_id


def newest_checkpoint(run_dir: Path) -> Optional[str]:
    """The newest checkpoint of a run that loads completely (a torn or half-written one is passed over);
    last.ckpt last of all (a copy where the filesystem has no hard links, which can outlive torn iter files)."""
    cands = sorted((run_dir / "checkpoints").glob("iter-*.ckpt"), reverse=True)
    cands += [p for p in [run_dir / "checkpoints" / "last.ckpt"] if p.exists()]
    for path in cands:
        try:
            load_checkpoint(path)
            return str(path)
        except CheckpointError as e:
            print(f"genscale: skipping unusable checkpoint: {e.problem} Trying the next older one.", file=sys.stderr)
    return None


def _supersede_evals(run_dir: Path, iteration: int) -> None:
    """A run resumed at ``iteration`` drops the later rows of metrics.csv (that stretch of training is gone,
    and is trained again); its evaluations of those iterations move from eval.jsonl to
    eval.superseded.jsonl, so eval.jsonl describes the run's one history (and nothing is deleted)."""
    import json

    log = run_dir / "eval.jsonl"
    if not log.is_file():
        return
    keep, gone = [], []
    for line in log.read_text().splitlines():
        try:
            later = int(json.loads(line).get("iteration", -1)) > iteration
        except (ValueError, TypeError, AttributeError):
            later = False
        (gone if later else keep).append(line)
    if gone:
        with open(run_dir / "eval.superseded.jsonl", "a") as fh:
            fh.write("".join(f"{x}\n" for x in gone))
        tmp = log.with_name(f"eval.jsonl.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{x}\n" for x in keep))
        os.replace(tmp, log)


def _set_aside_attempt(run_dir: Path, cfg: DictConfig) -> None:
    """A fresh start in the directory of an attempt that died before its first checkpoint: its metrics.csv
    rows are dropped (the CSV logger keeps none of them) and its W&B files are moved to
    wandb.abandoned-<time>/, so neither the CSV nor a later `genscale sync` mixes two attempts' steps."""
    if launched_follower() or not (run_dir / "wandb").exists():
        return
    aside = run_dir / f"wandb.abandoned-{_dt.datetime.now():%Y%m%d-%H%M%S-%f}"
    (run_dir / "wandb").rename(aside)
    note = f"genscale: starting again in {run_dir}; the earlier attempt's W&B files are in {aside.name}/"
    if cfg.logging.wandb and cfg.logging.wandb_mode == "online":
        note += (" (it logged online under the same W&B id, whose server run keeps those steps: give "
                 "logging.wandb_id=NEW to start a clean W&B run)")
    print(note, file=sys.stderr, flush=True)


def _check_per_rank_batches(cfg: DictConfig, world: int) -> None:
    """Every batch (data.batch_size, each pgan.batch_sizes entry) splits over the processes and then into
    optim.accumulate micro-batches; known only once the trainer has counted the processes."""
    if is_flow(cfg):
        return
    accum = cfg.optim.accumulate
    sizes = [cfg.data.batch_size] + (list(cfg.pgan.batch_sizes) if cfg.model.name == "pgan" else [])
    bad = [b for b in sizes if b % (world * accum)]
    if bad:
        raise ConfigError(f"Batch size {bad[0]} does not split into {world} process(es) x optim.accumulate={accum} "
                          "equal micro-batches (each rank would scale its gradient wrongly or drop samples). Choose "
                          f"batch sizes divisible by {world * accum}.")


def _check_shapes_match(saved: dict, module: torch.nn.Module, ckpt_path: str) -> None:
    """A resume whose overrides change the networks' shapes (widths, resolution, classes) is refused
    here, before anything is written, instead of by a page of size-mismatch errors at load time."""
    bad = [(k, saved[k], tuple(v.shape)) for k, v in module.state_dict().items()
           if k in saved and saved[k] != tuple(v.shape)]
    if bad:
        shown = "; ".join(f"{k}: {a} in the checkpoint, {b} now" for k, a, b in bad[:3])
        raise CheckpointError(f"'{ckpt_path}' does not fit the networks this resume builds ({len(bad)} tensors differ: "
                              f"{shown}). Overrides that change the architecture (model.*, data.resolution, the "
                              "classes) cannot be resumed: drop them, or start a new run.")


def resume_dir(ckpt: Path, iteration: int, overrides: List[str], newest: bool = False) -> Optional[Path]:
    """The run directory a resume from ``ckpt`` continues in, or None for a branch into a new one
    (logging.run_id=NEW names it). Continuing in place must not overwrite anything: the checkpoint has
    to sit in a run directory (<run>/checkpoints/, beside its config.yaml) and be that run's newest
    (``newest``: resume=auto chose it as the newest that loads; later ones are torn)."""
    run_dir = ckpt.resolve().parent.parent
    in_run = ckpt.resolve().parent.name == "checkpoints" and (run_dir / "config.yaml").exists()
    new_id = next((o.split("=", 1)[1] for o in overrides if o.startswith("logging.run_id=")), None)
    if new_id is not None and not (in_run and new_id == run_dir.name):
        return None
    if not in_run:
        raise CheckpointError(f"'{ckpt}' is not inside a run directory (<run>/checkpoints/ beside the run's "
                              "config.yaml), so there is no run to continue in place. Add logging.run_id=NAME to "
                              "continue it in a new run directory.")
    later = [] if newest else sorted(p.name for p in ckpt.resolve().parent.glob("iter-*.ckpt")
                                     if iteration_in_name(p.name) > iteration)
    if later:
        raise CheckpointError(f"'{ckpt}' is at iteration {iteration}, but its run has later checkpoints "
                              f"({', '.join(later)}) that continuing in place would overwrite. Resume the newest "
                              f"(resume={run_dir}), or add logging.run_id=NAME to branch from iteration {iteration} "
                              "into a new run directory.")
    return run_dir


def _claim(run_dir: Path) -> bool:
    """Creates run_dir; True only for the one process whose mkdir made it (two runs starting at once
    can never both take a fresh directory, or remove each other's on a failed start)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
        return True
    except FileExistsError:
        return False


def make_run_dir(cfg: DictConfig, reuse: bool = False) -> Tuple[Path, bool]:
    """runs/<experiment>/<run_id>/ and whether this process created it, refusing to reuse a directory that
    already holds a run. An automatic (timestamp) id takes the next free -k suffix."""
    explicit = bool(cfg.logging.run_id)
    if launched_follower():  # rank 0 made (or makes) the directory; all ranks must name the same one
        run_id = cfg.logging.run_id or os.environ.get("GENSCALE_RUN_ID") or os.environ.get("SLURM_JOB_ID")
        if not run_id:
            raise ConfigError("This process is one of several launched together (rank > 0) but has no run id "
                              "shared with the others: pass the same logging.run_id=ID to every process "
                              "(`genscale launch torchrun` does this).")
        cfg.logging.run_id = run_id
        return Path(cfg.logging.root) / (cfg.experiment or "default") / run_id, False
    run_id = cfg.logging.run_id or default_run_id()
    base = Path(cfg.logging.root) / (cfg.experiment or "default")
    run_dir = base / run_id
    named = explicit or bool(os.environ.get("GENSCALE_RUN_ID") or os.environ.get("SLURM_JOB_ID"))  # others rely on it
    if (run_dir / "launch.sbatch").exists() and not (run_dir / "config.yaml").exists() and not reuse:
        raise RunDirError(f"Run directory '{run_dir}' was made by `genscale launch slurm` for its job script: "
                          f"submit it (sbatch {run_dir / 'launch.sbatch'}), or choose a new logging.run_id.")
    if (run_dir / "config.yaml").exists() and not reuse and named:
        if not any((run_dir / "checkpoints").glob("*.ckpt")):
            raise RunDirError(f"Run directory '{run_dir}' already holds a run that wrote no checkpoint. Start it "
                              f"again in place with resume=auto logging.run_id={run_id}, or choose a new "
                              "logging.run_id.")
        raise RunDirError(f"Run directory '{run_dir}' already holds a run. Resume it with "
                          f"resume={run_dir}, or choose a new logging.run_id.")
    fresh = _claim(run_dir)
    if not fresh and not named and not reuse:  # a timestamp id another run holds (or is starting in)
        k = 1
        while not _claim(base / f"{run_id}-{k}"):
            k += 1
        run_dir, fresh = base / f"{run_id}-{k}", True
    cfg.logging.run_id = run_dir.name
    return run_dir, fresh


def resolve_num_classes(cfg: DictConfig, data_classes: int) -> int:
    """The model's class count: model.num_classes, which must match the data's, or (0) the data's,
    recorded in the config so that a resume on data with another class count is refused at start."""
    want = int(cfg.model.num_classes)
    data = f"'{cfg.data.name}'" + (f" at {cfg.data.path}" if cfg.data.path else "")
    if want == 1 and not data_classes:
        return 1  # one class of all-zero labels: how runs on npz files without labels were saved before
    if want and not data_classes:
        raise ConfigError(f"model.num_classes={want} (this run is class-conditional) but the dataset "
                          f"{data} has no labels. Use labelled data with {want} classes, "
                          "or start a new run on this data (model.num_classes=0).")
    if want and want != data_classes:
        raise ConfigError(f"model.num_classes={want} but the dataset {data} has "
                          f"{data_classes} classes (labels 0..{max(data_classes - 1, 0)}). Use data with {want} classes, "
                          f"or set model.num_classes={data_classes} (or 0: the data's count) for a new run.")
    cfg.model.num_classes = data_classes
    return data_classes


def gan_build_args(cfg: dict, channels: int, num_classes: int) -> dict:
    """build_gan's keyword arguments: the whole model section (each builder takes what it knows) plus
    what the data decides."""
    args = {**cfg["model"], "resolution": cfg["data"]["resolution"], "channels": channels,
            "num_classes": num_classes}
    if cfg["model"]["name"] == "pgan":  # widths, start resolution, mbstd group, fused_scale: the pgan section
        args.update({k: v for k, v in cfg["pgan"].items() if k in ("start_resolution", "fmap_base", "fmap_max",
                                                                     "mbstd_group", "fused_scale")})
    return args


def build_module(cfg: DictConfig, channels: int, num_classes: int):
    """GANModule, or FlowModule when model.name is a flow (models.glow.FLOWS)."""
    if is_flow(cfg):
        from trainer.flow_module import FlowModule, glow_from_config

        if cfg.flow.class_conditional and num_classes == 0:
            where = f" at {cfg.data.path}" if cfg.data.path else ""
            raise ConfigError(f"flow.class_conditional=true needs labelled data, but the dataset '{cfg.data.name}'"
                              f"{where} has no labels. Use labelled data or flow.class_conditional=false.")
        d = to_dict(cfg)
        return FlowModule(glow_from_config(d, channels, cfg.data.resolution, num_classes), d)
    num_classes = resolve_num_classes(cfg, num_classes)
    try:
        G, D = build_gan(**gan_build_args(to_dict(cfg), channels, num_classes))
    except ValueError as e:  # unsupported resolution, widths, norms: the builder says which values work
        raise ConfigError(f"model.name={cfg.model.name}: {e}") from None
    if cfg.model.name == "pgan":
        from trainer.pgan_module import PGANModule

        return PGANModule(G, D, to_dict(cfg), z_dim=cfg.model.z_dim)
    return GANModule(G, D, to_dict(cfg), z_dim=cfg.model.z_dim)


def build_datamodule(cfg: DictConfig):
    d = cfg.data
    if cfg.model.name == "pgan":
        return _pgan_datamodule(cfg)
    if d.name == "shards":
        return ShardDataModule(d.path, d.resolution, d.batch_size, mode=d.mode, shuffle_buffer=d.shuffle_buffer,
                               epoch_batches=d.epoch_batches, num_workers=d.num_workers, seed=cfg.trainer.seed,
                               allow_pipe=d.allow_pipe)
    return ArrayDataModule(d.name, d.resolution, d.batch_size, d.val_fraction, d.path, d.num_workers,
                           seed=cfg.trainer.seed)


def _pgan_datamodule(cfg: DictConfig):
    """Progressive GAN: the data comes at data.resolution and the module downsamples it on the device
    to the current level. Batch sizes per resolution: in-memory data by its sampler, shards (resampled
    mode) by grouping single samples in the loader."""
    from trainer.pgan_schedule import schedule_from_config

    sched = schedule_from_config(to_dict(cfg))
    d = cfg.data
    if d.name == "shards":
        if d.mode != "resampled" and len(set(sched.batch_sizes)) > 1:
            raise ConfigError(f"pgan.batch_sizes={sched.batch_sizes} change per resolution, which needs "
                              "data.mode=resampled with shards (exact mode resumes by skipping stream batches).")
        dm = ShardDataModule(d.path, d.resolution, sched.batch_sizes[0], mode=d.mode,
                             shuffle_buffer=d.shuffle_buffer, epoch_batches=d.epoch_batches,
                             num_workers=d.num_workers, seed=cfg.trainer.seed, allow_pipe=d.allow_pipe)
        if len(set(sched.batch_sizes)) > 1:
            dm.batch_schedule = sched.batch_at
        return dm
    dm = ArrayDataModule(d.name, d.resolution, sched.batch_sizes[0], d.val_fraction, d.path, d.num_workers,
                         seed=cfg.trainer.seed)
    dm.batch_schedule = sched.batch_at
    return dm


def _devices(value: str):
    value = str(value)
    if value == "auto":
        return "auto"
    if value.startswith("["):
        return [int(v) for v in value.strip("[]").split(",") if v.strip()]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"trainer.devices='{value}' is not 'auto', a count or a list like [0,1].") from None


def _num_processes(t) -> int:
    devices = _devices(t.devices)
    if isinstance(devices, list):
        n = len(devices)
    elif devices == "auto" or devices == -1:
        gpu = str(t.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else (os.cpu_count() or 1) if devices == -1 else 1
    else:
        n = devices
    return n * t.num_nodes


def check_devices(t) -> None:
    """GPUs asked for against GPUs present (and, under srun, against the SLURM allocation), before
    any work: Lightning would otherwise fail later or, under SLURM, run the wrong number of ranks."""
    if str(t.accelerator) not in ("gpu", "cuda"):
        return
    devices = _devices(t.devices)
    want = len(devices) if isinstance(devices, list) else (None if devices in ("auto", -1) else int(devices))
    have = torch.cuda.device_count()
    if have == 0 or (want is not None and want > have):
        raise ConfigError(f"trainer.accelerator={t.accelerator} with trainer.devices={t.devices}, but this machine "
                          f"has {have} CUDA GPU(s). Set trainer.devices to at most {have}"
                          + (", or trainer.accelerator=cpu." if have == 0 else "."))
    ntasks = os.environ.get("SLURM_NTASKS_PER_NODE")
    if want is not None and ntasks and ntasks.isdigit() and os.environ.get("SLURM_STEP_ID") is not None \
            and int(ntasks) != want:
        raise ConfigError(f"trainer.devices={want} GPUs per node, but the SLURM job has --ntasks-per-node={ntasks} "
                          "(one task per GPU). Launch with `genscale launch slurm --gpus-per-node "
                          f"{want}`, or set trainer.devices={ntasks}.")


def _strategy(t, flow: bool = False, micro_batch: int = 1):
    """'auto' with more than one process picks gan_ddp (plain DDP cannot wrap G and D together), or
    Lightning's plain DDP for flows (one network, automatic optimisation). 'deepspeed' is ours (one
    engine per network), not Lightning's (one optimiser only, GPUs only)."""
    name = str(t.strategy)
    if name == "deepspeed":
        from trainer.strategies.multi_deepspeed import MultiEngineDeepSpeedStrategy

        if t.dist_timeout_s <= 0:
            raise ConfigError(f"trainer.dist_timeout_s must be positive, got {t.dist_timeout_s}.")
        return MultiEngineDeepSpeedStrategy(timeout=_dt.timedelta(seconds=float(t.dist_timeout_s)),
                                            stage=int(t.zero_stage), micro_batch=micro_batch)
    if flow:
        if name == GAN_DDP:
            raise ConfigError(f"trainer.strategy={GAN_DDP} is for GANs; flows use Lightning's ddp "
                              "(the default for more than one process with strategy=auto).")
        if name in ("auto", "ddp") and _num_processes(t) > 1:
            if t.dist_timeout_s <= 0:
                raise ConfigError(f"trainer.dist_timeout_s must be positive, got {t.dist_timeout_s}.")
            from lightning.pytorch.strategies import DDPStrategy

            return DDPStrategy(timeout=_dt.timedelta(seconds=float(t.dist_timeout_s)))
        return name
    if name == "auto" and _num_processes(t) > 1:
        name = GAN_DDP
    if name == GAN_DDP:
        if t.dist_timeout_s <= 0:
            raise ConfigError(f"trainer.dist_timeout_s must be positive, got {t.dist_timeout_s}.")
        return GANDDPStrategy(timeout=_dt.timedelta(seconds=float(t.dist_timeout_s)))
    if name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook") or name.endswith("find_unused_parameters_false"):
        raise ConfigError(f"trainer.strategy={name} wraps G and D in one DistributedDataParallel, which fails on "
                          f"the first D step (G's parameters get no gradient). Use trainer.strategy={GAN_DDP} "
                          "(the default for more than one process with strategy=auto).")
    return name


def _check_strategy_matches(ckpt: dict, cfg: DictConfig) -> None:
    """DeepSpeed keeps optimiser state partitioned in its own directory; a plain checkpoint keeps it
    inline. Crossing over would silently restart the optimiser, so it is refused."""
    ds = ckpt["genscale"].get("deepspeed")
    using = cfg.trainer.strategy == "deepspeed"
    if ds and not using:
        raise CheckpointError(
            f"Checkpoint '{ckpt['_path']}' was written by trainer.strategy=deepspeed (ZeRO stage {ds['stage']}); "
            "its optimiser state is in DeepSpeed's format. Resume with trainer.strategy=deepspeed, or use the "
            "checkpoint's weights for `genscale sample`/`eval`.")
    if using and not ds and ckpt["genscale"].get("iteration", 0) > 0 and ckpt.get("optimizer_states"):
        raise CheckpointError(
            f"Checkpoint '{ckpt['_path']}' was not written by trainer.strategy=deepspeed; its optimiser state "
            f"cannot be loaded into DeepSpeed engines. Resume with trainer.strategy={ckpt['genscale']['config']['trainer']['strategy']}.")
    if ds and using and int(ds["stage"]) != int(cfg.trainer.zero_stage):
        raise CheckpointError(
            f"Checkpoint '{ckpt['_path']}' holds ZeRO stage {ds['stage']} partitions, but trainer.zero_stage="
            f"{cfg.trainer.zero_stage}. Resume with trainer.zero_stage={ds['stage']}.")


def cudnn_benchmark(t) -> bool:
    """trainer.cudnn_benchmark, unless trainer.deterministic asks for reproducible algorithm choices."""
    return bool(t.cudnn_benchmark) and not t.deterministic


def build_trainer(cfg: DictConfig, run_dir: Path, resume_iteration: Optional[int] = None):
    t = cfg.trainer
    micro = cfg.data.batch_size // max(1, cfg.optim.accumulate) if "optim" in cfg else cfg.data.batch_size
    loggers: List = [AppendingCSVLogger(str(run_dir), keep_through_step=resume_iteration, flush_logs_every_n_steps=10)]
    wandb_logger = make_wandb_logger(cfg, run_dir, to_dict(cfg)) if cfg.logging.wandb else None
    if wandb_logger is not None:
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(wandb_logger)
    ckpt = IterationCheckpoint(run_dir / "checkpoints", t.checkpoint.every_n_iters, t.checkpoint.every_n_minutes,
                               t.checkpoint.save_top_k, t.checkpoint.monitor)
    flow = is_flow(cfg)
    samples = SampleGridCallback(run_dir / "samples", t.sample_every, cfg.logging.flow_temperatures if flow else ())
    callbacks = [ckpt, samples]
    if cfg.knowledge.enabled:  # first: phi's IRL step lands before this step's checkpoint is written
        from trainer.callbacks.knowledge import build_knowledge_callback

        callbacks.insert(0, build_knowledge_callback(cfg))
    if wandb_logger is not None:
        callbacks.append(KimgAxis())
    if wandb_logger is not None and wandb_logger.log_checkpoints:
        callbacks.append(CheckpointArtifacts(ckpt))
    if cfg.data.name == "shards":
        callbacks.append(DataSkippedCallback(t.log_every))
    if (cfg.eval.every_n_iters > 0 or cfg.eval.at_start) and not flow:
        # Before the checkpoint callback, so a checkpoint at the same iteration is ranked by this value.
        callbacks.insert(0, PeriodicEvalCallback(to_dict(cfg), run_dir, cfg.eval.every_n_iters, cfg.eval.at_start))
    if (cfg.eval.every_n_iters > 0 or cfg.eval.at_start) and flow:  # held-out bits/dim
        from trainer.callbacks.flow_eval import FlowEvalCallback

        callbacks.insert(0, FlowEvalCallback(to_dict(cfg), run_dir, cfg.eval.every_n_iters, cfg.eval.at_start))
    if cfg.ema.enabled and not flow:  # FlowModule keeps its own EMA
        # EMA must run before samples/checkpoints read G_ema at the same step.
        callbacks.insert(0, EMACallback(cfg.ema.decay, cfg.ema.start_iter, cfg.ema.rampup_iters))
    if cfg.model.name == "pgan":  # before the checkpoint callback: a grid of each finished resolution
        from trainer.callbacks.pgan import ResolutionGridCallback

        callbacks.insert(0, ResolutionGridCallback(run_dir / "samples" / "resolutions"))
    if t.preemption:
        callbacks.append(PreemptionCallback(ckpt))
    if t.progress_bar:
        callbacks.append(ThroughputBar(refresh_rate=10))
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Our PreemptionCallback checkpoints at a step boundary and requeues; Lightning's own SLURM
        # handler would save from inside the signal handler, possibly mid-step.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=_devices(t.devices), num_nodes=t.num_nodes, strategy=_strategy(t, flow, micro),
        precision=t.precision, max_epochs=-1, max_steps=-1, logger=loggers, callbacks=callbacks,
        plugins=plugins, enable_checkpointing=False, enable_progress_bar=t.progress_bar,
        enable_model_summary=False, log_every_n_steps=1, deterministic=t.deterministic, benchmark=cudnn_benchmark(t),
        num_sanity_val_steps=0, default_root_dir=str(run_dir), use_distributed_sampler=False,
    )
    return trainer, ckpt, samples


def prepare_run(experiment: Optional[str] = None, overrides: Optional[List[str]] = None) -> Run:
    """Everything before fit: config, data check, run directory, module, trainer. Fails early."""
    overrides = list(overrides or [])
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), "")
    ckpt_path = None
    reuse_dir = False
    if resume == "auto":
        overrides = [o for o in overrides if not o.startswith("resume=")]
        resume = newest_checkpoint(auto_run_dir(experiment, overrides)) or ""
        if resume:
            overrides.append(f"resume={resume}")
        reuse_dir = True  # a job that died before its first checkpoint starts again in its directory
    if resume:
        ckpt = load_checkpoint(resume)
        rest = [o for o in overrides if not o.startswith("resume=")]
        cfg = load_config(base=ckpt["genscale"]["config"], overrides=rest)
        cfg.resume = ckpt["_path"]
        ckpt_path = ckpt["_path"]
        resume_iteration = ckpt["genscale"]["iteration"]
        run_dir = resume_dir(Path(ckpt_path), resume_iteration, rest, newest=reuse_dir)  # None: a new directory
        saved_world = ckpt["genscale"].get("world_size")
        saved_shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if torch.is_tensor(v)}
        _check_strategy_matches(ckpt, cfg)
        if "KnowledgeCallback" in ckpt.get("callbacks", {}) and not cfg.knowledge.enabled and not launched_follower():
            print("genscale: this checkpoint's knowledge-constraint state (lambda, counters and a learned phi) is "
                  "not used: the run continues with knowledge.enabled=false (it stays in the older checkpoints).",
                  file=sys.stderr, flush=True)
        del ckpt
        if run_dir is None and resume_iteration >= cfg.trainer.max_iters:
            raise ConfigError(f"'{ckpt_path}' is at iteration {resume_iteration}, so a branch with trainer.max_iters="
                              f"{cfg.trainer.max_iters} would train nothing. Give a larger trainer.max_iters.")
        if resume_iteration >= cfg.trainer.max_iters and not launched_follower():
            print(f"genscale: '{ckpt_path}' is at iteration {resume_iteration} and trainer.max_iters="
                  f"{cfg.trainer.max_iters}: the run is complete and takes no step (to train on, resume with a "
                  "larger trainer.max_iters).", file=sys.stderr, flush=True)
    else:
        cfg = load_config(experiment, overrides)
        run_dir, resume_iteration, saved_world = None, None, None
    check_devices(cfg.trainer)
    if not launched_follower():
        for note in ignored_settings(cfg, overrides):
            print(f"genscale: note: {note}.", file=sys.stderr, flush=True)
    dm = build_datamodule(cfg)
    train = dm.prepare()  # a missing or unreadable data path fails here, before any directory is made
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = build_module(cfg, channels=train.channels, num_classes=train.num_classes)
    if cfg.knowledge.enabled:
        from trainer.callbacks.knowledge import check_constraint_fits

        check_constraint_fits(cfg.knowledge.constraint, module)
    if resume:
        _check_shapes_match(saved_shapes, module, ckpt_path)
    new_dir, fresh = run_dir is None, False
    if new_dir:
        run_dir, fresh = make_run_dir(cfg, reuse=reuse_dir)
        module.cfg = to_dict(cfg)
        if reuse_dir and (run_dir / "config.yaml").exists():  # resume=auto, but the last attempt left no checkpoint
            resume_iteration = -1  # the CSV logger keeps no row of the dead attempt (not even iteration 0's)
            _set_aside_attempt(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = _finish_prepare(cfg, run_dir, module, dm, resume_iteration, ckpt_path, saved_world, new_dir)
    except BaseException:
        if fresh:
            discard_unstarted(run_dir, None)
        raise
    run.fresh_dir = fresh
    return run


def _finish_prepare(cfg, run_dir, module, dm, resume_iteration, ckpt_path, saved_world, new_dir) -> Run:
    """prepare_run once the run directory exists: the trainer, the checks that need it, config.yaml."""
    resume = ckpt_path is not None
    trainer, ckpt_cb, samples = build_trainer(cfg, run_dir, resume_iteration)
    _check_per_rank_batches(cfg, trainer.world_size)
    if resume and saved_world is not None and saved_world != trainer.world_size:
        raise CheckpointError(
            f"Checkpoint '{ckpt_path}' was written by {saved_world} process(es) and this resume would run "
            f"{trainer.world_size} (trainer.num_nodes x trainer.devices). Each rank's slice of the data stream "
            "and its random stream depend on the number of processes, so the run would not continue where it "
            f"stopped. Resume with {saved_world} process(es), or start a new run.")
    if trainer.is_global_zero:
        if resume_iteration is not None:
            _supersede_evals(run_dir, resume_iteration)
        name = "config.yaml" if new_dir else f"config.resume-{_dt.datetime.now():%Y%m%d-%H%M%S}.yaml"
        (run_dir / name).write_text(to_yaml(cfg))
    return Run(cfg, run_dir, module, dm, trainer, ckpt_path, ckpt_cb, samples)


def apply_cpu_threads(cfg: DictConfig) -> None:
    """trainer.cpu_threads (0: torch's default, left alone)."""
    if cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(cfg.trainer.cpu_threads)


def train(experiment: Optional[str] = None, overrides: Optional[List[str]] = None) -> Run:
    run = prepare_run(experiment, overrides)
    apply_cpu_threads(run.cfg)
    if run.cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Lightning re-runs this script for ranks > 0 on this node (devices > 1): they join this run directory.
    share_id = run.trainer.world_size > 1 and not launched_follower() and "GENSCALE_RUN_ID" not in os.environ
    if share_id:
        os.environ["GENSCALE_RUN_ID"] = run.run_dir.name
    failed = True
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
        failed = False
    except NonFiniteLossError as e:
        last = run.checkpointer.last_path
        raise NonFiniteLossError(f"{e} Last good checkpoint: {last or 'none was written yet'} "
                                 f"(run directory {run.run_dir}).") from None
    finally:
        if share_id:
            os.environ.pop("GENSCALE_RUN_ID", None)
        close_loggers(run.trainer)
        if failed and run.fresh_dir and run.trainer.is_global_zero:
            discard_unstarted(run.run_dir, run.module)
    return run


def close_loggers(trainer: L.Trainer) -> None:
    """Flush the W&B run to its files now (Lightning leaves it open until the process exits), and wait
    until its run file is complete, so a reader in this process (a test, a report) sees every record."""
    for logger in wandb_loggers(trainer):
        if trainer.is_global_zero and logger._experiment is not None:
            run_file = logger._experiment.settings.sync_file
            logger._experiment.finish()
            wait_for_exit_record(run_file)
