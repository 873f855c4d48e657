"""`genscale bench data`: images/s delivered to the training loop, shards against a per-file loader.

The workload is built in a temporary directory:
  * photos: crops of the photographs that ship inside scikit-image (random crop boxes, scales, aspect
    ratios and flips), saved as JPEG files (quality 90, 160-320 px on the short side) in one class
    folder: what an ImageFolder holds. From that folder genscale's own writer
    (data_pipelines.shards.write_shards, --source imagefolder) writes shards at each target
    resolution in each encoding;
  * digits: mnist5k at 32 px as one PNG file per image, and `write_shards(--source mnist5k)` shards.

Cases, all measured in one run, interleaved (repeat 1 of every case, then repeat 2, ...), so a shared
machine's load falls on all of them alike:
  * ``files`` (the baseline): a map-style Dataset that opens one file per sample with PIL, decodes,
    resizes the short side to R and centre-crops R x R (bilinear, as torchvision's Resize +
    CenterCrop), flips at random and returns a uint8 (C, R, R) tensor, through a DataLoader with
    the same workers and batch size: what torchvision's ImageFolder does;
  * ``files-presized``: the same loader over JPEG files already centre-cropped to R (what pre-resizing
    alone buys, without shards);
  * ``shards-<enc>``: genscale's ShardDataModule (resampled mode, its default shuffle buffer) over
    the shards, with the random flip genscale applies to each batch (on the training device; here in
    the consumer loop, on the CPU, where it is charged to the shards).

Each repeat starts a fresh loader, skips ``warmup`` batches (worker start-up, shuffle-buffer fill),
then iterates batches for ``seconds`` and touches every byte of each (a sum); the consumer loop runs
with one torch intra-op thread (``consumer_threads``). Reported: images/s
(median over repeats, with min and max), CPU seconds per image over the timed window (main process
and its DataLoader workers, from psutil; without psutil from getrusage, which then includes the
warm-up), and the cores that would feed a BigGAN-128 run at 900 images/s. The files are read
several times before timing, so the page cache is warm: these are warm-cache numbers.
"""
from __future__ import annotations

import io
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from data_pipelines.builtin import DataError

BIGGAN_IMAGES_PER_S = 900.0
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "camera", "coins", "moon", "clock")
SOURCE_SHORT_SIDE = (160, 320)
SOURCE_QUALITY = 90


# ----------------------------------------------------------------------------------------------
# Workload


def _photo_arrays() -> tuple:
    """(list of uint8 H,W,3 photos, where they came from)."""
    try:
        import skimage.data as sd
    except ImportError:
        sd = None
    photos = []
    if sd is not None:
        for name in PHOTOS:
            try:
                a = np.asarray(getattr(sd, name)())
            except Exception:  # some need a download or an optional package: skip them
                continue
            if a.dtype != np.uint8:
                continue
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            photos.append(np.ascontiguousarray(a[..., :3]))
    if photos:
        return photos, f"scikit-image photographs ({len(photos)})"
    from data_pipelines.builtin import DATASETS

    imgs, _ = DATASETS["mnist5k"]("")
    photos = [np.repeat(imgs[i, 0][..., None], 3, axis=2) for i in range(64)]
    return photos, "mnist5k digits as RGB (scikit-image is not installed: pip install scikit-image)"


def make_photo_folder(out: Path, n: int, seed: int = 0) -> str:
    """n JPEG files under out/photos/: random crops, rescales, aspect ratios and flips of the photos."""
    from PIL import Image

    photos, origin = _photo_arrays()
    rng = random.Random(seed)
    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        scale = rng.uniform(0.35, 1.0)  # crop area fraction of the largest box with this aspect
        aspect = rng.uniform(3 / 4, 4 / 3)
        ch = min(h, int(round(min(h, w / aspect) * scale ** 0.5)))
        cw = min(w, int(round(ch * aspect)))
        y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
        im = Image.fromarray(a[y:y + ch, x:x + cw])
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        short = rng.randint(*SOURCE_SHORT_SIDE)
        f = short / min(im.size)
        im = im.resize((max(short, int(round(im.size[0] * f))), max(short, int(round(im.size[1] * f)))),
                       Image.BILINEAR)
        im.save(folder / f"{i:06d}.jpg", format="JPEG", quality=SOURCE_QUALITY)
    return origin


