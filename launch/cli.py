"""The `genscale` command: a table of subcommands, each a small function over trainer/ and data_pipelines/."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Dict, List, Optional

class UsageError(Exception):
    """Options that do not go together (or with this checkpoint): exit 2 with the message."""


def _user_errors() -> tuple:
    from data_pipelines.builtin import DataError
    from trainer.build import RunDirError
    from trainer.checkpointing import CheckpointError
    from trainer.config import ConfigError
    from trainer.gan_module import NonFiniteLossError

    return (ConfigError, DataError, CheckpointError, RunDirError, NonFiniteLossError, UsageError)


STOPPED_EARLY = 3  # exit status of a run a signal stopped before trainer.max_iters (checkpoint written)


def cmd_train(args) -> int:
    from trainer.build import train
    from trainer.config import describe_fields

    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    experiment, overrides = args.experiment, list(args.overrides)
    if experiment and "=" in experiment:  # `genscale train key=value ...` with the default experiment
        overrides.insert(0, experiment)
        experiment = None
    from trainer.progress import run_summary, stopped_early

    run = train(experiment, overrides)
    if run.trainer.is_global_zero:  # stderr: stdout stays one JSON line for scripts
        print(run_summary(run), file=sys.stderr, flush=True)
    ckpt = run.checkpointer.last_path
    stop = stopped_early(run)
    if not run.trainer.is_global_zero:  # one JSON line per run, from rank 0 (the others share its directory)
        return STOPPED_EARLY if stop == "signal" else 0
    print(json.dumps({"run_dir": str(run.run_dir.resolve()), "iteration": int(run.module.iteration),
                      "kimg": int(run.module.images_seen) / 1000, "checkpoint": str(ckpt) if ckpt else None,
                      "samples": str(run.sampler.last_path) if run.sampler.last_path else None,
                      "metrics": str(run.run_dir / "metrics.csv"), "stopped_early": stop or None}))
    # A signal's stop without SLURM's requeue is no success: a sweep or script sees status 3 (resume to continue).
    return STOPPED_EARLY if stop == "signal" else 0


def cmd_sample(args) -> int:
    from trainer.checkpointing import load_checkpoint
    from trainer.evaluate import sample_grid
    from trainer.flow_eval import flow_sample_grid, is_flow_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    if is_flow_checkpoint(ckpt) and args.truncation is not None:
        raise UsageError("--truncation applies to GAN checkpoints (flows: --temperature).")
    if is_flow_checkpoint(ckpt) and (args.interpolate_class or args.interpolate_z):
        raise UsageError("--interpolate-class and --interpolate-z apply to class-conditional GAN checkpoints "
                         "(flows: --interpolate A B between two held-out images).")
    if is_flow_checkpoint(ckpt) and args.interpolate:
        from trainer.flow_eval import flow_interpolate

        path = flow_interpolate(ckpt, *args.interpolate, num=args.num, out=args.out, seed=args.seed,
                                use_ema=not args.no_ema)
        print(json.dumps({"out": str(path), "num": args.num, "interpolate": args.interpolate, "split": "val"}))
        return 0
    if is_flow_checkpoint(ckpt):
        paths = flow_sample_grid(ckpt, num=args.num, out=args.out, seed=args.seed, use_ema=not args.no_ema,
                                 temperatures=args.temperature, label=args.label)
        temps = args.temperature or [ckpt["genscale"]["config"]["flow"]["sample_temperature"]]
        print(json.dumps({"out": [str(p) for p in paths] if len(paths) > 1 else str(paths[0]), "num": args.num,
                          "seed": args.seed, "ema": not args.no_ema and bool(ckpt["genscale"]["config"]["ema"]["enabled"]),
                          "temperature": temps, "class": args.label}))
        return 0
    if args.temperature or args.interpolate:
        raise UsageError("--temperature and --interpolate apply to flow checkpoints only.")
    has_ema = any(k.startswith("G_ema.") for k in ckpt["state_dict"])  # a run with ema.enabled=false has none
    del ckpt
    if args.interpolate_class or args.interpolate_z:
        from trainer.evaluate import interpolation_grid

        mode, (a, b) = ("class", args.interpolate_class) if args.interpolate_class else ("z", args.interpolate_z)
        out = interpolation_grid(args.checkpoint, mode, a, b, rows=max(1, args.num // 8), steps=8, out=args.out,
                                 seed=args.seed, use_ema=not args.no_ema, truncation=args.truncation or 0.0)
        print(json.dumps({"out": str(out), "mode": mode, "classes": [a, b], "seed": args.seed}))
        return 0
    out = sample_grid(args.checkpoint, num=args.num, out=args.out, seed=args.seed, use_ema=not args.no_ema,
                      truncation=args.truncation or 0.0, label=args.label)
    print(json.dumps({"out": str(out), "num": args.num, "seed": args.seed, "ema": not args.no_ema and has_ema,
                      "truncation": args.truncation, "class": args.label}))
    return 0


def cmd_eval(args) -> int:
    from trainer.evaluate import evaluate_checkpoint, train_feature_net

    if args.target == "train-features":
        if not args.dataset:
            raise UsageError("eval train-features needs --dataset (mnist5k, digits or npz).")
        path = train_feature_net(args.dataset, args.resolution, data_path=args.data_path,
                                 features_dir=args.features_dir, force=args.force)
        print(json.dumps({"feature_net": str(path)}))
        return 0
    from trainer.checkpointing import load_checkpoint
    from trainer.flow_eval import evaluate_flow_checkpoint, is_flow_checkpoint

    if args.num is not None and args.num < 2:
        raise UsageError(f"--num must be at least 2 (FID/KID and bits/dim need samples), got {args.num}.")
    ckpt = load_checkpoint(args.target)
    if is_flow_checkpoint(ckpt):
        print(json.dumps(evaluate_flow_checkpoint(ckpt, num=args.num, seed=args.seed, use_ema=not args.no_ema),
                         indent=2))
        return 0
    del ckpt
    result = evaluate_checkpoint(args.target, num_samples=args.num, seed=args.seed, use_ema=not args.no_ema,
                                 features_dir=args.features_dir, truncation=args.truncation,
                                 bn_mode=args.bn_mode, features=args.features)
    print(json.dumps(result, indent=2))
    return 0


def cmd_list(args) -> int:
    from data_pipelines.builtin import DESCRIPTIONS as DATA
    from models.glow import FLOW_DESCRIPTIONS as FLOWS
    from models.registry import DESCRIPTIONS as MODELS
    from trainer.config import DEFAULT_EXPERIMENT, list_experiments

    what = args.what or "all"
    if what in ("models", "all"):
        print("models:")
        for k in sorted(MODELS):
            print(f"  {k:16s} {MODELS[k]}")
        for k in sorted(FLOWS):
            print(f"  {k:16s} {FLOWS[k]} [flow: settings in flow.*]")
    if what in ("experiments", "all"):
        from trainer.config import describe_experiment

        print("experiments:")
        for k in list_experiments():
            e = describe_experiment(k)
            print(f"  {k}{'  (default)' if k == DEFAULT_EXPERIMENT else ''}: {e['description']}\n"
                  f"      model {e['model']}, data {e['data']}, {e['objective']}, {e['constraints']}")
    if what in ("datasets", "all"):
        print("datasets:")
        for k in sorted(DATA):
            print(f"  {k:16s} {DATA[k]}")
    return 0


def cmd_data(args) -> int:
    from data_pipelines.shards import inspect_shards, write_shards

    if args.data_command == "write":
        index = write_shards(args.source, args.out, input_path=args.input or "", resolution=args.resolution,
                             encoding=args.encoding, maxcount=args.shard_maxcount, val_fraction=args.val_fraction,
                             workers=args.workers)
        print(json.dumps({"out": str(args.out), "encoding": index["encoding"], "resolution": index["resolution"],
                          "channels": index["channels"], "classes": len(index["classes"]),
                          **{s: {"count": v["count"], "shards": len(v["shards"])} for s, v in index["splits"].items()}}))
        return 0
    report = inspect_shards(args.dir, grid=args.grid, verify=args.verify)
    print(json.dumps(report, indent=2))
    return 0 if report.get("verify", {}).get("ok", True) else 1


def _data_parser(sp) -> None:
    d = sp.add_parser("data", help="write and inspect webdataset shards", description=(
        "`genscale data write --source digits --out DIR` writes train/val shards and index.json; "
        "train on them with data.name=shards data.path=DIR. `genscale data inspect DIR` shows counts and "
        "classes, --grid writes a sample grid, --verify checks every shard's sha256 and decodes every sample."))
    dsp = d.add_subparsers(dest="data_command", metavar="{write,inspect}")
    dsp.required = True
    w = dsp.add_parser("write", help="write shards and index.json")
    w.add_argument("--source", required=True, choices=["imagefolder", "npz", "mnist5k", "digits", "cifar10"])
    w.add_argument("--input", default="", help="imagefolder: a folder of class sub-folders; npz: a .npz file; "
                                               "cifar10: the cifar-10-batches-py folder")
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--resolution", type=int, default=None, help="resize to R x R (imagefolder: required; "
                                                                 "others: default native size)")
    w.add_argument("--encoding", default="png", choices=["png", "jpg", "raw"])
    w.add_argument("--shard-maxcount", type=int, default=1000, help="samples per shard")
    w.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (seeded split)")
    w.add_argument("--workers", type=int, default=1, help="writer processes")
    i = dsp.add_parser("inspect", help="counts, classes, a sample grid, a verify pass")
    i.add_argument("dir", help="shard directory")
    i.add_argument("--grid", default=None, help="write a PNG grid of train samples here")
    i.add_argument("--verify", action="store_true", help="check sha256 and decode every sample (exit 1 on problems)")
    d.set_defaults(fn=cmd_data)


def cmd_bench(args) -> int:
    if args.bench_command == "train":
        return cmd_bench_train(args)
    if args.bench_command == "memory":
        return cmd_bench_memory(args)
    from data_pipelines.bench import format_table, run_data_bench

    result = run_data_bench(resolutions=args.resolution, encodings=args.encoding, workers=args.workers,
                            images=args.images, batch=args.batch, seconds=args.seconds, repeats=args.repeats,
                            warmup=args.warmup, consumer_threads=args.threads, digits=not args.no_digits,
                            presized=not args.no_presized,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


def cmd_bench_train(args) -> int:
    from trainer.bench import bench_config, cap_device_memory, format_table, run_variant
    from trainer.bench_profile import format_profiles

    if args.memory_gb and not args.check:
        try:
            cap_device_memory(args.memory_gb)
        except ValueError as e:
            print(f"genscale bench train: error: {e}", file=sys.stderr)
            return 2
    cases = [(b, p, v) for b in args.batch or [None] for p in args.precision or [None] for v in args.variant or [""]]
    if args.check:  # every case's config, nothing built or timed: errors surface before GPU time is spent
        for batch, precision, variant in cases:
            cfg = bench_config(args.experiment, list(args.overrides) + variant.split(), batch, args.steps,
                               args.warmup, precision, args.profile)
            print(f"ok: {args.experiment} batch {cfg.data.batch_size} {cfg.trainer.precision} "
                  f"compile {cfg.trainer.compile} {variant or 'baseline'}")
        return 0
    rows = []
    for batch, precision, variant in cases:
        try:
            rows.append(run_variant(args.experiment, args.overrides, variant, batch=batch, steps=args.steps,
                                    warmup=args.warmup, precision=precision, compile_nets=args.compile,
                                    log=lambda m: print(m, file=sys.stderr, flush=True), profile=args.profile,
                                    profile_top=args.profile_top, memory_gb=args.memory_gb,
                                    count_flops=not args.no_flops))
        except ValueError as e:
            print(f"genscale bench train: error: {e}", file=sys.stderr)
            return 2
        if rows[-1].get("rank", 0):  # several processes: rank 0 reports the case
            continue
        if args.out:  # each row as soon as it is measured: a later one may be cut off by a time limit
            with open(args.out, "a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
    if any(r.get("rank", 0) for r in rows):
        return 0
    print(format_table(rows))
    if args.profile:
        print(format_profiles(rows))
    if not args.out:
        print(json.dumps(rows, indent=1))
    return 0


def cmd_bench_memory(args) -> int:
    from trainer.bench import resolve_compile_mode
    from trainer.bench_memory import ProbeError, format_memory, probe_config, probes_on_cuda, run_memory_bench

    if args.check:
        cfg = probe_config(args.experiment, args.overrides, args.start, args.precision, args.steps, args.warmup)
        try:
            probes_on_cuda(cfg, args.memory_gb)
        except ValueError as e:
            print(f"genscale bench memory: error: {e}", file=sys.stderr)
            return 2
        print(f"ok: {args.experiment} from batch {cfg.data.batch_size} {cfg.trainer.precision} compile "
              f"{resolve_compile_mode(str(cfg.trainer.compile), args.compile)} (largest batch)")
        return 0
    try:
        result = run_memory_bench(args.experiment, args.overrides, start=args.start, multiple=args.multiple,
                                  maximum=args.max, precision=args.precision, compile_nets=args.compile,
                                  steps=args.steps, warmup=args.warmup, memory_gb=args.memory_gb,
                                  probe_timeout=args.probe_timeout,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ProbeError, ValueError) as e:
        print(f"genscale bench memory: error: {e}", file=sys.stderr)
        return 2
    print(format_memory(result))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return 0 if result["largest_batch"] is not None else 1


def _bench_parser(sp) -> None:
    b = sp.add_parser("bench", help="benchmarks: data loading (`bench data`), training step speed (`bench train`), "
                                    "the largest batch per device (`bench memory`)",
                      description=(
        "`genscale bench data` builds a workload in a temporary directory (JPEG crops of scikit-image's "
        "photographs, genscale shards of them, mnist5k PNGs) and measures images/s delivered to the training "
        "loop by genscale's shard reader against a one-file-per-sample PIL DataLoader (torchvision ImageFolder "
        "style), with the same workers and batch size, in one interleaved run. `genscale bench train` times training iterations of an "
        "experiment: s/iter, images/s, FLOPs, TFLOP/s and peak memory. `genscale bench memory` finds the largest "
        "batch per device that trains it."))
    bsp = b.add_subparsers(dest="bench_command", metavar="{data,train,memory}")
    bsp.required = True
    d = bsp.add_parser("data", help="shards vs per-file loading: images/s, CPU per image")
    d.add_argument("--resolution", type=int, nargs="+", default=[64, 128], help="target resolutions (px)")
    d.add_argument("--encoding", nargs="+", default=["jpg", "raw", "png"], choices=["jpg", "raw", "png"],
                   help="shard encodings to measure")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers (both loaders)")
    d.add_argument("--images", type=int, default=2000, help="photo files in the workload")
    d.add_argument("--batch", type=int, default=64, help="batch size (both loaders)")
    d.add_argument("--seconds", type=float, default=4.0, help="timed seconds per case and repeat")
    d.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the median is reported)")
    d.add_argument("--warmup", type=int, default=3, help="batches skipped before timing each repeat")
    d.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the consumer loop")
    d.add_argument("--no-digits", action="store_true", help="skip the mnist5k PNG cases")
    d.add_argument("--no-presized", action="store_true", help="skip the per-file pre-resized JPEG cases")
    d.add_argument("--out", default=None, help="write the JSON here (default: print it after the table)")
    t = bsp.add_parser("train", help="training step speed: s/iter, images/s, FLOPs, TFLOP/s, peak memory",
                       description="Times real training iterations of EXPERIMENT's module on random uint8 batches: "
                                   "FLOPs counted over one eager iteration (torch.utils.flop_counter), then "
                                   "--warmup untimed and --steps timed iterations, the device synchronised at each "
                                   "boundary. Overrides (key=value) apply as in `genscale train`.")
    t.add_argument("experiment", help="experiment name or YAML path")
    t.add_argument("overrides", nargs="*", help="key=value config overrides")
    t.add_argument("--batch", type=int, nargs="+", default=None, help="global batch size(s) (default: the config's)")
    t.add_argument("--steps", type=int, default=20, help="timed iterations")
    t.add_argument("--warmup", type=int, default=5, help="untimed iterations after the FLOP-count iteration")
    t.add_argument("--precision", nargs="+", default=None, choices=["32", "bf16-mixed", "16-mixed"],
                   help="precision(s) to measure (default: the config's)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the networks (G and D, or the flow) after the FLOP count, in the mode "
                        "trainer.compile names (default when it is off); --no-compile times them eagerly. "
                        "Neither: as the experiment ships (biggan_imagenet128 and glow_cifar10 compile)")
    t.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed iterations, N more under torch.profiler: device time per iteration "
                        "and its share of the step (busy), kernels per iteration, time by kind of kernel and "
                        "the costliest kernels (on the CPU: aten ops by self time); in the JSON row as `profile`")
    t.add_argument("--profile-top", type=int, default=12, metavar="K",
                   help="kernels (or ops) kept in the profile's list")
    t.add_argument("--variant", action="append", default=None, metavar="'KEY=VALUE ...'",
                   help="extra overrides measured as a row of their own, in the same process (repeatable): "
                        "switches on and off on the same card, without a process start each. With --variant "
                        "only the variants are measured: add --variant '' for the overrides alone (a baseline)")
    t.add_argument("--out", default=None, help="append one JSON line per measurement to this file (appended: a "
                                               "sweep over several calls collects in one file)")
    t.set_defaults(takes_overrides=True)  # key=value overrides may also follow the options
    t.add_argument("--check", action="store_true", help="only load each case's config (overrides, batch, "
                                                       "precision, variant) and report errors; nothing is built "
                                                       "or timed: a dry run before spending GPU time")
    t.add_argument("--no-flops", action="store_true",
                   help="skip the eager FLOP-count iteration: a compiled step compiles before its first iteration "
                        "(`bench memory` probes of a compiled step use this, so eager memory sets no limit)")
    t.add_argument("--memory-gb", type=float, default=None, metavar="G",
                   help="CUDA: let the allocator use at most G GB (out of memory beyond it, as on a smaller card)")
    m = bsp.add_parser("memory", help="the largest batch per device that trains: one probe process per batch",
                       description="Finds the largest batch per device that runs EXPERIMENT's training step: each "
                                   "probe is a fresh `bench train` process on one device at one batch "
                                   "(optim.accumulate=1, a few iterations); from --start it doubles while a "
                                   "batch fits, then bisects on multiples of --multiple. On CUDA a batch fits when "
                                   "it does not run out of memory (--memory-gb: below the card); on the CPU when "
                                   "the probe's peak resident memory is at most --memory-gb (required there). "
                                   "Exit 0 with the answer, 1 when no batch fits, 2 when a probe fails otherwise.")
    m.add_argument("experiment", help="experiment name or YAML path")
    m.add_argument("overrides", nargs="*", help="key=value config overrides (trainer.accelerator=gpu for a GPU)")
    m.add_argument("--start", type=int, default=None,
                   help="first batch probed (default: the micro-batch, data.batch_size / optim.accumulate)")
    m.add_argument("--multiple", type=int, default=8, help="batches probed are multiples of this")
    m.add_argument("--max", type=int, default=8192, help="largest batch probed")
    m.add_argument("--precision", default=None, choices=["32", "bf16-mixed", "16-mixed"],
                   help="precision (default: the config's)")
    m.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="as `bench train --compile`: compiled networks use less memory, and each probe compiles")
    m.add_argument("--steps", type=int, default=2, help="timed iterations per probe (after the FLOP-count one)")
    m.add_argument("--warmup", type=int, default=1, help="untimed iterations per probe")
    m.add_argument("--memory-gb", type=float, default=None, metavar="G",
                   help="the memory budget: CUDA, the allocator's limit below the card; CPU, peak resident memory")
    m.add_argument("--probe-timeout", type=float, default=600, metavar="S", help="seconds one probe may take")
    m.add_argument("--out", default=None, help="append the result (every probe's row) as one JSON line here")
    m.add_argument("--check", action="store_true", help="only load the probes' config and report errors")
    m.set_defaults(takes_overrides=True)
    b.set_defaults(fn=cmd_bench)


def _launch_parser(sp) -> None:
    from launch import slurm, torchrun

    la = sp.add_parser("launch", help="launch multi-process / multi-node runs (torchrun, SLURM)",
                       description="Launch a run on several processes or nodes, with torchrun or SLURM.")
    lsp = la.add_subparsers(dest="launcher", metavar="LAUNCHER")
    lsp.required = True
    torchrun.add_parser(lsp)
    slurm.add_parser(lsp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genscale", description="Train, sample and evaluate deep generative models.")
    sp = p.add_subparsers(dest="command", metavar="COMMAND")
    sp.required = True

    t = sp.add_parser("train", help="train an experiment", description=(
        "Train EXPERIMENT (default: wgan_gp_mnist5k) with key=value overrides, e.g. "
        "`genscale train gan_mnist5k trainer.max_iters=500 data.batch_size=128`. "
        "Resume with resume=<run dir or checkpoint>."))
    t.add_argument("experiment", nargs="?", default=None, help="experiment name or path to a .yaml")
    t.add_argument("overrides", nargs="*", help="key=value config overrides")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    t.set_defaults(fn=cmd_train)

    s = sp.add_parser("sample", help="write a grid of samples from a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run directory")
    s.add_argument("--num", type=int, default=64, help="number of samples")
    s.add_argument("--out", default="samples.png", help="output PNG")
    s.add_argument("--seed", type=int, default=0, help="latent seed")
    s.add_argument("--no-ema", action="store_true", help="use the raw generator instead of G_ema")
    s.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="flows: prior temperature(s) (default flow.sample_temperature); several write one grid "
                        "each, OUT_T<t>.png, from the same noise")
    s.add_argument("--class", dest="label", type=int, default=None,
                   help="class-conditional models (BigGAN, flows): sample this class (default: cycle through "
                        "the classes)")
    s.add_argument("--interpolate-class", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="class-conditional GANs: rows of fixed latents, the class embedding moving from A to B "
                        "over 8 columns (--num / 8 rows)")
    s.add_argument("--interpolate-z", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="class-conditional GANs: one row per class A..B, each moving between two fixed latents "
                        "over 8 columns")
    s.add_argument("--truncation", type=float, default=None, metavar="T",
                   help="GANs: truncation trick, latent entries with |z| > T resampled (default: none)")
    s.add_argument("--interpolate", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="flows: a row of --num images interpolating every level's latent between held-out "
                        "images number A and B")
    s.set_defaults(fn=cmd_sample)

    e = sp.add_parser("eval", help="FID/KID (GANs) or bits/dim (flows) of a checkpoint, or train the domain "
                      "feature network", description=(
        "`genscale eval CKPT` computes FID and KID between generated and held-out images (GANs), or the "
        "held-out bits/dim (flows), and appends them to the run's eval.jsonl. `genscale eval train-features --dataset mnist5k` trains the domain classifier "
        "whose features FID/KID use on digit data (done automatically on first use)."))
    e.add_argument("target", help="checkpoint / run directory, or 'train-features'")
    e.add_argument("--num", type=int, default=None, help="generated samples, or held-out images for flows "
                                                          "(default: eval.num_samples)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ema", action="store_true", help="evaluate the raw generator")
    e.add_argument("--truncation", type=float, default=None, metavar="T",
                   help="GANs: truncation threshold of the latents (default: the run's eval.truncation)")
    e.add_argument("--bn-mode", default=None, choices=["eval", "standing"],
                   help="GANs: BatchNorm statistics, running ('eval') or re-accumulated ('standing'); "
                        "default: the run's eval.bn_mode")
    e.add_argument("--features", default=None, choices=["auto", "domain", "inception"],
                   help="GANs: the feature network of FID/KID, instead of the run's eval.features")
    e.add_argument("--features-dir", default=None, help="where feature networks are kept")
    e.add_argument("--dataset", default=None, help="train-features: dataset name")
    e.add_argument("--resolution", type=int, default=32, help="train-features: image resolution")
    e.add_argument("--data-path", default="", help="train-features: data.path for file datasets")
    e.add_argument("--force", action="store_true", help="train-features: retrain even if saved")
    e.set_defaults(fn=cmd_eval)

    ls = sp.add_parser("list", help="list models, experiments (with description, model, data, objective) and datasets")
    ls.add_argument("what", nargs="?", choices=["models", "experiments", "datasets", "all"])
    ls.set_defaults(fn=cmd_list)

    _data_parser(sp)
    _launch_parser(sp)
    from launch import sweep

    sweep.add_parser(sp)
    from launch import report, wandb_sync

    report.add_parser(sp)
    wandb_sync.add_parser(sp)
    _bench_parser(sp)
    return p


def _quiet_library_noise() -> None:
    # G_ema is deliberately in eval mode; the other two are library deprecation chatter.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`launch torchrun EXP --nodes 2 k=v`), which argparse
    # cannot split into a positional list by itself.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "takes_overrides", False) or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    _quiet_library_noise()
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"genscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a loader worker, a pipe: shard, W&B's service): a real error
        # `genscale list | head`: the reader has gone, which is not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too
        return 141  # as a shell reports a process ended by SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports POLLERR on the write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
