"""`genscale bench memory`: the largest batch per device that trains an experiment, found by running it.

A probe is one `genscale bench train` process at one batch: the real module, strategy and precision
on one device, with ``optim.accumulate=1`` (the batch of an iteration is then all in memory at once),
a few iterations (the FLOP-count one, ``warmup``, ``steps``). Every probe is a fresh process, so it
starts from an empty device as a run does: after an out-of-memory error the caching allocator's pool
is fragmented, and a second try in the same process finds less room (at f2ef648 a BigGAN variant after
another found 36 GB reserved but fragmented).

Fits = the probe ran its iterations. On CUDA the limit is the allocator's own out-of-memory error;
``memory_gb`` lowers it below the card (torch.cuda.set_per_process_memory_fraction in the probe), to
answer "does it fit on a 40 GB card?" on an 80 GB one. On the CPU nothing runs out, so ``memory_gb`` is
required and a probe fits when its process's peak resident memory (ru_maxrss) is at most that.

Search (``search_largest``): from ``start``, double while it fits (up to ``maximum``); then bisect between
the largest batch that fits and the smallest that does not, on multiples of ``multiple``. It assumes
memory grows with the batch. Where the probes measured their memory, a straight line through them
predicts where the limit is reached (``predict_largest``), and the next probe goes there: with memory
close to linear in the batch, about three probes after the first instead of about 2 log2(answer / start).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]


class ProbeError(RuntimeError):
    """A probe failed for a reason other than memory (a config error, a crash, its time limit)."""


def search_largest(fits: Callable[[int], bool], start: int, multiple: int, maximum: int,
                   guess: Optional[Callable[[], Optional[float]]] = None) -> Tuple[Optional[int], Optional[int]]:
    """(largest batch that fits, smallest that does not), both multiples of ``multiple`` in
    [multiple, maximum]; None for the first when not even ``multiple`` fits, None for the second
    when ``maximum`` fits.

    Plain steps double the largest batch that fits until one does not, then bisect (or, when even
    ``start`` fails, halve down first). ``guess``, when given, predicts the largest batch that fits from
    the probes so far (memory is close to linear in the batch); the next probe goes there, kept inside
    the bracket. At most three predicted probes come in a row before a plain step, so a poor prediction
    cannot make the search much longer than plain bisection."""
    if multiple < 1 or maximum < multiple:
        raise ValueError(f"need 1 <= multiple <= maximum, got multiple {multiple}, maximum {maximum}")
    top = maximum // multiple * multiple
    down = lambda b: max(multiple, min(top, b // multiple * multiple))  # noqa: E731
    good, bad = None, None
    b, guessed = down(start), 0
    while True:  # every probe lies strictly between good and bad
        if fits(b):
            good = b
        else:
            bad = b
        if good is None:  # nothing fits yet: halve down
            if bad <= multiple:
                return None, bad
            b = down(bad // 2)
            continue
        if good >= top or bad is not None and bad - good <= multiple:
            return good, bad
        g = guess() if guess is not None and guessed < 3 else None
        if g is not None and 0 < g < float("inf"):  # (NaN fails both)
            b, guessed = min(max(down(int(g)), good + multiple), top if bad is None else bad - multiple), guessed + 1
        else:
            b, guessed = down(2 * good) if bad is None else down((good + bad) // 2), 0


def predict_largest(points: List[Tuple[int, float]], limit: float) -> Optional[float]:
    """The batch at which memory reaches ``limit``, from (batch, peak memory) of batches that fit: a
    least-squares line through two or more, through the origin for one (which overestimates the
    per-image memory, so the prediction errs low and the next probe is likely to fit)."""
    if not points or limit <= 0:
        return None
    if len({b for b, _ in points}) == 1:
        b, m = points[-1]
        return b * limit / m if m > 0 else None
    n = len(points)
    mb, mm = sum(b for b, _ in points) / n, sum(m for _, m in points) / n
    slope = sum((b - mb) * (m - mm) for b, m in points) / sum((b - mb) ** 2 for b, _ in points)
    return mb + (limit - mm) / slope if slope > 0 else None


def probe_overrides(overrides: Optional[List[str]]) -> List[str]:
    """One device, and the whole batch of an iteration in memory at once."""
    return list(overrides or []) + ["optim.accumulate=1", "trainer.devices=1", "trainer.num_nodes=1"]


def probe_config(experiment: str, overrides: Optional[List[str]], batch: Optional[int], precision: Optional[str],
                 steps: int = 2, warmup: int = 1):
    """The config a probe trains with (loading it is `--check`, and catches config errors before any probe);
    batch None: the micro-batch the experiment runs (its batch over its accumulation steps)."""
    from trainer.bench import bench_config
    from trainer.config import load_config

    if batch is None:
        cfg = load_config(experiment, list(overrides or []))
        batch = max(1, int(cfg.data.batch_size) // max(1, int(cfg.optim.accumulate)))
    return bench_config(experiment, probe_overrides(overrides), batch, steps, warmup, precision)


def probe_command(experiment: str, overrides: List[str], batch: int, out: str, *, precision: Optional[str],
                  compile_nets: Optional[bool], steps: int, warmup: int, memory_gb: Optional[float],
                  cuda: bool) -> List[str]:
    # --no-flops: no eager FLOP-count iteration, so a compiled step's probe fits or not as the compiled step
    cmd = [sys.executable, "-m", "launch.cli", "bench", "train", experiment, *probe_overrides(overrides),
           "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--out", out, "--no-flops"]
    if precision:
        cmd += ["--precision", precision]
    if compile_nets is not None:
        cmd.append("--compile" if compile_nets else "--no-compile")
    if cuda and memory_gb:
        cmd += ["--memory-gb", str(memory_gb)]
    return cmd


def run_probe(cmd: List[str], batch: int, memory_gb: Optional[float], cuda: bool, timeout: float) -> dict:
    """One probe: its bench row, with ``fits`` (and ``error`` when it did not)."""
    out = cmd[cmd.index("--out") + 1]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"the probe at batch {batch} ran past its {timeout:.0f} s limit (--probe-timeout)")
    rows = [json.loads(line) for line in Path(out).read_text().splitlines() if line.strip()] \
        if Path(out).is_file() else []
    if not rows:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        why = " (killed: by the kernel's out-of-memory killer?)" if proc.returncode == -9 else ""
        raise ProbeError(f"the probe at batch {batch} failed (exit {proc.returncode}{why}) without a result:\n{tail}")
    row = rows[-1]
    if "error" in row:
        row["fits"] = False
    elif not cuda:  # nothing runs out on the CPU: its peak resident memory against the limit
        row["fits"] = row["peak_host_gb"] <= memory_gb
        if not row["fits"]:
            row["error"] = f"peak resident memory {row['peak_host_gb']:.2f} GB > {memory_gb:g} GB"
    else:
        row["fits"] = True
    return row


def probes_on_cuda(cfg, memory_gb: Optional[float]) -> bool:
    """Whether the probes run on CUDA; on the CPU a memory limit is required (also checked by --check)."""
    import torch

    cuda = str(cfg.trainer.accelerator) in ("gpu", "cuda") or (
        str(cfg.trainer.accelerator) == "auto" and torch.cuda.is_available())
    if not cuda and not memory_gb:
        raise ValueError("on the CPU nothing runs out of memory: give --memory-gb G (a probe fits when its "
                         "peak resident memory is at most G GB), or run on a GPU (trainer.accelerator=gpu)")
    return cuda


def run_memory_bench(experiment: str, overrides: Optional[List[str]] = None, *, start: Optional[int] = None,
                     multiple: int = 8, maximum: int = 8192, precision: Optional[str] = None,
                     compile_nets: Optional[bool] = None, steps: int = 2, warmup: int = 1,
                     memory_gb: Optional[float] = None, probe_timeout: float = 600,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    import torch

    from trainer.bench import _commit

    cfg = probe_config(experiment, overrides, start, precision, steps, warmup)  # config errors before any probe
    cuda = probes_on_cuda(cfg, memory_gb)
    start = int(cfg.data.batch_size)
    probes: List[dict] = []

    def fits(batch: int) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = probe_command(experiment, list(overrides or []), batch, os.path.join(tmp, "row.jsonl"),
                                precision=precision, compile_nets=compile_nets, steps=steps, warmup=warmup,
                                memory_gb=memory_gb, cuda=cuda)
            t = time.perf_counter()
            row = run_probe(cmd, batch, memory_gb, cuda, probe_timeout)
        row["probe_s"] = time.perf_counter() - t
        probes.append(row)
        log(f"probe batch {batch}: " + ("fits" if row["fits"] else f"does not fit ({row['error']})")
            + f", {row['probe_s']:.0f} s")
        return row["fits"]

    def card_gb() -> Optional[float]:  # the card's memory, as the probes read it (None on the CPU)
        return next((p["device_mem_gb"] for p in probes if p.get("device_mem_gb")), None)

    def guess() -> Optional[float]:  # on CUDA the allocator's reserved memory is what the limit bounds
        key = "peak_reserved_gb" if cuda else "peak_host_gb"
        points = [(p["batch"], p[key]) for p in probes if p["fits"] and p.get(key)]
        limit = memory_gb or card_gb()
        return predict_largest(points, limit) if limit else None

    best, first_bad = search_largest(fits, start, multiple, maximum, guess)
    by_batch = {p["batch"]: p for p in probes}
    top = by_batch.get(best, {})
    return {
        "kind": "largest_batch", "experiment": experiment, "overrides": list(overrides or []),
        "device": (probes[-1].get("device") if probes else None), "precision": top.get("precision", precision),
        "compile_mode": top.get("compile_mode"), "memory_limit_gb": memory_gb,
        "device_memory_gb": card_gb(),
        "multiple": multiple, "maximum": maximum, "largest_batch": best, "smallest_failing": first_bad,
        "peak_mem_gb": top.get("peak_mem_gb"), "peak_reserved_gb": top.get("peak_reserved_gb"),
        "peak_host_gb": top.get("peak_host_gb"), "images_per_s": top.get("images_per_s"),
        "probes": probes, "commit": _commit(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def format_memory(result: dict) -> str:
    lines = ["| batch | fits | peak mem | reserved | peak host RSS | img/s | probe s |", "|" + "---|" * 7]
    gb = lambda v: f"{v:.2f} GB" if v else ""  # noqa: E731
    for p in sorted(result["probes"], key=lambda p: p["batch"]):
        fit = "yes" if p["fits"] else f"no: {p['error'][:70]}"
        ips = f"{p['images_per_s']:.1f}" if "images_per_s" in p else ""
        lines.append(f"| {p['batch']} | {fit} | {gb(p.get('peak_mem_gb'))} | {gb(p.get('peak_reserved_gb'))} | "
                     f"{gb(p.get('peak_host_gb'))} | {ips} | {p['probe_s']:.0f} |")
    limit = (f"{result['memory_limit_gb']:g} GB limit" if result["memory_limit_gb"]
             else f"{result['device_memory_gb']:.1f} GB card" if result["device_memory_gb"] else "device")
    if result["largest_batch"] is None:
        verdict = f"no batch fits ({limit}; batch {result['smallest_failing']} does not)"
    else:
        verdict = (f"largest batch per device: {result['largest_batch']} ({limit}, multiples of "
                   f"{result['multiple']}; " + (f"{result['smallest_failing']} does not fit)"
                                               if result["smallest_failing"] else "the maximum searched)"))
    return "\n".join(lines + [f"{result['experiment']} on {result['device']}: {verdict}"])
