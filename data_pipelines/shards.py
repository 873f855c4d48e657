"""Writing and inspecting webdataset shards: ``train-000000.tar ...``, ``val-...`` and ``index.json``.

Each sample is one image under the encoding's extension (``png``, ``jpg`` or ``raw``: uint8 bytes in
C,H,W order, shape in index.json) and its integer label as ``cls``. Shards are written with
webdataset's ShardWriter, under a temporary name that is renamed once the shard is complete;
``index.json`` (sample counts, sha256 per shard, resolution, channels, classes, encoding) is written
last and atomically, and any old one is removed before writing starts. The reader trusts only the
shards that index.json lists, so a crash at any point leaves nothing it would read as complete.
Writing is deterministic (fixed tar metadata), so rewriting gives byte-identical shards.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_pipelines.builtin import DATASETS, SPLIT_SEED, ArrayDataset, DataError

INDEX = "index.json"
FORMAT = "genscale-shards"
VERSION = 1
ENCODINGS = ("png", "jpg", "raw")
SOURCES = ("imagefolder", "npz", "mnist5k", "digits", "cifar10")
SPLITS = ("train", "val")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------
# Encoding and decoding one image


def encode_image(img: np.ndarray, encoding: str) -> bytes:
    """uint8 (C, H, W) -> bytes in the given encoding."""
    if encoding == "raw":
        return np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    from PIL import Image

    arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def decode_image(data: bytes, encoding: str, shape: Sequence[int]) -> np.ndarray:
    """bytes -> uint8 (C, H, W) of exactly ``shape``; raises ValueError on anything else."""
    c, h, w = (int(v) for v in shape)
    if encoding == "raw":
        if len(data) != c * h * w:
            raise ValueError(f"raw image has {len(data)} bytes, expected {c}x{h}x{w}={c * h * w}")
        return np.frombuffer(data, dtype=np.uint8).reshape(c, h, w)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if c == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape != (c, h, w):
        raise ValueError(f"image is {tuple(arr.shape)}, expected {(c, h, w)}")
    return arr


def decode_label(data: Optional[bytes]) -> int:
    if data is None:
        raise ValueError("no 'cls' label")
    try:
        value = int(bytes(data).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"label {bytes(data)[:20]!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"label {value} is negative")
    return value


# ----------------------------------------------------------------------------------------------
# Sources: everything becomes a list of items per split, encoded in the writer processes


@dataclass
class _Source:
    """Per split: either uint8 arrays (N,C,H,W) or image files, plus labels and metadata."""
    splits: Dict[str, dict]  # split -> {"images": array | None, "files": list | None, "labels": array}
    channels: int
    resolution: int
    classes: List[str]
    has_labels: bool
    split_rule: str


def _seeded_split(n: int, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """The split builtin.load_split uses: one permutation (seed 1234), the first round(n*f) are val."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _resize_array(images: np.ndarray, resolution: Optional[int]) -> np.ndarray:
    if not resolution or (images.shape[-1] == resolution and images.shape[-2] == resolution):
        return images
    import torch

    from data_pipelines.builtin import resize_uint8

    if images.shape[-1] != images.shape[-2]:
        raise DataError(f"Images are {images.shape[-2]}x{images.shape[-1]}; --resolution needs square "
                        "arrays (use --source imagefolder for centre crops).")
    return resize_uint8(torch.from_numpy(np.ascontiguousarray(images)), resolution).numpy()


def _array_source(imgs: np.ndarray, labels: np.ndarray, resolution: Optional[int], val_fraction: float,
                  classes: Optional[List[str]], has_labels: bool) -> _Source:
    train_idx, val_idx = _seeded_split(len(imgs), val_fraction)
    splits = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        # Same order of operations as builtin.load_split (select, then resize), so values match it exactly.
        splits[split] = {"images": _resize_array(np.ascontiguousarray(imgs[idx]), resolution), "files": None,
                         "labels": labels[idx].astype(np.int64)}
    num_classes = int(labels.max()) + 1 if len(labels) and has_labels else 0
    return _Source(splits, imgs.shape[1], splits["train"]["images"].shape[-1],
                   classes or [str(k) for k in range(num_classes)], has_labels,
                   f"seeded permutation (seed {SPLIT_SEED}), val fraction {val_fraction}")