def make_presized_folder(files: Sequence[str], out: Path, resolution: int, fmt: str = "JPEG") -> Path:
    """The same images centre-cropped and resized to R (as the shard writer does), one file each."""
    from PIL import Image

    from data_pipelines.shards import JPEG_QUALITY, centre_crop_resize

    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        arr = centre_crop_resize(f, resolution, 3).transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(arr)).save(out / f"{i:06d}.jpg", format=fmt, quality=JPEG_QUALITY)
    return out


def make_digit_files(out: Path, resolution: int = 32) -> Path:
    """The mnist5k train split at R px as one PNG file each (the images the mnist5k shards hold)."""
    from PIL import Image

    from data_pipelines.builtin import load_split

    d = load_split("mnist5k", "train", resolution)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(d)):
        Image.fromarray(d.images[i, 0].numpy()).save(out / f"{i:06d}.png", format="PNG", compress_level=1)
    return out


def _list_files(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))


# ----------------------------------------------------------------------------------------------
# The baseline: one file per sample with PIL


class PerFileImages(Dataset):
    """What torchvision's ImageFolder + Resize(R) + CenterCrop(R) + RandomHorizontalFlip + PILToTensor does."""

    def __init__(self, files: Sequence[str], resolution: int, channels: int = 3):
        self.files, self.resolution, self.channels = list(files), resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        r = self.resolution
        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w, h = im.size
            if min(w, h) != r:
                f = r / min(w, h)
                im = im.resize((max(r, int(round(w * f))), max(r, int(round(h * f)))), Image.BILINEAR)
                w, h = im.size
            if (w, h) != (r, r):
                left, top = (w - r) // 2, (h - r) // 2
                im = im.crop((left, top, left + r, top + r))
            if random.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.array(im, dtype=np.uint8)  # a writable copy, as PILToTensor makes
        arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
        return torch.from_numpy(arr), 0


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2 ** 32)


def file_loader(files: Sequence[str], resolution: int, channels: int, batch: int, workers: int):
    ds = PerFileImages(files, resolution, channels)
    sampler = RandomSampler(ds, replacement=True, num_samples=10 ** 9)  # endless: no epoch restarts
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      worker_init_fn=_seed_worker)


def shard_loader(path: str, resolution: int, batch: int, workers: int, seed: int = 0):
    from data_pipelines.datamodule import ShardDataModule

    dm = ShardDataModule(path, resolution, batch, mode="resampled", num_workers=workers, seed=seed,
                         epoch_batches=10 ** 6, rank=0, world_size=1)
    return dm.train_dataloader()


def genscale_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch flip genscale's GAN module applies on the training device (trainer/gan_module.py)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# Timing


class _CpuClock:
    """CPU seconds of this process and its children (the DataLoader workers)."""

    def __init__(self):
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self.source = "psutil (main process + workers, timed window only)" if self._proc else \
            "getrusage self+children (includes warm-up and worker start-up)"
        self._start: Dict[int, float] = {}

    def _times(self) -> Dict[int, float]:
        if self._proc is None:
            s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return {0: s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime}
        out = {}
        for p in [self._proc] + self._proc.children(recursive=True):
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except Exception:
                continue
        return out

    def start(self) -> None:
        self._start = self._times()

    def elapsed(self) -> float:
        end = self._times()
        return sum(v - self._start.get(pid, 0.0) for pid, v in end.items())


def _touch(x: torch.Tensor) -> int:
    return int(x.sum(dtype=torch.int64))


