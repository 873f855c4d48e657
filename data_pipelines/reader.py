"""Reading webdataset shards as endless, rank-aware streams of uint8 batches.

One ``ShardStream`` is built per rank with that rank's index and the world size passed in (nothing
is read from environment variables inside DataLoader workers). Each DataLoader worker asks torch
for its worker id and derives every random choice from (seed, rank, worker, epoch, pass), so a
stream is reproducible.

Modes (``data.mode``):
  * ``resampled``: every rank and worker draws shards with replacement (webdataset's
    ResampledShards); an epoch is exactly ``epoch_batches`` batches per rank, split across the
    workers, so ranks never disagree on the number of batches, whatever the shard sizes.
  * ``exact``: each epoch the shards (shuffled by (seed, epoch)) are dealt to ranks, then to
    workers; every rank yields the same number of batches, the smallest any rank can fill from its
    shards (sample counts come from index.json), so the ranks see disjoint samples and no rank waits
    on another. Needs at least ranks x workers shards.

Samples are shuffled in a buffer of raw bytes, then decoded to uint8 (C, H, W); samples that cannot
be read (truncated tar, undecodable image, missing or non-integer label) are skipped, counted and
warned about with their shard name. A pass over the shards with no readable sample raises DataError
instead of looping forever. Batches are downsampled (antialiased) to the resolution currently
requested, read from shared memory before every batch, so it can be lowered during training.
"""
from __future__ import annotations

import os
import random
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.builtin import DataError, resize_uint8
from data_pipelines.shards import ENCODINGS, INDEX, decode_image, decode_label, read_index
from data_pipelines.tario import shard_samples

MODES = ("resampled", "exact")
WARN_FIRST = 5  # per worker and epoch: the first few skipped samples are warned about, then every 100th


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash() of strings)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Shard lists