def _load_cifar10(path: str, resolution: Optional[int], val_fraction: float) -> _Source:
    root = Path(path or "")
    if not path or not root.is_dir():
        raise DataError(f"--source cifar10 needs --input DIR holding the python batches (data_batch_1..5, "
                        f"test_batch, batches.meta), e.g. cifar-10-batches-py/; got '{path}'.")
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files:
        raise DataError(f"No data_batch_* files in '{root}': is it the extracted cifar-10-batches-py directory?")

    def read(p: Path) -> Tuple[np.ndarray, np.ndarray]:
        try:
            with open(p, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return data, np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:
            raise DataError(f"Cannot read CIFAR-10 batch '{p}': {e}. Expected the python-pickle format.") from None

    parts = [read(p) for p in train_files]
    imgs = np.concatenate([a for a, _ in parts])
    labels = np.concatenate([b for _, b in parts])
    classes = [str(k) for k in range(10)]
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as fh:
            classes = [n.decode() if isinstance(n, bytes) else str(n)
                       for n in pickle.load(fh, encoding="bytes")[b"label_names"]]
    test = root / "test_batch"
    if not test.exists():  # no official test split: the seeded split of the training batches
        return _array_source(imgs, labels, resolution, val_fraction, classes, True)
    val_imgs, val_labels = read(test)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(imgs))  # shuffle train across shards
    splits = {"train": {"images": _resize_array(imgs[order], resolution), "files": None, "labels": labels[order]},
              "val": {"images": _resize_array(val_imgs, resolution), "files": None, "labels": val_labels}}
    return _Source(splits, 3, splits["train"]["images"].shape[-1], classes, True,
                   "official CIFAR-10 split (data_batch_* train, test_batch val)")


def _load_imagefolder(path: str, resolution: Optional[int], val_fraction: float) -> _Source:
    root = Path(path or "")
    if not path or not root.is_dir():
        raise DataError(f"--source imagefolder needs --input DIR with one sub-folder of images per class; got '{path}'.")
    if not resolution:
        raise DataError("--source imagefolder needs --resolution R (images are centre-cropped and resized to R x R).")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    if class_dirs:
        for k, d in enumerate(class_dirs):
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                    files.append(str(p))
                    labels.append(k)
        classes, has_labels = [d.name for d in class_dirs], True
    else:  # a flat folder: unlabelled images
        files = [str(p) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        labels, classes, has_labels = [0] * len(files), [], False
    if len(files) < 2:
        raise DataError(f"Found {len(files)} image(s) ({', '.join(IMAGE_EXTS)}) under '{root}'; need at least 2.")
    labels_arr = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx = _seeded_split(len(files), val_fraction)
    splits = {s: {"images": None, "files": [files[i] for i in idx], "labels": labels_arr[idx]}
              for s, idx in (("train", train_idx), ("val", val_idx))}
    return _Source(splits, 3, resolution, classes, has_labels,
                   f"seeded permutation (seed {SPLIT_SEED}), val fraction {val_fraction}")


def load_source(source: str, input_path: str = "", resolution: Optional[int] = None,
                val_fraction: float = 0.1) -> _Source:
    if source not in SOURCES:
        raise DataError(f"Unknown source '{source}'. Valid: {', '.join(SOURCES)}.")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}.")
    if resolution is not None and resolution <= 0:
        raise DataError(f"--resolution must be positive, got {resolution}.")
    if source == "npz" and not input_path:
        raise DataError("--source npz needs --input FILE.npz holding 'images' (N,H,W[,C] or N,C,H,W uint8) and "
                        "optionally 'labels'.")
    if source == "imagefolder":
        return _load_imagefolder(input_path, resolution, val_fraction)
    if source == "cifar10":
        return _load_cifar10(input_path, resolution, val_fraction)
    imgs, labels = DATASETS[source](input_path)
    has_labels = labels is not None
    labels = np.zeros(len(imgs), np.int64) if labels is None else labels
    return _array_source(imgs, labels, resolution, val_fraction, None, has_labels)


