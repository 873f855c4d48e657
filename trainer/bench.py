"""`genscale bench train`: the training step's speed, measured as ../shared/notes/performance.md asks.

The experiment's own module (GANModule or FlowModule), strategy, precision and callbacks that change
the step's cost (EMA) run under a bare Lightning Trainer (no loggers, checkpoints or progress bar)
on random uint8 batches drawn once and cycled (a pool of 8, so the data path is real: host to
device, non-blocking, normalised on the device, but no disk or decode cost).

One iteration = what the module counts as one (a GAN: n_critic D steps and one G step; a flow: one
step). Order of events:
  1. iteration 1 builds what is built lazily (Glow's ActNorm init pass, DeepSpeed engines); iteration 2
     runs under torch.utils.flop_counter.FlopCounterMode (eager), giving FLOPs per iteration
     (forward, backward and the gradient penalty's double backward as they really run);
  2. then, with --compile or trainer.compile=MODE, G and D (or the flow) are compiled (the module's own
     compile_networks, as `genscale train` does at its start; --compile alone means mode default);
  3. ``warmup`` iterations (compilation, cuDNN autotuning, allocator growth) are not timed;
  4. ``steps`` iterations are timed one by one, with the device synchronised at each boundary;
  5. with ``profile`` N > 0, N more run under torch.profiler (trainer/bench_profile.py: the device's
     kernels on CUDA, the aten ops on the CPU), after the timing, so the profiler slows nothing timed.
Reported: the seconds from the FLOP count to the first timed iteration (``warmup_s``: compilation
and the warm-up iterations, what a run pays before full speed; ``compile_cache`` says how many of the
compile's graphs came from inductor's on-disk cache instead), median, p10 and p90 seconds per
iteration, images/s (images per iteration / median), TFLOP/s achieved (FLOPs / median), peak device memory in the timed window, device, precision,
batch, strategy and the commit, and which speed switches were on (compile mode, channels_last,
optimiser kernels as resolved on the device, cuDNN autotuning), so rows differing in one switch compare it.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from trainer.bench_profile import ProfileWindow
from trainer.build import _devices, _strategy, apply_cpu_threads, build_module, cudnn_benchmark
from trainer.callbacks.ema import EMACallback
from trainer.config import is_flow, load_config, to_dict
from trainer.counters import iteration_of, images_of
from trainer.speed import compile_cache_counts

REPO = Path(__file__).resolve().parents[1]
BUILTIN = {"mnist5k": (1, 10), "digits": (1, 10), "cifar10": (3, 10)}


class RandomBatches(IterableDataset):
    """Endless (uint8 images, labels) batches from a pool drawn once (never zeros or constants)."""

    def __init__(self, batch: int, channels: int, resolution: int, classes: int, pool: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.randint(0, 256, (batch, channels, resolution, resolution), dtype=torch.uint8, generator=g)
                       for _ in range(pool)]
        self.labels = [torch.randint(0, max(classes, 1), (batch,), generator=g) for _ in range(pool)]

    def __iter__(self):
        i = 0
        while True:
            yield self.images[i % len(self.images)], self.labels[i % len(self.labels)]
            i += 1


def data_shape(cfg) -> tuple:
    """(channels, classes) of the experiment's data without reading it: built-in sets are known,
    shards say so in index.json when present, otherwise RGB with model.num_classes."""
    if cfg.data.name in BUILTIN:
        return BUILTIN[cfg.data.name]
    index = Path(str(cfg.data.path)) / "index.json"
    if cfg.data.name == "shards" and index.is_file():
        import json

        meta = json.loads(index.read_text())
        return int(meta.get("channels", 3)), len(meta.get("classes") or [])
    classes = int(cfg.model.get("num_classes", 0) or 0) if "model" in cfg else 0
    if is_flow(cfg):
        classes = int(cfg.flow.get("num_classes", 0) or 0) or classes
    return 3, classes


def _commit() -> str:
    """The checkout's commit (GENSCALE_COMMIT wins: a copied tree may carry stale git metadata)."""
    if os.environ.get("GENSCALE_COMMIT"):
        return os.environ["GENSCALE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_host_gb() -> float:
    """The process's peak resident memory so far, GB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20


def cap_device_memory(gb: float) -> None:
    """Lets this process's CUDA allocator use at most ``gb`` GB of device 0 (beyond it: out of memory, as
    on a smaller card)."""
    if not torch.cuda.is_available():
        raise ValueError("--memory-gb caps CUDA memory and there is no CUDA device here; on the CPU a bench row "
                         "reports the process's peak resident memory (peak_host_gb)")
    total = torch.cuda.get_device_properties(0).total_memory
    if gb * 2 ** 30 > total:
        raise ValueError(f"--memory-gb {gb:g} is more than the card's {total / 2 ** 30:.1f} GB")
    torch.cuda.set_per_process_memory_fraction(gb * 2 ** 30 / total, 0)


def is_out_of_memory(e: BaseException) -> bool:
    """The caching allocator's error, or the driver's, cuDNN's or cuBLAS's own ("CUDA error: out of memory",
    "..._STATUS_ALLOC_FAILED"), or the CPU allocator's."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("out of memory", "_STATUS_ALLOC_FAILED", "can't allocate memory"))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def global_flop_counter():
    """torch's FlopCounterMode without its per-module tracker: the tracker's autograd hooks fail inside
    the gradient penalty's torch.autograd.grad ("A leaf node was passed to _will_engine_execute_node"),
    and only the total is needed here."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        from torch.utils.flop_counter import _FlopCounterMode
    except ImportError:  # another torch layout: the plain counter (fine where there is no gradient penalty)
        return FlopCounterMode(display=False)

    class GlobalFlopCounter(FlopCounterMode):
        def __enter__(self):
            self.flop_counts.clear()
            self.mode = _FlopCounterMode(self)
            self.mode.__enter__()
            return self

        def __exit__(self, *args):
            out = self.mode.__exit__(*args)
            self.mode = None
            return out

    return GlobalFlopCounter(display=False)


class BenchTimer(L.Callback):
    """Counts FLOPs over iteration 2, compiles after it, times the iterations after warmup more."""

    FLOP_IT = 2

    def __init__(self, warmup: int, steps: int, compile_mode: str, log: Callable[[str], None], profile: int = 0,
                 profile_top: int = 12, count_flops: bool = True):
        self.warmup, self.steps, self.compile_mode, self.log = warmup, steps, compile_mode, log
        # without the count (memory probes of a compiled step) the networks compile before the first step,
        # so no eager iteration sets the memory high-water mark
        self.count_flops = count_flops
        self.profile, self.profile_top = profile, profile_top
        self.profile_summary: Optional[dict] = None
        self._window = None
        self.optimizer_impls: List[str] = []
        self.flops = 0
        self.times: List[float] = []
        self.images: List[int] = []
        self.peak_bytes = 0
        self.reserved_bytes = 0  # the allocator's pool: CUDA graphs' memory is reserved once, before timing
        self._flop_mode = None
        self.device: Optional[torch.device] = None  # read during training: fit moves the module back to the CPU
        self._t = None
        self._seen = 0
        self._warm_from = 0.0
        self.warmup_s = 0.0  # compiling and the warm-up iterations: what a run pays before full speed

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer, module):
        self.optimizer_impls = [optimizer_impl(opt) for opt in trainer.optimizers]
        if not self.count_flops:
            self._warm_from = time.perf_counter()
            module.compile_networks(self.compile_mode)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.count_flops and iteration_of(module) == self.FLOP_IT - 1 and self._flop_mode is None:
            self._flop_mode = global_flop_counter()
            self._flop_mode.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.device = module.device
        if not getattr(module, "g_stepped", True):  # a GAN iteration ends with its G step
            return
        it = iteration_of(module)
        if it == self.FLOP_IT and self._flop_mode is not None and self.flops == 0:
            self._flop_mode.__exit__(None, None, None)
            self.flops = int(self._flop_mode.get_total_flops())
            self._sync(module)
            self._warm_from = time.perf_counter()
            module.compile_networks(self.compile_mode)  # "off": nothing
        first = self.FLOP_IT + self.warmup
        if it == first:
            self._sync(module)
            self.warmup_s = time.perf_counter() - self._warm_from
            if module.device.type == "cuda":
                torch.cuda.empty_cache()  # the eager FLOP count's cached blocks are not the timed step's
                torch.cuda.reset_peak_memory_stats(module.device)
            self._t, self._seen = time.perf_counter(), images_of(module)
        elif first < it <= first + self.steps:  # (the profiled iterations after these are not timed)
            self._sync(module)
            now, seen = time.perf_counter(), images_of(module)
            self.times.append(now - self._t)
            self.images.append(seen - self._seen)
            self._t, self._seen = now, seen
            if it == first + self.steps:
                if module.device.type == "cuda":
                    self.peak_bytes = torch.cuda.max_memory_allocated(module.device)
                    self.reserved_bytes = torch.cuda.max_memory_reserved(module.device)
                if self.profile:
                    self._window = ProfileWindow(module.device)
                    self._window.start()
                else:
                    trainer.should_stop = True
        if self._window is not None and it == first + self.steps + self.profile:
            self.profile_summary = self._window.stop(self.profile, statistics.median(self.times), self.profile_top)
            self._window = None
            trainer.should_stop = True


def optimizer_impl(opt) -> str:
    """fused, foreach or plain: what the optimiser was built with on its device."""
    d = getattr(opt, "defaults", {})
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "plain"


def resolve_compile_mode(configured: str, compile_nets: Optional[bool]) -> str:
    """compile_nets None: as configured; True: compile (in the configured mode, default if off); False: eager."""
    if compile_nets is False:
        return "off"
    return configured if configured != "off" else ("default" if compile_nets else "off")


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def bench_config(experiment: str, overrides: Optional[List[str]], batch: Optional[int], steps: int, warmup: int,
                 precision: Optional[str], profile: int = 0):
    """The run config one bench case trains with (`--check` loads only this). The steady state is timed:
    WGAN's boosted critic iterations (100 D steps in the first 25) are off, and a Progressive GAN grows to
    its final resolution within the first iteration (phases of one image; batch data.batch_size), unless
    the overrides set those keys."""
    ov = list(overrides or [])
    if batch is not None:
        ov.append(f"data.batch_size={batch}")
    if precision is not None:
        ov.append(f"trainer.precision={precision}")
    ov += ["logging.wandb=false", f"trainer.max_iters={steps + warmup + profile + BenchTimer.FLOP_IT + 1}"]
    # which model it is (a Progressive GAN's --batch counts only with the steady schedule's pgan.batch_sizes=[],
    # which the probe assumes; a pgan.batch_sizes among the overrides comes later and wins)
    probe = load_config(experiment, ["pgan.batch_sizes=[]"] + ov)
    steady = [] if is_flow(probe) else ["optim.critic_boost_steps=0"]
    if probe.model.name == "pgan" and not any(o.startswith(("pgan.fade_images=", "pgan.stable_images=",
                                                            "pgan.batch_sizes=")) for o in ov):
        steady += ["pgan.fade_images=[1]", "pgan.stable_images=[1]", "pgan.batch_sizes=[]"]
    return load_config(experiment, steady + ov)


def run_train_bench(experiment: str, overrides: Optional[List[str]] = None, batch: Optional[int] = None,
                    steps: int = 20, warmup: int = 5, precision: Optional[str] = None, compile_nets: Optional[bool] = None,
                    log: Callable[[str], None] = lambda m: None, profile: int = 0, profile_top: int = 12,
                    memory_gb: Optional[float] = None, count_flops: bool = True) -> dict:
    cfg = bench_config(experiment, overrides, batch, steps, warmup, precision, profile)
    if memory_gb:
        cap_device_memory(memory_gb)
    apply_cpu_threads(cfg)  # as `genscale train` does (the row's device names the thread count)
    channels, classes = data_shape(cfg)
    module = build_module(cfg, channels=channels, num_classes=classes)
    t = cfg.trainer
    compile_mode = resolve_compile_mode(str(t.compile), compile_nets)
    if compile_mode != "off" and warmup < 1:
        raise ValueError("A compiled step needs --warmup of at least 1: the first compiled iterations compile, "
                         "and timing them would measure the compiler.")
    module.cfg["trainer"]["compile"] = "off"  # compiled by the timer after the eager FLOP count instead
    timer = BenchTimer(warmup, steps, compile_mode, log, profile, profile_top, count_flops)
    callbacks: list = [timer]
    if cfg.ema.enabled and not is_flow(cfg):
        callbacks.append(EMACallback(cfg.ema.decay, cfg.ema.start_iter, cfg.ema.rampup_iters))
    micro = cfg.data.batch_size // max(1, cfg.optim.accumulate)
    trainer = L.Trainer(accelerator=t.accelerator, devices=_devices(t.devices), num_nodes=t.num_nodes,
                        strategy=_strategy(t, is_flow(cfg), micro), precision=t.precision, max_epochs=-1,
                        benchmark=cudnn_benchmark(t),
                        max_steps=-1, logger=False, callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    per_rank = cfg.data.batch_size // trainer.world_size
    data = RandomBatches(per_rank, channels, cfg.data.resolution, classes, seed=cfg.trainer.seed + trainer.global_rank)
    loader = DataLoader(data, batch_size=None, pin_memory=torch.cuda.is_available())
    log(f"bench train {experiment}: batch {cfg.data.batch_size}, precision {t.precision}, "
        f"{warmup} warm-up + {steps} timed iterations")
    cache_before = compile_cache_counts()
    trainer.fit(module, train_dataloaders=loader)
    cache = {k: v - cache_before[k] for k, v in compile_cache_counts().items()}
    if len(timer.times) != steps or (profile and timer.profile_summary is None):
        raise RuntimeError(f"{len(timer.times)} of {steps} iterations were timed"
                           + (", and the profile did not finish" if profile and timer.profile_summary is None else ""))
    med = statistics.median(timer.times)
    per_iter = statistics.median(timer.images)
    n_critic = 1 if is_flow(cfg) else int(cfg.optim.n_critic)
    return {
        "experiment": experiment, "model": str(cfg.model.name),
        # the resolution the timed steps ran at (a Progressive GAN's current level)
        "resolution": int(module.phase.resolution) if hasattr(module, "phase") else int(cfg.data.resolution),
        "batch": int(cfg.data.batch_size), "n_critic": n_critic, "images_per_iter": int(per_iter),
        "precision": str(t.precision), "strategy": type(trainer.strategy).__name__,
        "zero_stage": int(t.zero_stage) if str(t.strategy) == "deepspeed" else None,
        "compile": compile_mode != "off", "compile_mode": compile_mode,
        "compile_scope": str(t.get("compile_scope", "model")), "channels_last": bool(t.channels_last),
        "optimizer_impl": "/".join(timer.optimizer_impls), "cudnn_benchmark": cudnn_benchmark(t),
        # where the finite-loss check was decided: on the device (fused optimisers, no host sync) or host
        "finite_check": "device" if getattr(module, "_device_streaks", None) else "host",
        "world_size": int(trainer.world_size), "rank": int(trainer.global_rank),
        "device": _device_name(timer.device or module.device), "torch": torch.__version__, "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"), "steps": steps, "warmup": warmup, "warmup_s": timer.warmup_s,
        "compile_cache": cache,
        "s_per_iter_median": med, "s_per_iter_p10": _quantile(timer.times, 0.1),
        "s_per_iter_p90": _quantile(timer.times, 0.9), "images_per_s": per_iter / med,
        # FLOPs of this process's share of the iteration (all ranks: times world_size), so TFLOP/s is per device
        "flops_per_iter": timer.flops or None, "tflops_per_s": timer.flops / med / 1e12 if timer.flops else None,
        "peak_mem_gb": timer.peak_bytes / 2 ** 30 if timer.peak_bytes else None,
        "peak_reserved_gb": timer.reserved_bytes / 2 ** 30 if timer.reserved_bytes else None,
        "peak_host_gb": peak_host_gb(), "memory_limit_gb": memory_gb,
        "device_mem_gb": (torch.cuda.get_device_properties(timer.device).total_memory / 2 ** 30
                          if timer.device is not None and timer.device.type == "cuda" else None),
        "overrides": list(overrides or []),
        "profile": timer.profile_summary,
    }


def format_table(rows: List[dict]) -> str:
    measured = [r for r in rows if "error" not in r]
    failed = [f"| {r['experiment']} | batch {r['batch']} | {r['variant'] or 'baseline'} | {r['error']} |"
              for r in rows if "error" in r]
    return "\n".join([_timing_table(measured)] + failed)


def _timing_table(rows: List[dict]) -> str:
    """One line per row; ``vs first``: img/s over the first row's of the same experiment, batch and
    precision (the variants of one command compare at a glance)."""
    head = ("| experiment | variant | device | precision | batch | strategy | compile | NHWC | optimiser | "
            "s/iter (p10-p90) | img/s | vs first | TFLOP/iter | TFLOP/s | peak mem | warm-up s |")
    lines = [head, "|" + "---|" * 16]
    first: dict = {}
    for r in rows:
        base = first.setdefault((r["experiment"], r["batch"], r["precision"]), r["images_per_s"])
        mem = f"{r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] else "n/a"
        if r.get("peak_reserved_gb"):
            mem += f" ({r['peak_reserved_gb']:.1f} reserved)"
        strat = r["strategy"] + (f" ZeRO-{r['zero_stage']}" if r["zero_stage"] is not None else "")
        lines.append(f"| {r['experiment']} | {r.get('variant') or '-'} | {r['device']} | {r['precision']} | "
                     f"{r['batch']} | {strat} | "
                     f"{_compile_label(r)} | "
                     f"{'yes' if r.get('channels_last') else 'no'} | {r.get('optimizer_impl') or '?'} | "
                     f"{r['s_per_iter_median']:.4f} ({r['s_per_iter_p10']:.4f}-{r['s_per_iter_p90']:.4f}) | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | {_tera(r['flops_per_iter'], '.3f')} | "
                     f"{_tera(r['tflops_per_s'] and r['tflops_per_s'] * 1e12, '.2f')} | {mem} | "
                     f"{r.get('warmup_s', 0):.1f}{_cache_label(r.get('compile_cache'))} |")
    return "\n".join(lines)


def _tera(x: Optional[float], fmt: str) -> str:
    return format(x / 1e12, fmt) if x else "n/a (--no-flops)"


def _cache_label(c: Optional[dict]) -> str:
    """' (cached)' when every compile-cache lookup of the row hit, ' (part cached)' when some did."""
    c = c or {}
    hits, misses = c.get("fx_hit", 0) + c.get("aot_hit", 0), c.get("fx_miss", 0) + c.get("aot_miss", 0)
    return "" if not hits else " (cached)" if not misses else " (part cached)"


def _compile_label(r: dict) -> str:
    if not r["compile"]:
        return "no"
    return r.get("compile_mode", "default") + (" per block" if r.get("compile_scope") == "block" else "")


def run_variant(experiment: str, overrides: Optional[List[str]], variant: str, **kw) -> dict:
    """run_train_bench with the variant's extra overrides (a space-separated string), recorded as
    ``variant``; afterwards the run's networks, optimiser state and compiled graphs are released, so the
    next variant in the same process starts from an empty device (BigGAN-128 at batch 256 needs
    more than half of an 80 GB card)."""
    try:
        row = run_train_bench(experiment, list(overrides or []) + variant.split(), **kw)
    except RuntimeError as e:  # "does batch B fit?" is itself a result worth a row
        if not is_out_of_memory(e):
            raise
        row = {"experiment": experiment, "batch": kw.get("batch"), "precision": kw.get("precision"),
               "error": "out of memory", "detail": str(e).splitlines()[0][:300], "commit": _commit(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "device": _device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
               "overrides": list(overrides or []), "peak_host_gb": peak_host_gb(),
               "memory_limit_gb": kw.get("memory_gb")}
    finally:
        release_device_memory()
    row["variant"] = variant
    return row


def release_device_memory() -> None:
    import gc

    torch._dynamo.reset()  # compiled graphs (and CUDA-graph pools) hold the networks and their memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