def time_loader(make, warmup: int, seconds: float, min_batches: int = 2, flip: bool = False) -> dict:
    """One repeat: a fresh loader, ``warmup`` batches, then batches for ``seconds``."""
    clock = _CpuClock()
    gen = torch.Generator().manual_seed(0)
    loader = make()
    it = iter(loader)
    try:
        for _ in range(warmup):
            x, _ = next(it)
            _touch(genscale_flip(x, gen) if flip else x)
        clock.start()
        t0 = time.perf_counter()
        n = b = 0
        shape = None
        while b < min_batches or time.perf_counter() - t0 < seconds:
            x, _ = next(it)
            if flip:
                x = genscale_flip(x, gen)
            _touch(x)
            shape = tuple(x.shape)
            n += x.shape[0]
            b += 1
        dt = time.perf_counter() - t0
        cpu = clock.elapsed()
    finally:
        del it
        del loader
    return {"images": n, "batches": b, "seconds": dt, "images_per_s": n / dt, "cpu_s_per_image": cpu / n,
            "batch_shape": list(shape)}


# ----------------------------------------------------------------------------------------------
# The benchmark


def _summary(name: str, runs: List[dict], meta: dict) -> dict:
    ips = [r["images_per_s"] for r in runs]
    cpu = [r["cpu_s_per_image"] for r in runs]
    cpu_med = statistics.median(cpu)
    return {**meta, "case": name, "images_per_s": statistics.median(ips), "images_per_s_min": min(ips),
            "images_per_s_max": max(ips), "cpu_ms_per_image": 1000 * cpu_med,
            "cores_for_900_img_s": BIGGAN_IMAGES_PER_S * cpu_med, "repeats": len(runs),
            "batch_shape": runs[-1]["batch_shape"], "runs": runs}