def centre_crop_resize(path: str, resolution: int, channels: int = 3) -> np.ndarray:
    """An image file -> uint8 (C, R, R): the largest centred square, resized with Lanczos."""
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"Cannot read the image '{path}' ({type(e).__name__}: {e}). Fix or remove the file, "
                        "then write the shards again.") from None
    with im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Writing


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def _write_group(out: str, split: str, first_shard: int, offset: int, maxcount: int, encoding: str,
                 resolution: int, channels: int, images: Optional[np.ndarray], files: Optional[List[str]],
                 labels: np.ndarray) -> List[dict]:
    """Writes consecutive shards first_shard, first_shard+1, ... (one writer process's share)."""
    import webdataset as wds

    out_dir = Path(out)
    tmp_pattern = str(out_dir / f".{split}-%06d.tar.tmp-{os.getpid()}")
    done: List[dict] = []
    counts: Dict[str, int] = {}

    def finished(tmp_name: str) -> None:  # ShardWriter's post hook: the shard is complete and closed
        k = int(Path(tmp_name).name.split("-")[1].split(".")[0])
        final = out_dir / shard_name(split, k)
        os.replace(tmp_name, final)
        done.append({"name": final.name, "count": counts[tmp_name], "sha256": _sha256(final),
                     "bytes": final.stat().st_size})

    n = len(labels)
    writer = wds.ShardWriter(tmp_pattern, maxcount=maxcount, maxsize=float("inf"), post=finished,
                             start_shard=first_shard, verbose=0, encoder=False, mtime=0.0)
    try:
        for i in range(n):
            img = images[i] if images is not None else centre_crop_resize(files[i], resolution, channels)
            sample = {"__key__": f"{split}-{offset + i:09d}", encoding: encode_image(img, encoding),
                      "cls": str(int(labels[i])).encode("ascii")}
            writer.write(sample)
            counts[writer.fname] = writer.count
        writer.close()
    except BaseException:
        if writer.tarstream is not None:  # do not let close() publish a half-written shard
            writer.tarstream.close()
            writer.tarstream = None
        for p in out_dir.glob(f".{split}-*.tar.tmp-{os.getpid()}"):
            p.unlink(missing_ok=True)
        raise
    return done


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(source: str, out: str | os.PathLike, input_path: str = "", resolution: Optional[int] = None,
                 encoding: str = "png", maxcount: int = 1000, val_fraction: float = 0.1,
                 workers: int = 1) -> dict:
    """Writes train/val shards and index.json to ``out``; returns the index."""
    if encoding not in ENCODINGS:
        raise DataError(f"Unknown encoding '{encoding}'. Valid: {', '.join(ENCODINGS)}.")
    if maxcount <= 0 or workers <= 0:
        raise DataError(f"--shard-maxcount and --workers must be positive (got {maxcount}, {workers}).")
    src = load_source(source, input_path, resolution, val_fraction)
    if encoding == "jpg" and src.channels not in (1, 3):
        raise DataError(f"jpg needs 1 or 3 channels, the data has {src.channels}; use png or raw.")
    out_dir = Path(out)
    # The new shards are written beside the old ones, in a staging folder: a write that fails (an
    # unreadable input file, a full disk) leaves an existing dataset as it was.
    stage = out_dir / f".staging-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for left in out_dir.glob(".staging-*"):  # of a write that was killed
            shutil.rmtree(left, ignore_errors=True)
        stage.mkdir()
    except OSError as e:
        raise DataError(f"Cannot write shards to '{out_dir}' ({e.strerror or e}). Pass an --out directory you "
                        "can write to.") from None
    try:
        index = _write_all(src, source, input_path, encoding, maxcount, val_fraction, workers, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # From here on the directory holds no trusted shards until the new index.json lands.
    (out_dir / INDEX).unlink(missing_ok=True)
    for old in list(out_dir.glob("train-*.tar")) + list(out_dir.glob("val-*.tar")) + list(out_dir.glob(".*.tmp-*")):
        old.unlink()
    for new in stage.glob("*.tar"):
        os.replace(new, out_dir / new.name)
    shutil.rmtree(stage, ignore_errors=True)
    _atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def _write_all(src, source: str, input_path: str, encoding: str, maxcount: int, val_fraction: float,
               workers: int, out_dir: Path) -> dict:
    """Every shard of ``src`` into ``out_dir``; returns the index (not written)."""
    jobs = []
    for split in SPLITS:
        s = src.splits[split]
        n = len(s["labels"])
        n_shards = -(-n // maxcount)
        k = min(workers, n_shards)
        bounds = [round(j * n_shards / k) for j in range(k + 1)]  # contiguous shard groups per worker
        for j in range(k):
            a, b = bounds[j] * maxcount, min(bounds[j + 1] * maxcount, n)
            jobs.append(dict(out=str(out_dir), split=split, first_shard=bounds[j], offset=a, maxcount=maxcount,
                             encoding=encoding, resolution=src.resolution, channels=src.channels,
                             images=None if s["images"] is None else s["images"][a:b],
                             files=None if s["files"] is None else s["files"][a:b], labels=s["labels"][a:b]))
    if workers == 1:
        results = [_write_group(**job) for job in jobs]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            results = [f.result() for f in [pool.submit(_write_group, **job) for job in jobs]]
    shards = {split: [] for split in SPLITS}
    for job, res in zip(jobs, results):
        shards[job["split"]].extend(res)
    index = {
        "format": FORMAT, "version": VERSION,
        "source": source, "input": str(input_path or ""), "encoding": encoding,
        "resolution": src.resolution, "channels": src.channels,
        "shape": [src.channels, src.resolution, src.resolution],
        "classes": src.classes, "num_classes": len(src.classes), "labels": src.has_labels,
        "split": src.split_rule, "val_fraction": val_fraction,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "splits": {split: {"count": sum(sh["count"] for sh in sorted_shards),
                           "shards": sorted_shards}
                   for split, sorted_shards in ((sp, sorted(shards[sp], key=lambda d: d["name"])) for sp in SPLITS)},
    }
    return index


# ----------------------------------------------------------------------------------------------
# Reading the index, and whole splits into memory (evaluation, inspection)


def read_index(path: str | os.PathLike) -> dict:
    """index.json of a shard directory (or the file itself), checked for the fields readers use."""
    p = Path(path)
    f = p / INDEX if p.is_dir() or not p.suffix == ".json" else p
    if not f.exists():
        raise DataError(f"No {INDEX} in '{p}': it is not a complete shard directory (a write that did not "
                        "finish leaves none). Write shards with `genscale data write ... --out DIR`.")
    try:
        index = json.loads(f.read_text())
    except Exception as e:
        raise DataError(f"Cannot parse '{f}': {e}. Rewrite the shards with `genscale data write`.") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"'{f}' is not a {FORMAT} v{VERSION} index (format={index.get('format')!r}, "
                        f"version={index.get('version')!r}). Rewrite the shards with this genscale.")
    return index


def iter_shard_samples(path: str | os.PathLike, split: str, index: Optional[dict] = None):
    """Yields (shard name, key, sample dict of bytes) from the listed shards of a split, in order."""
    import webdataset as wds

    index = index or read_index(path)
    for sh in index["splits"][split]["shards"]:
        url = str(Path(path) / sh["name"])
        for sample in wds.tarfile_samples([{"url": url}]):
            yield sh["name"], sample["__key__"], sample


def _shard_dir_of(path: str, split: str) -> str:
    """The shard directory behind data.path: itself, or for a pattern of its shards (train-{0..9}.tar)
    the local folder holding them with their index.json, which lists every split."""
    path = path[len("file://"):] if path.startswith("file://") else path
    if os.path.isdir(path) or path.endswith(".json"):
        return path
    first = path.split("::")[0]
    base = first.rsplit("/", 1)[0] if "/" in first else "."
    if "://" not in base and not first.startswith("pipe:") and os.path.exists(os.path.join(base, INDEX)):
        return base
    raise DataError(f"The '{split}' split is read from the index.json of a local shard directory, and data.path "
                    f"'{path}' is a pattern with none beside its shards. Copy the shards and their index.json to "
                    "a local directory (or write them with `genscale data write`) and pass that directory.")


def load_shard_split(path: str, split: str, resolution: Optional[int] = None) -> ArrayDataset:
    """A whole split of a shard directory as in-memory uint8 tensors (for evaluation)."""
    import torch

    from data_pipelines.builtin import resize_uint8

    if not path:
        raise DataError("data.name=shards needs data.path=<shard directory with index.json>.")
    path = _shard_dir_of(str(path), split)
    index = read_index(path)
    if split not in index["splits"]:
        raise DataError(f"'{path}' has no '{split}' split (has {', '.join(index['splits'])}).")
    imgs, labels = [], []
    for _, _, s in iter_shard_samples(path, split, index):
        imgs.append(decode_image(s[index["encoding"]], index["encoding"], index["shape"]))
        labels.append(decode_label(s.get("cls")) if index["labels"] else 0)
    if not imgs:
        raise DataError(f"The '{split}' split of '{path}' holds no samples.")
    images = torch.from_numpy(np.stack(imgs))
    if resolution:
        if resolution > index["resolution"]:
            raise DataError(f"Shards in '{path}' are stored at {index['resolution']} px; resolution {resolution} "
                            "would upsample. Rewrite them with `genscale data write --resolution "
                            f"{resolution}` or lower data.resolution.")
        images = resize_uint8(images, resolution)
    num_classes = index["num_classes"] if index["labels"] else 0
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), num_classes, "shards")


