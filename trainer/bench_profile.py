"""`genscale bench train --profile N`: where the time of a training iteration goes, from torch.profiler
over N iterations run right after the timed ones (same process, same compiled graphs, warm caches).

On CUDA the records are the device's own: every kernel, copy and set, with its duration as the GPU ran
it. Reported per iteration: device milliseconds (the union of the records' intervals, so concurrent
streams count once), that time over the unprofiled median step (``busy``: near 1 means the GPU is the
bottleneck, well under 1 means the host is: Python, launches, syncs), kernels per iteration, host
launches and CUDA-graph replays, milliseconds per kind of work and the kernels that take the most. On
the CPU the records are the aten ops, each with its self time (time spent in its children is theirs),
and ``busy`` is the share of the step spent inside aten ops rather than in Python around them.

The kinds come from the kernels' names (cuDNN, cuBLAS, CUTLASS and Triton name theirs predictably); a
name no rule matches is "other". They are a reading aid: the top list is the data.

The training modules mark the parts of their step with ``phase`` (D's fakes, forward, penalty, backward
and update, G's forward, backward and update, the EMA; the flow's forward, backward and update). Each
part is reported with its host milliseconds, the device milliseconds of the kernels it launched, and its
kernels (aten ops on the CPU), nested parts excluded; "outside" is the host time of the iteration in
none of them (Lightning's loop, callbacks, the batch). Under the profiler the host runs slower than
without it, so host times are upper bounds.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

import torch

# (kind, pattern), first match wins: Triton's generated kernels (torch.compile; their names carry the
# aten ops they fused, "convolution" among them) by their prefix, attention before matmul (flash
# kernels are GEMMs), the optimiser's multi-tensor kernels before elementwise, copies before
# elementwise (torch's copy kernels are elementwise templates).
KINDS: List[Tuple[str, re.Pattern]] = [(k, re.compile(p, re.I)) for k, p in [
    ("triton (compiled)", r"^triton_"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("optimizer", r"multi_tensor|adam|_foreach_|fused_sgd"),
    ("matmul/conv", r"gemm|conv(?!ert)|cutlass|xmma|cudnn|wgrad|dgrad|implicit|winograd|cublas|sm\d+_|nvjet|"
                    r"aten::(addmm|mm|bmm|matmul|linear|_convolution|mkldnn)"),
    ("normalization", r"batch_norm|layer_norm|group_norm|bn_fw|bn_bw|welford|norm_kernel"),
    ("copy/cast", r"memcpy|memset|copy|cat_?array|aten::(cat|to|_to_copy|clone|contiguous)\b"),
    ("reduction", r"reduce|aten::(sum|mean|max|min|norm|linalg_vector_norm)\b"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|aten::"),
]]


PHASE = "genscale/"


def phase(name: str):
    """A named part of the training step for `bench train --profile`: a torch.profiler range while a
    profiler runs, nothing otherwise (one C call per use)."""
    if not torch._C._autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(PHASE + name)


def phase_times(events, cuda: bool) -> Dict[str, List[float]]:
    """{part: [host us, device us, kernels (CPU: aten ops)]} over the profiled events, each part's
    figures without the parts nested in it."""
    from torch.autograd import DeviceType

    def kernels(ev):
        # the device records torch attached to the op that launched them; a range's own device-side copy
        # (record_function's gpu_user_annotation, same name, spanning gaps) is no kernel
        return [k for k in ev.kernels if k.name != ev.name] if cuda else []

    out: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for e in events:
        if e.device_type != DeviceType.CPU or not e.name.startswith(PHASE):
            continue
        host, dev, ops = e.cpu_time_total, 0.0, 0
        stack = [e]
        while stack:
            c = stack.pop()
            if c is not e and c.name.startswith(PHASE):  # a nested part: its time is its own
                host -= c.cpu_time_total
                continue
            own = kernels(c)
            dev += sum(k.duration for k in own)
            ops += len(own) if cuda else int(c.name.startswith("aten::"))
            stack.extend(c.cpu_children)
        row = out[e.name[len(PHASE):]]
        row[0] += host
        row[1] += dev
        row[2] += ops
    if cuda:
        _add_other_threads(events, out, kernels)
    return dict(out)


def _add_other_threads(events, out: Dict[str, List[float]], kernels) -> None:
    """On CUDA the backward pass runs on autograd's own device thread, outside the call trees of the
    parts (they live on the thread that called backward): each top-level op there gives its kernels to
    the innermost part whose time span holds the op's start."""
    from torch.autograd import DeviceType

    parts = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(PHASE)]
    threads = {getattr(p, "thread", None) for p in parts}
    for e in events:
        if (e.device_type != DeviceType.CPU or getattr(e, "thread", None) in threads
                or getattr(e, "cpu_parent", None) is not None or e.name.startswith(PHASE)):
            continue
        t = e.time_range.start
        holders = [p for p in parts if p.time_range.start <= t <= p.time_range.end]
        if not holders:
            continue
        part = min(holders, key=lambda p: p.time_range.end - p.time_range.start)
        row, stack = out[part.name[len(PHASE):]], [e]
        while stack:
            c = stack.pop()
            own = kernels(c)
            row[1] += sum(k.duration for k in own)
            row[2] += len(own)
            stack.extend(c.cpu_children)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def union_us(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (microseconds)."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def records_of(prof, cuda: bool):
    """(records [(name, microseconds)], busy microseconds, host counts, parts) of a finished profile."""
    from torch.autograd import DeviceType

    events = prof.events()
    host = defaultdict(int)
    if cuda:
        # user annotations (torch.optim's Optimizer.step, the step's parts) have device-side copies that
        # span their kernels and the gaps between them: not kernels
        device = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        records = [(e.name, e.time_range.elapsed_us()) for e in device]
        busy = union_us((e.time_range.start, e.time_range.end) for e in device)
        for e in events:  # the CUDA runtime calls, by name (no kernel is named like them)
            if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"):
                host["launches"] += 1
            elif e.name.startswith("cudaGraphLaunch"):
                host["graph_replays"] += 1
            elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
                host["syncs"] += 1
    else:
        ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        records = [(e.name, e.self_cpu_time_total) for e in ops]
        busy = sum(us for _, us in records)
    return records, busy, dict(host), phase_times(events, cuda)


def summarise(records: List[Tuple[str, float]], busy_us: float, iters: int, step_s: Optional[float],
              wall_s: float, host: Optional[dict] = None, top: int = 12,
              phases: Optional[Dict[str, List[float]]] = None) -> dict:
    """Per-iteration figures of ``iters`` profiled iterations; ``step_s``: the unprofiled median step
    (the profiler slows the host, so ``busy`` is measured against the step as timed without it)."""
    by_name = defaultdict(lambda: [0, 0.0])
    kinds = defaultdict(float)
    for name, us in records:
        by_name[name][0] += 1
        by_name[name][1] += us
        kinds[kind_of(name)] += us
    total_us = sum(us for _, us in records)
    ms = busy_us / iters / 1e3
    ranked = sorted(by_name.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    return {
        "iters": iters,
        "busy_ms_per_iter": ms,
        "busy": ms / (step_s * 1e3) if step_s else None,
        "profiled_wall_ms_per_iter": wall_s / iters * 1e3,
        "records_per_iter": len(records) / iters,
        "host_per_iter": {k: v / iters for k, v in sorted((host or {}).items())},
        "kinds_ms_per_iter": {k: v / iters / 1e3 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "phases": {n: {"host_ms": h / iters / 1e3, "device_ms": d / iters / 1e3, "kernels": k / iters}
                   for n, (h, d, k) in sorted((phases or {}).items(), key=lambda kv: (-kv[1][1], -kv[1][0]))},
        "outside_phases_host_ms": (wall_s * 1e3 - sum(h for h, _, _ in (phases or {}).values()) / 1e3) / iters
                                  if phases else None,
        "top": [{"name": n[:160], "calls_per_iter": c / iters, "ms_per_iter": us / iters / 1e3,
                 "share": us / total_us if total_us else 0.0} for n, (c, us) in ranked],
    }


class ProfileWindow:
    """torch.profiler over whole iterations: ``start`` at one iteration boundary, ``stop`` at a later one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self._t0 = 0.0

    def start(self) -> None:
        self.prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self, iters: int, step_s: Optional[float], top: int) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self.prof.__exit__(None, None, None)
        records, busy, host, phases = records_of(self.prof, self.cuda)
        return {"device": "cuda" if self.cuda else "cpu",
                **summarise(records, busy, iters, step_s, wall, host, top, phases)}


def format_profiles(rows: List[dict], top: int = 8) -> str:
    """A short text block per profiled row (bench.log): busy share, kinds, the top kernels."""
    out = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        label = f"{r['experiment']} batch {r['batch']} {r['precision']} {r.get('variant') or 'baseline'}"
        busy = f"{p['busy']:.0%} busy" if p.get("busy") is not None else "busy n/a"
        host = ", ".join(f"{k} {v:.0f}" for k, v in p["host_per_iter"].items())
        out.append(f"profile {label}: {p['device']} {p['busy_ms_per_iter']:.1f} ms/iter ({busy} of the "
                   f"{r['s_per_iter_median'] * 1e3:.1f} ms step), {p['records_per_iter']:.0f} records/iter"
                   + (f"; host per iter: {host}" if host else ""))
        out.append("  kinds (ms/iter): " + ", ".join(f"{k} {v:.1f}" for k, v in p["kinds_ms_per_iter"].items()))
        if p.get("phases"):
            dev = p["device"] == "cuda"
            parts = [f"{n} {v['host_ms']:.1f}" + (f"/{v['device_ms']:.1f}" if dev else "") + f" x{v['kernels']:.0f}"
                     for n, v in p["phases"].items()]
            out.append(f"  parts (host{'/device' if dev else ''} ms per iter, x {'kernels' if dev else 'aten ops'}): "
                       + ", ".join(parts) + f"; outside {p['outside_phases_host_ms']:.1f} host")
        for t in p["top"][:top]:
            out.append(f"  {t['ms_per_iter']:8.2f} ms {t['share']:6.1%} x{t['calls_per_iter']:<6.0f} {t['name'][:110]}")
    return "\n".join(out)
