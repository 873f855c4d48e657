"""CPU profile of whole training steps through the real `genscale train` path (module, callbacks,
strategy): wall time per step, torch.profiler's breakdown by op, op counts, and host reads of tensor
values per step (each a device synchronisation on a GPU).

    python launch/profile_step.py EXPERIMENT [key=value ...] [--warmup 3] [--steps 5] [--profile 2]

Steps 1..warmup are not measured (first-step work: ActNorm init, optimiser state). The next ``steps``
are timed without the profiler (the median is reported) and their host reads counted; then
``profile`` more run under torch.profiler. Logging, checkpoints and sample grids are kept out of the
measured steps. Self-contained (it imports only trainer.build.prepare_run), so the same file can
profile an older checkout: ``PYTHONPATH=/path/to/old/checkout python launch/profile_step.py ...``.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import traceback
from typing import Dict, List

PATCHED = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def is_step_counter(t, optimizers) -> bool:
    """An optimiser's state["step"]: torch keeps it on the CPU whatever the parameters' device unless
    the optimiser is fused or capturable (then it stays on the device and is never read on the host),
    so Adam's .item() of it is not a device sync."""
    return t.dim() == 0 and any(t is s.get("step") for opt in optimizers for s in opt.state.values())


class SyncCounter:
    """Counts calls of PATCHED on any tensor while ``active`` except those ``exempt`` says are host
    tensors on every device; where each came from (the innermost frame outside torch)."""

    def __init__(self):
        self.active = False
        self.exempt = lambda t: False
        self.count = 0
        self.where: collections.Counter = collections.Counter()
        self._orig: Dict[str, object] = {}

    def __enter__(self):
        import torch

        for name in PATCHED:
            self._orig[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(self._orig[name], name))
        return self

    def __exit__(self, *exc):
        import torch

        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)

    def _wrap(self, orig, name):
        counter = self

        def wrapped(t, *args, **kwargs):
            if counter.active and not counter.exempt(t):
                counter.count += 1
                frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "torch/" not in f.filename)
                counter.where[f"{name} {frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno} {frame.name}"] += 1
            return orig(t, *args, **kwargs)

        return wrapped


def _callbacks(warmup: int, steps: int, profile: int, counter: SyncCounter, result: dict):
    """First and last callbacks around each step: timing, counting, profiling."""
    import lightning as L
    import torch

    state = {"i": -1, "t": 0.0, "prof": None}

    class First(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["i"] += 1
            i = state["i"]
            counter.exempt = lambda t: is_step_counter(t, trainer.optimizers)
            if i == warmup + steps:
                state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                state["prof"].__enter__()
            counter.count = 0
            counter.active = warmup <= i < warmup + steps
            state["t"] = time.perf_counter()

    class Last(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dt = time.perf_counter() - state["t"]
            i = state["i"]
            if counter.active:
                counter.active = False
                result["step_s"].append(dt)
                result["host_reads"].append(counter.count)
            if i == warmup + steps + profile - 1:
                state["prof"].__exit__(None, None, None)
                result["prof"] = state["prof"]
                trainer.should_stop = True

    return First(), Last()


def profile_steps(experiment: str, overrides: List[str], warmup: int, steps: int, profile: int) -> dict:
    import torch

    from trainer.build import prepare_run

    total = warmup + steps + profile
    run = prepare_run(experiment, list(overrides) + [
        f"trainer.max_iters={total + 5}", "trainer.log_every=100000", "trainer.sample_every=0",
        "trainer.checkpoint.every_n_iters=0", "logging.wandb=false", "trainer.progress_bar=false"])
    if run.cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(run.cfg.trainer.cpu_threads)
    result: dict = {"step_s": [], "host_reads": []}
    counter = SyncCounter()
    first, last = _callbacks(warmup, steps, profile, counter, result)
    run.trainer.callbacks.insert(0, first)
    run.trainer.callbacks.append(last)
    with counter:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    return summarise(result, counter, profile)


def summarise(result: dict, counter: SyncCounter, profile: int, top: int = 12) -> dict:
    events = [e for e in result["prof"].key_averages() if e.key.startswith("aten::")]
    ops_per_step = sum(e.count for e in events) / profile
    self_total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "step_ms_median": 1000 * statistics.median(result["step_s"]),
        "step_ms_all": [round(1000 * s, 2) for s in result["step_s"]],
        "host_reads_per_step": result["host_reads"],
        "host_read_sources": dict(counter.where),
        "aten_ops_per_step": ops_per_step,
        "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / profile,
                     "share": e.self_cpu_time_total / self_total, "calls_per_step": e.count / profile}
                    for e in rows],
    }


def markdown(name: str, s: dict) -> str:
    lines = [f"**{name}**: median step {s['step_ms_median']:.1f} ms, {s['aten_ops_per_step']:.0f} aten ops per "
             f"step, host reads per step {s['host_reads_per_step']}", "",
             "| op | self ms / step | share of aten self time | calls / step |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['self_ms_per_step']:.2f} | {100 * r['share']:.1f}% | {r['calls_per_step']:.0f} |"
              for r in s["top_ops"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", type=int, default=2)
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    a = p.parse_args(argv)
    s = profile_steps(a.experiment, a.overrides, a.warmup, a.steps, a.profile)
    print(markdown(a.experiment, s))
    print("host read sources:", s["host_read_sources"])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