# ----------------------------------------------------------------------------------------------
# Inspection


def make_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) image with a white border between tiles."""
    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    return grid


def save_grid_png(images: np.ndarray, out: str | os.PathLike, ncol: int = 8) -> Path:
    from PIL import Image

    grid = make_grid(images, ncol)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out)
    return out


def inspect_shards(path: str | os.PathLike, grid: Optional[str] = None, verify: bool = False,
                   grid_count: int = 64) -> dict:
    """Counts and classes from index.json; optionally a sample grid and a full verify pass.

    The verify pass checks every listed shard's sha256 and decodes every sample; it reports files that
    are missing or changed and samples that cannot be read, with their shard and key.
    """
    index = read_index(path)
    root = Path(path)
    report = {"path": str(root), "encoding": index["encoding"], "resolution": index["resolution"],
              "channels": index["channels"], "classes": index["classes"], "labels": index["labels"],
              "source": index.get("source"),
              "splits": {s: {"count": v["count"], "shards": len(v["shards"])} for s, v in index["splits"].items()}}
    if grid:
        imgs = []
        for _, _, s in iter_shard_samples(root, "train", index):
            try:
                imgs.append(decode_image(s[index["encoding"]], index["encoding"], index["shape"]))
            except Exception:
                continue
            if len(imgs) >= grid_count:
                break
        if not imgs:
            raise DataError(f"No readable train samples in '{root}' for a grid; run with --verify to see why.")
        report["grid"] = str(save_grid_png(np.stack(imgs), grid))
    if verify:
        problems: List[str] = []
        per_class: Dict[int, int] = {}
        good = 0
        for split, v in index["splits"].items():
            for sh in v["shards"]:
                f = root / sh["name"]
                if not f.exists():
                    problems.append(f"{sh['name']}: missing")
                    continue
                if _sha256(f) != sh["sha256"]:
                    problems.append(f"{sh['name']}: sha256 differs from index.json (changed or truncated)")
                n = 0
                try:
                    from data_pipelines.tario import shard_samples

                    # genscale's own tar reader, as training uses: its errors name the byte and the damage
                    for s in shard_samples([{"url": str(f)}], lambda u: open(u, "rb"), lambda e: False):
                        try:
                            if index["encoding"] not in s:
                                raise ValueError(f"no '{index['encoding']}' image in the sample")
                            decode_image(s[index["encoding"]], index["encoding"], index["shape"])
                            label = decode_label(s.get("cls")) if index["labels"] else 0
                            per_class[label] = per_class.get(label, 0) + (split == "train")
                            n += 1
                        except Exception as e:
                            problems.append(f"{sh['name']}: sample {s.get('__key__')}: {e}")
                except (tarfile.TarError, OSError, ValueError) as e:
                    why = e.args[0] if e.args else e  # the reader adds the url as a second argument
                    problems.append(f"{sh['name']}: unreadable tar after {n} samples: {why}")
                if n != sh["count"]:
                    problems.append(f"{sh['name']}: {n} readable samples, index.json lists {sh['count']}")
                good += n
        report["verify"] = {"ok": not problems, "readable_samples": good, "problems": problems,
                            "train_per_class": {str(k): per_class[k] for k in sorted(per_class)}}
    return report