@dataclass
class ShardSource:
    urls: List[str]
    counts: Optional[List[int]]  # samples per shard when an index lists them
    encoding: str
    shape: Tuple[int, int, int]  # stored (C, H, W)
    labels: bool
    num_classes: int
    index: Optional[dict]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> int:
        return self.shape[-1]

    @property
    def total(self) -> Optional[int]:
        return sum(self.counts) if self.counts is not None else None


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _check_scheme(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise DataError(f"Shard URL '{url[:80]}' is a pipe: command, which runs a shell command. "
                        "Set data.allow_pipe=true only if you trust this config.")
    scheme = url.split(":", 1)[0] if "://" in url else ""
    if scheme and scheme not in ("http", "https", "file"):
        raise DataError(f"Unsupported shard URL scheme '{scheme}://' in '{url}'. Use a local path, "
                        "http(s)://, or pipe: (with data.allow_pipe=true).")


def _fetch_text(url: str, timeout: float = 15.0) -> Optional[str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except Exception:
        return None


def _check_remote(url: str, timeout: float = 15.0) -> None:
    """The first shard answers (HEAD, or a one-byte GET where servers refuse HEAD)."""
    err: Exception = RuntimeError("no answer")
    for req in (urllib.request.Request(url, method="HEAD"), urllib.request.Request(url, headers={"Range": "bytes=0-0"})):
        try:
            with urllib.request.urlopen(req, timeout=timeout):
                return
        except urllib.error.HTTPError as e:
            err = e
            if e.code not in (403, 405, 501):  # only these may mean "HEAD not allowed"
                break
        except Exception as e:
            err = e
            break
    raise DataError(f"Shard URL '{url}' cannot be reached: {err}. Check data.path.") from None


def resolve_shards(path: str, split: str = "train", allow_pipe: bool = False) -> ShardSource:
    """data.path (a shard directory holding index.json, or a URL / brace pattern) -> its shards.

    A directory yields exactly the shards its index.json lists for ``split``. A pattern such as
    ``/data/train-{000000..000127}.tar`` or ``https://host/d/train-{0..9}.tar`` is expanded with its
    braces; counts and image format come from an index.json beside the shards when there is one.
    """
    import braceexpand

    if not path:
        raise DataError("data.name=shards needs data.path: a shard directory (with index.json) or a URL "
                        "pattern such as /data/train-{000000..000009}.tar.")
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    local_dir = not _is_remote(path) and not path.startswith("pipe:") and os.path.isdir(path)
    if local_dir:
        index = read_index(path)
        if split not in index["splits"]:
            raise DataError(f"'{path}' has no '{split}' split (it has {', '.join(index['splits'])}).")
        listed = index["splits"][split]["shards"]
        urls = [str(Path(path) / sh["name"]) for sh in listed]
        counts = [int(sh["count"]) for sh in listed]
    else:
        urls = [u for part in path.split("::") for u in braceexpand.braceexpand(part)]
        for u in urls:
            _check_scheme(u, allow_pipe)
        index, counts = None, None
        if urls and not urls[0].startswith("pipe:"):
            base = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
            if _is_remote(base):
                text = _fetch_text(f"{base}/{INDEX}")
                if text:
                    import json

                    try:
                        index = json.loads(text)
                    except ValueError:
                        index = None
            elif os.path.exists(os.path.join(base, INDEX)):
                index = read_index(base)
        if index is not None:
            by_name = {sh["name"]: int(sh["count"]) for s in index["splits"].values() for sh in s["shards"]}
            names = [u.rsplit("/", 1)[-1] for u in urls]
            counts = [by_name[n] for n in names] if all(n in by_name for n in names) else None
    if not urls:
        raise DataError(f"data.path='{path}' names no shards (an empty list). Point it at a shard directory "
                        "or a pattern like train-{000000..000009}.tar.")
    missing = [u for u in urls if not _is_remote(u) and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing and len(urls) == 1 and not urls[0].endswith(".tar"):
        raise DataError(f"data.path='{path}' does not exist. Point it at a shard directory written by `genscale data "
                        "write` (with index.json) or at shards like train-{000000..000009}.tar.")
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. '{missing[0]}'. "
                        "Check data.path (and the brace range).")
    if _is_remote(urls[0]):
        _check_remote(urls[0])
    if index is not None:
        return ShardSource(urls, counts, index["encoding"], tuple(index["shape"]), bool(index["labels"]),
                           int(index["num_classes"]) if index["labels"] else 0, index)
    return _probe(urls, counts)


def _probe(urls: List[str], counts: Optional[List[int]]) -> ShardSource:
    """Without an index.json: the image format from the first readable sample."""
    import webdataset as wds

    for url in urls[:3]:
        try:
            for s in wds.tarfile_samples([{"url": url}]):
                for enc in ENCODINGS:
                    if enc in s and enc != "raw":
                        img = decode_image(s[enc], enc, _shape_of(s[enc]))
                        return ShardSource(urls, counts, enc, tuple(img.shape), "cls" in s, 0, None)
                break
        except Exception:
            continue
    raise DataError(f"Cannot tell the image format of '{urls[0]}' and there is no {INDEX} beside it. "
                    "Write shards with `genscale data write` (raw images need its index.json).")


def _shape_of(data: bytes) -> Tuple[int, int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return (1 if im.mode in ("L", "1", "I;16", "I", "F") else 3, im.size[1], im.size[0])


# ----------------------------------------------------------------------------------------------
# Exact-mode accounting


def exact_plan(counts: Sequence[int], world_size: int, num_workers: int, batch_size: int, seed: int,
               epoch: int) -> Tuple[Dict[Tuple[int, int], List[int]], Dict[Tuple[int, int], int], int]:
    """Shards and batch quota of every (rank, worker) in an epoch, and the batches per rank.

    Every rank computes the same plan from the index counts, so all agree on the epoch length
    without communicating: the smallest number of full batches any rank can fill.
    """
    order = list(range(len(counts)))
    random.Random(mix(seed, epoch, 0xE7AC7)).shuffle(order)
    shards: Dict[Tuple[int, int], List[int]] = {}
    caps: Dict[Tuple[int, int], int] = {}
    for r in range(world_size):
        mine = order[r::world_size]
        for w in range(num_workers):
            shards[r, w] = mine[w::num_workers]
            caps[r, w] = sum(counts[i] for i in shards[r, w]) // batch_size
    per_rank = min(sum(caps[r, w] for w in range(num_workers)) for r in range(world_size))
    quota: Dict[Tuple[int, int], int] = {}
    for r in range(world_size):
        q, left = [0] * num_workers, per_rank
        while left:
            for w in range(num_workers):
                if left and q[w] < caps[r, w]:
                    q[w] += 1
                    left -= 1
        quota.update({(r, w): q[w] for w in range(num_workers)})
    return shards, quota, per_rank


# ----------------------------------------------------------------------------------------------
# The stream


class ShardStream(IterableDataset):
    """Endless-by-epochs batches ``(uint8 (B, C, R, R), int64 (B,))`` for one rank."""

    def __init__(self, source: ShardSource, *, rank: int, world_size: int, batch_size: int, mode: str = "resampled",
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, epoch_batches: int = 0,
                 resolution: Optional[int] = None):
        super().__init__()
        if mode not in MODES:
            raise DataError(f"Unknown data.mode '{mode}'. Valid: {', '.join(MODES)}.")
        if batch_size <= 0:
            raise DataError(f"Per-rank batch size must be positive, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        self.source, self.rank, self.world_size, self.batch_size = source, rank, world_size, batch_size
        self.mode, self.num_workers, self.seed, self.shuffle_buffer = mode, max(1, num_workers), seed, shuffle_buffer
        self.epoch = 0  # set by the loader before each epoch (copied into fresh workers)
        n_urls = len(source.urls)
        if mode == "exact":
            if source.counts is None:
                raise DataError("data.mode=exact needs the sample count of every shard, from the index.json of a "
                                "shard directory; use a shard directory or data.mode=resampled.")
            if n_urls < world_size * self.num_workers:
                raise DataError(f"data.mode=exact needs at least ranks x workers = {world_size} x {self.num_workers}"
                                f" = {world_size * self.num_workers} shards, but there are {n_urls}. Write more, "
                                "smaller shards (--shard-maxcount), lower data.num_workers, or use data.mode=resampled.")
            if self.epoch_length(0) == 0:
                raise DataError(f"data.mode=exact: some rank's shards hold fewer than one batch of {batch_size} "
                                "samples. Lower data.batch_size or use data.mode=resampled.")
        else:
            if epoch_batches <= 0:
                if source.total is None:
                    raise DataError("data.epoch_batches must be set (> 0) for shards without an index.json "
                                    "(their sample counts are unknown).")
                epoch_batches = max(1, source.total // (batch_size * world_size))
            if epoch_batches < self.num_workers:
                raise DataError(f"data.epoch_batches={epoch_batches} is below data.num_workers={self.num_workers}: "
                                "every worker needs at least one batch per epoch.")
        self.epoch_batches = epoch_batches
        # Shared memory, so that DataLoader workers see the value the trainer sets and report back.
        self._resolution = torch.tensor([resolution or source.resolution], dtype=torch.int64).share_memory_()
        self._skipped = torch.zeros(self.num_workers, dtype=torch.int64).share_memory_()
        self.set_resolution(resolution or source.resolution)

    # ---- knobs read by the trainer ---------------------------------------------------------
    @property
    def resolution(self) -> int:
        return int(self._resolution[0])

    def set_resolution(self, resolution: int) -> None:
        if resolution > self.source.resolution:
            raise DataError(f"Resolution {resolution} is above the stored {self.source.resolution} px of these "
                            f"shards; they can only be downsampled. Rewrite them with `genscale data write "
                            f"--resolution {resolution}`.")
        if resolution <= 0:
            raise DataError(f"Resolution must be positive, got {resolution}.")
        self._resolution[0] = resolution

    @property
    def skipped(self) -> int:
        return int(self._skipped.sum())

    def epoch_length(self, epoch: int) -> int:
        """Batches this rank yields in ``epoch`` (the same on every rank)."""
        if self.mode == "resampled":
            return self.epoch_batches
        return exact_plan(self.source.counts, self.world_size, self.num_workers, self.batch_size, self.seed, epoch)[2]

    # ---- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.num_workers:
            raise DataError(f"ShardStream was built for {self.num_workers} worker(s) but runs in {n_workers}.")
        epoch = self.epoch
        if self.mode == "exact":
            shards, quota, _ = exact_plan(self.source.counts, self.world_size, n_workers, self.batch_size,
                                          self.seed, epoch)
            mine, q = shards[self.rank, worker], quota[self.rank, worker]
        else:
            mine = None
            q = self.epoch_batches // n_workers + (worker < self.epoch_batches % n_workers)
        return self._batches(worker, epoch, mine, q)

    def _shard_iter(self, worker: int, epoch: int, mine: Optional[List[int]], pass_no: int):
        import webdataset as wds

        if mine is not None:
            urls = [self.source.urls[i] for i in mine]
            random.Random(mix(self.seed, self.rank, worker, epoch, pass_no, 0x5A4D)).shuffle(urls)
            return iter([{"url": u} for u in urls]), len(urls)
        n = len(self.source.urls)
        seed = mix(self.seed, epoch, pass_no)
        shards = wds.ResampledShards(self.source.urls, nshards=n, seed=seed, deterministic=True,
                                     worker_seed=lambda: mix(self.rank, worker))
        return iter(shards), n

    def _batches(self, worker: int, epoch: int, mine: Optional[List[int]], quota: int):
        import webdataset as wds

        src = self.source
        produced, pass_no, imgs, labels = 0, 0, [], []
        warned = [0]

        def skip(where: str, err: object) -> None:
            self._skipped[worker] += 1
            warned[0] += 1
            if warned[0] <= WARN_FIRST or warned[0] % 100 == 0:
                warnings.warn(f"genscale data: skipped an unreadable sample in {where}: {err} "
                              f"({int(self._skipped[worker])} skipped by rank {self.rank} worker {worker}).",
                              stacklevel=2)

        def on_error(exn: Exception) -> bool:  # webdataset handler: tar-level errors
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or ".tar" in a)), "?")
            skip(url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            return True

        visited, good_total = set(), 0

        def record(shard_iter):
            for d in shard_iter:
                visited.add(d["url"])
                yield d

        while produced < quota:
            shard_iter, n_shards = self._shard_iter(worker, epoch, mine, pass_no)
            samples = shard_samples(record(shard_iter), _open_url, on_error)
            rng = random.Random(mix(self.seed, self.rank, worker, epoch, pass_no, 0x5B0F))
            if self.shuffle_buffer > 1:  # shuffle raw bytes, before decoding
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            good = 0
            for s in samples:
                try:
                    img = decode_image(s[src.encoding] if src.encoding in s else _missing(src.encoding),
                                       src.encoding, src.shape)
                    label = decode_label(s.get("cls")) if src.labels else 0
                    if src.num_classes and label >= src.num_classes:
                        raise ValueError(f"label {label} is not below num_classes={src.num_classes}")
                except Exception as e:
                    skip(f"{s.get('__url__', '?')} (key {s.get('__key__')})", e)
                    continue
                good += 1
                imgs.append(torch.from_numpy(img.copy()))
                labels.append(label)
                if len(imgs) == self.batch_size:
                    yield self._batch(imgs, labels)
                    imgs, labels = [], []
                    produced += 1
                    if produced >= quota:
                        return
            good_total += good
            # Exact mode reads the same shards every pass; resampled draws may just have missed the good
            # shards, so it gives up only when every shard was tried (or after many empty passes).
            hopeless = mine is not None or (good_total == 0 and (len(visited) == len(src.urls) or pass_no >= 50))
            if good == 0 and hopeless:
                raise DataError(f"No readable sample in {len(visited)} shard(s) read by rank {self.rank} worker {worker} "
                                f"(e.g. {src.urls[0]}); {int(self._skipped[worker])} skipped. Check the shards with "
                                "`genscale data inspect DIR --verify`.")
            pass_no += 1

    def _batch(self, imgs: List[torch.Tensor], labels: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack(imgs)
        r = self.resolution
        if x.shape[-1] != r:
            x = resize_uint8(x, r)
        return x, torch.tensor(labels, dtype=torch.int64)


def _open_url(url: str):
    """Local paths, http(s) and (when allowed, checked earlier) pipe: commands, as webdataset opens them."""
    import webdataset as wds

    return wds.gopen(url, bufsize=1 << 20)


def _missing(encoding: str):
    raise ValueError(f"no '{encoding}' image in the sample")
