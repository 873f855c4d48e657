"""torch.compile's on-disk caches, carried from one lent GPU machine to the next.

A lent machine starts bare, and a session has minutes of it: at f2ef648 compiling BigGAN-128 and Glow
took about half of launch/bench_gpu.sh's budget, and Glow at batch 256 never finished. Inductor keeps
what it compiled under TORCHINDUCTOR_CACHE_DIR: AOTAutograd and FX graphs, the generated kernel
modules with their autotuning choices (``.best_config``), and Triton's binaries. Their keys hold the
code, shapes, torch and Triton versions and (for graphs) the device name, so a cache packed on one
machine and unpacked on the next turns repeated compiles into loads, and a stale entry just misses.

    python -m launch.compile_cache pack CACHE_DIR OUT_PREFIX [--part-mb 15] [--parts 3] [--preset 0]
    python -m launch.compile_cache unpack CACHE_DIR [PART_OR_FOLDER ...]

``pack`` writes at most ``--parts`` archives ``OUT_PREFIX.NN.tar.xz`` of at most ``--part-mb`` each
(the device tool returns 8 files of 16 MiB at most), compressed in parallel threads. The files of one folder
stay in one part: a Triton kernel is a folder whose metadata without its binary would fail, not miss.
If the parts would be too large it drops, in turn, Triton's intermediate IR (never read back when a
kernel is loaded) and its PTX (only the cubin is launched); if still too large it writes nothing and
says so. Unpack at the same CACHE_DIR path: Triton's kernel groups name their files by absolute path.
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MANIFEST = "genscale_compile_cache"  # each part holds MANIFEST.NN.json
SUFFIX = ".tar.xz"
# What to leave out, tier by tier, when the archives would not fit.
DROP_TIERS: Tuple[Tuple[str, ...], ...] = ((), (".ttir", ".ttgir", ".llir", ".source", ".amdgcn"),
                                          (".ttir", ".ttgir", ".llir", ".source", ".amdgcn", ".ptx"))


def cache_files(cache_dir: Path, drop: Sequence[str] = ()) -> Dict[str, List[Tuple[str, int]]]:
    """Folder (relative to cache_dir) -> [(file, bytes)], without locks, temporary files, earlier
    manifests and the ``drop`` suffixes."""
    folders: Dict[str, List[Tuple[str, int]]] = {}
    for root, dirs, names in os.walk(cache_dir):
        rel = os.path.relpath(root, cache_dir)
        if rel.split(os.sep)[0] == "locks":
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith("tmp.")]  # a kernel folder being written (TritonBundler)
        for n in names:
            # files being written: inductor's ``.*.tmp``, Triton's ``NAME.tmp.pid_*``
            if n.endswith(".lock") or ".tmp" in n or n.startswith(MANIFEST) or n.endswith(tuple(drop)):
                continue
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                folders.setdefault(rel, []).append((os.path.normpath(os.path.join(rel, n)), os.path.getsize(p)))
    return folders


def split_parts(folders: Dict[str, List[Tuple[str, int]]], parts: int) -> List[List[str]]:
    """Whole folders into ``parts`` groups of about equal raw size (largest folder first into the
    smallest group); empty groups are left out."""
    groups: List[Tuple[int, List[str]]] = [(0, []) for _ in range(parts)]
    for files in sorted(folders.values(), key=lambda fs: -sum(s for _, s in fs)):
        i = min(range(parts), key=lambda k: groups[k][0])
        groups[i] = (groups[i][0] + sum(s for _, s in files), groups[i][1] + [f for f, _ in files])
    return [sorted(names) for _, names in groups if names]


def _write_part(args) -> int:
    cache_dir, names, path, preset, manifest = args
    with tarfile.open(path, "w:xz", preset=preset) as tar:
        for n in names:
            try:
                tar.add(os.path.join(cache_dir, n), arcname=n, recursive=False)
            except FileNotFoundError:  # replaced or removed since it was listed (a compile still running)
                continue
        info = tarfile.TarInfo(manifest[0])
        data = json.dumps(manifest[1], indent=1).encode()
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def _environment() -> dict:
    """What the cache's keys depend on, recorded in each part's manifest and compared at unpack."""
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": None, "device": "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # CPU builds have none; inductor's CPU backend needs none
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def pack(cache_dir: str, prefix: str, part_mb: float = 15.0, parts: int = 3, preset: int = 0,
         log=print) -> List[str]:
    """Writes the cache as at most ``parts`` archives of at most ``part_mb`` MiB; returns their paths
    ([] when there is nothing to pack or it cannot fit)."""
    cache, limit, t0 = Path(cache_dir), part_mb * 2 ** 20, time.time()
    if not cache.is_dir():
        log(f"compile cache: {cache} does not exist; nothing packed")
        return []
    env = _environment()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    ratio = None  # compressed / raw bytes of the last tier tried
    for drop in DROP_TIERS:
        folders = cache_files(cache, drop)
        if not folders:
            log(f"compile cache: {cache} is empty; nothing packed")
            return []
        raw = sum(s for fs in folders.values() for _, s in fs)
        if ratio is not None and raw * ratio > parts * limit:  # would not fit either: spare the compression
            log(f"compile cache: {raw / 2 ** 20:.1f} MiB without {', '.join(drop)} would compress to about "
                f"{raw * ratio / 2 ** 20:.1f} MiB, over {parts} x {part_mb:g} MiB")
            continue
        groups = split_parts(folders, parts)
        paths = [f"{prefix}.{i:02d}{SUFFIX}" for i in range(len(groups))]
        jobs = [(str(cache), names, path, preset,
                 (f"{MANIFEST}.{i:02d}.json", {"packed_from": str(cache.resolve()), "part": i, "parts": len(groups),
                                               "files": len(names), "dropped": list(drop), **env}))
                for i, (names, path) in enumerate(zip(groups, paths))]
        # threads: lzma releases the GIL while it compresses (and no fork of a process holding CUDA)
        with ThreadPoolExecutor(len(jobs)) as pool:
            sizes = list(pool.map(_write_part, jobs))
        what = f"{sum(len(g) for g in groups)} files, {raw / 2 ** 20:.1f} MiB -> " + \
               " + ".join(f"{s / 2 ** 20:.1f}" for s in sizes) + " MiB"
        if max(sizes) <= limit:
            log(f"compile cache: packed {what} in {time.time() - t0:.1f} s"
                + (f" (left out {', '.join(drop)})" if drop else "") + f": {' '.join(paths)}")
            return paths
        for p in paths:
            os.remove(p)
        ratio = sum(sizes) / raw
        log(f"compile cache: {what}" + (f" without {', '.join(drop)}" if drop else "")
            + f" is over {parts} x {part_mb:g} MiB")
    log("compile cache: not packed (too large even without Triton's IR and PTX)")
    return []


def find_parts(sources: Sequence[str]) -> List[Path]:
    """The archives among ``sources`` (files, or folders searched one level deep)."""
    found: List[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.name.endswith(SUFFIX))
        elif p.is_file():
            found.append(p)
    return found


def unpack(cache_dir: str, sources: Sequence[str], log=print) -> int:
    """Extracts every part found in ``sources`` into ``cache_dir``; returns the number of files.
    A part that cannot be read is reported and skipped (a cache is an optimisation, never a reason
    to stop a measurement)."""
    cache = Path(cache_dir)
    parts = find_parts(sources)
    if not parts:
        log(f"compile cache: none to unpack (looked in {', '.join(sources) or 'nothing'}); compiling from scratch")
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    env, files = _environment(), 0
    for part in parts:
        try:
            with tarfile.open(part, "r:xz") as tar:
                members = tar.getmembers()
                tar.extractall(cache, filter="data")
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
            log(f"compile cache: {part} unreadable ({type(e).__name__}: {e}); skipped")
            continue
        files += sum(1 for m in members if m.isfile() and not m.name.startswith(MANIFEST))
        man = _manifest(cache, members)
        if man is None:
            continue
        if man.get("packed_from") != str(cache.resolve()):
            log(f"compile cache: {part.name} was packed from {man.get('packed_from')}, unpacked to {cache.resolve()}: "
                "Triton kernels name their files by absolute path and will compile again")
        stale = [k for k in ("torch", "triton") if man.get(k) != env.get(k)]
        if stale:
            log(f"compile cache: {part.name} is from " + ", ".join(f"{k} {man.get(k)}" for k in stale)
                + " (here " + ", ".join(f"{k} {env.get(k)}" for k in stale) + "): its entries will miss")
    log(f"compile cache: unpacked {files} files from {len(parts)} part(s) into {cache}")
    return files


def _manifest(cache: Path, members) -> Optional[dict]:
    for m in members:
        if m.name.startswith(MANIFEST) and m.name.endswith(".json"):
            try:
                return json.loads((cache / m.name).read_text())
            except (OSError, ValueError):
                return None
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.compile_cache", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the cache as a few .tar.xz parts")
    p.add_argument("cache_dir")
    p.add_argument("prefix", help="the parts are PREFIX.00.tar.xz, PREFIX.01.tar.xz, ...")
    p.add_argument("--part-mb", type=float, default=15.0, help="largest part, MiB (default 15)")
    p.add_argument("--parts", type=int, default=3, help="most parts (default 3)")
    p.add_argument("--preset", type=int, default=0, choices=range(10), help="xz preset (default 0: fastest)")
    u = sub.add_parser("unpack", help="extract parts into the cache")
    u.add_argument("cache_dir")
    u.add_argument("sources", nargs="*", help="part files, or folders holding them")
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        if a.parts < 1 or a.part_mb <= 0:
            ap.error("--parts must be at least 1 and --part-mb positive")
        pack(a.cache_dir, a.prefix, a.part_mb, a.parts, a.preset)
    else:
        unpack(a.cache_dir, a.sources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