def run_data_bench(resolutions: Iterable[int] = (64, 128), encodings: Iterable[str] = ("jpg", "raw", "png"),
                   workers: int = 2, images: int = 2000, batch: int = 64, seconds: float = 4.0,
                   repeats: int = 3, warmup: int = 3, digits: bool = True, presized: bool = True,
                   consumer_threads: int = 1, workdir: Optional[str] = None, log=print) -> dict:
    """Builds the workload, times every case (interleaved repeats) and returns the results dict."""
    from data_pipelines.shards import ENCODINGS, write_shards

    resolutions, encodings = [int(r) for r in resolutions], list(encodings)
    bad = [e for e in encodings if e not in ENCODINGS]
    if bad or not encodings:
        raise DataError(f"--encoding must be some of {', '.join(ENCODINGS)}; got {encodings}.")
    if any(r <= 0 for r in resolutions) or images < 4 or batch <= 0 or workers < 0 or repeats <= 0:
        raise DataError("genscale bench data: resolutions, --batch and --repeats must be positive, --images >= 4, "
                        "--workers >= 0.")
    tmp = tempfile.TemporaryDirectory(prefix="genscale-bench-", dir=workdir)
    root = Path(tmp.name)
    try:
        t_build = time.perf_counter()
        origin = make_photo_folder(root / "folder", images)
        files = _list_files(root / "folder")
        maxcount = max(1, min(1000, -(-images // max(8, 2 * max(1, workers)))))  # >= 8 shards
        cases = []  # (group, name, make, flip, meta)
        for r in resolutions:
            meta = {"workload": "photos", "resolution": r, "encoding": "jpg files"}
            cases.append((f"photos{r}", "files", (lambda r=r: file_loader(files, r, 3, batch, workers)), False,
                          {**meta, "baseline": True}))
            if presized:
                pfiles = _list_files(make_presized_folder(files, root / f"presized{r}", r))
                cases.append((f"photos{r}", "files-presized",
                              (lambda r=r, pf=pfiles: file_loader(pf, r, 3, batch, workers)), False,
                              {**meta, "encoding": f"jpg files at {r} px", "baseline": False}))
            for enc in encodings:
                d = root / f"shards{r}-{enc}"
                write_shards("imagefolder", d, input_path=str(root / "folder"), resolution=r, encoding=enc,
                             maxcount=maxcount, val_fraction=0.01, workers=max(1, workers))
                cases.append((f"photos{r}", f"shards-{enc}",
                              (lambda r=r, d=d: shard_loader(str(d), r, batch, workers)), True,
                              {**meta, "encoding": f"{enc} shards at {r} px", "baseline": False}))
        if digits:
            dfiles = _list_files(make_digit_files(root / "digits32", 32))
            meta = {"workload": "mnist5k", "resolution": 32}
            cases.append(("mnist5k32", "files", lambda: file_loader(dfiles, 32, 1, batch, workers), False,
                          {**meta, "encoding": "png files", "baseline": True}))
            for enc in [e for e in encodings if e in ("png", "raw")] or ["png"]:
                d = root / f"digits32-{enc}"
                write_shards("mnist5k", d, resolution=32, encoding=enc, maxcount=500, val_fraction=0.1,
                             workers=max(1, workers))
                cases.append(("mnist5k32", f"shards-{enc}", (lambda d=d: shard_loader(str(d), 32, batch, workers)),
                              True, {**meta, "encoding": f"{enc} shards", "baseline": False}))
        build_s = time.perf_counter() - t_build
        log(f"genscale bench data: workload built in {build_s:.1f} s ({len(files)} photo files from {origin}; "
            f"{len(cases)} cases); timing {repeats} interleaved repeats of ~{seconds:g} s each")
        # Warm the page cache: read every file of the workload once.
        for p in root.rglob("*"):
            if p.is_file():
                p.read_bytes()
        runs: Dict[tuple, List[dict]] = {(g, n): [] for g, n, *_ in cases}
        # The consumer loop runs one intra-op thread, as genscale's CPU experiments do (trainer.cpu_threads=1):
        # with torch's default (one per core) its flip and sum spin against the busy workers on a 2-core machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(consumer_threads)
        try:
            for k in range(repeats):
                for g, n, make, flip, _ in cases:
                    res = time_loader(make, warmup, seconds, flip=flip)
                    runs[g, n].append(res)
                    log(f"  repeat {k + 1}/{repeats} {g:10s} {n:15s} {res['images_per_s']:9.0f} img/s  "
                        f"{1000 * res['cpu_s_per_image']:.2f} CPU ms/img")
        finally:
            torch.set_num_threads(threads)
        results = []
        base: Dict[str, float] = {}
        for g, n, _, _, meta in cases:
            s = _summary(n, runs[g, n], {"group": g, **meta})
            if meta["baseline"]:
                base[g] = s["images_per_s"]
            results.append(s)
        for s in results:
            s["ratio_vs_files"] = s["images_per_s"] / base[s["group"]] if s["group"] in base else None
        return {
            "benchmark": "data", "unit": "images/s delivered to the consumer loop (median of repeats)",
            "settings": {"resolutions": resolutions, "encodings": encodings, "workers": workers, "images": images,
                         "batch": batch, "seconds": seconds, "repeats": repeats, "warmup_batches": warmup,
                         "consumer_threads": consumer_threads,
                         "shard_maxcount": maxcount, "photo_source": origin,
                         "source_files": f"JPEG q{SOURCE_QUALITY}, short side {SOURCE_SHORT_SIDE[0]}-"
                                         f"{SOURCE_SHORT_SIDE[1]} px",
                         "page_cache": "warm (every file read before timing, and again each repeat)",
                         "cpu_time": _CpuClock().source, "build_seconds": build_s},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cpu_model": _cpu_model(), "load_avg_1m": _load()},
            "commit": _commit(),
            "biggan128_images_per_s": BIGGAN_IMAGES_PER_S,
            "results": results,
        }
    finally:
        tmp.cleanup()


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def format_table(result: dict) -> str:
    rows = ["| workload | px | loader | images/s (median, min-max) | x files | CPU ms/img | cores for 900 img/s |",
            "|---|---|---|---|---|---|---|"]
    for s in result["results"]:
        ratio = f"{s['ratio_vs_files']:.2f}" if s.get("ratio_vs_files") is not None else ""
        rows.append(f"| {s['workload']} | {s['resolution']} | {s['case']} ({s['encoding']}) | "
                    f"{s['images_per_s']:,.0f} ({s['images_per_s_min']:,.0f}-{s['images_per_s_max']:,.0f}) | "
                    f"{ratio} | {s['cpu_ms_per_image']:.2f} | {s['cores_for_900_img_s']:.1f} |")
    return "\n".join(rows)
