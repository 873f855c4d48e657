"""LightningDataModules: in-memory arrays (ArrayDataModule) and webdataset shards (ShardDataModule).

ArrayDataModule's train loader never ends: global batch b of the run takes positions [b*B, (b+1)*B) of an endless
stream made of one seeded permutation per epoch, and rank r takes its contiguous slice of that
batch. The position is a pure function of the number of batches consumed, which is saved in every
checkpoint, so a resumed run reads exactly the images the uninterrupted run would have read.

ShardDataModule streams shards through data_pipelines.reader; its checkpointed position is the seed,
the epoch and the batches consumed in it (see the class).
"""
from __future__ import annotations

import os
import signal
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipelines.builtin import ArrayDataset, DataError, load_split, resize_uint8


class _Images(Dataset):
    def __init__(self, data: ArrayDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data.images[i], self.data.labels[i]


class StreamBatchSampler(Sampler[List[int]]):
    """Endless per-rank batches of indices; starts after ``start_batch`` global batches."""

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int, start_batch: int = 0):
        if global_batch % world_size:
            raise DataError(f"data.batch_size={global_batch} is not divisible by the world size {world_size}.")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.seed, self.start_batch = seed, start_batch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[List[int]]:
        b = self.start_batch
        epoch, perm = -1, None
        while True:
            pos0 = b * self.global_batch + self.rank * self.per_rank
            out = []
            for pos in range(pos0, pos0 + self.per_rank):
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = self._perm(epoch)
                out.append(int(perm[pos % self.n]))
            yield out
            b += 1


class ScheduledBatchSampler(StreamBatchSampler):
    """Like StreamBatchSampler over the same stream of positions, but each global batch's size is
    ``batch_at(images consumed before it)`` (Progressive GAN: one batch size per resolution). The
    position is the number of images consumed, so a resume starts at the images the run has seen."""

    def __init__(self, n: int, batch_at: Callable[[int], int], rank: int, world_size: int, seed: int,
                 start_images: int = 0):
        super().__init__(n, world_size, rank, world_size, seed)
        self.batch_at, self.start_images = batch_at, start_images

    def __iter__(self) -> Iterator[List[int]]:
        pos, epoch, perm = self.start_images, -1, None
        while True:
            size = self.batch_at(pos)
            if size % self.world:
                raise DataError(f"A batch of {size} (at {pos} images) is not divisible by the world size {self.world}.")
            per_rank = size // self.world
            out = []
            for p in range(pos + self.rank * per_rank, pos + (self.rank + 1) * per_rank):
                if p // self.n != epoch:
                    epoch = p // self.n
                    perm = self._perm(epoch)
                out.append(int(perm[p % self.n]))
            yield out
            pos += size


class ArrayDataModule(L.LightningDataModule):
    def __init__(self, name: str, resolution: int, batch_size: int, val_fraction: float = 0.1,
                 path: str = "", num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.name, self.resolution, self.batch_size = name, resolution, batch_size
        self.val_fraction, self.path, self.num_workers, self.seed = val_fraction, path, num_workers, seed
        self.batches_consumed = 0  # restored from checkpoints through load_state_dict
        self.images_consumed = 0
        # images consumed -> global batch size (set for Progressive GAN); None: batch_size throughout
        self.batch_schedule: Optional[Callable[[int], int]] = None
        self.train: Optional[ArrayDataset] = None

    def prepare(self) -> ArrayDataset:
        """Loads the train split now (so bad paths fail before any work) and returns it."""
        if self.train is None:
            self.train = load_split(self.name, "train", self.resolution, self.val_fraction, self.path)
        return self.train

    def setup(self, stage: str = "fit") -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_schedule is not None:
            sampler = ScheduledBatchSampler(len(self.train), self.batch_schedule, rank, world, self.seed,
                                            start_images=self.images_consumed)
        else:
            sampler = StreamBatchSampler(len(self.train), self.batch_size, rank, world, self.seed,
                                         start_batch=self.batches_consumed)
        return DataLoader(_Images(self.train), batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=pin_for(self.trainer),
                          worker_init_fn=ignore_ctrl_c)

    def state_dict(self) -> dict:
        module = self.trainer.lightning_module if self.trainer is not None else None
        consumed = int(module.d_steps) if module is not None and hasattr(module, "d_steps") else 0
        state = {"batches_consumed": consumed}
        if self.batch_schedule is not None:  # scheduled batches: the position is the images consumed
            state["images_consumed"] = int(module.images_seen) if module is not None else 0
        return state

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state.get("batches_consumed", 0))
        self.images_consumed = int(state.get("images_consumed", 0))


# ----------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardInfo:
    """What the model needs to know before training: channels and classes (from index.json)."""
    channels: int
    num_classes: int
    resolution: int
    count: Optional[int]
    urls: List[str]


def pin_for(trainer) -> bool:
    """Page-locked batches when training on CUDA: Lightning then copies them to the device with
    non_blocking=True, which from ordinary (pageable) memory would still hold the host until the copy
    is staged. Off on CPUs, where pinning is a wasted copy."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    device = getattr(strategy, "root_device", None)
    return device is not None and device.type == "cuda"


def ignore_ctrl_c(worker_id: int) -> None:
    """Loader workers ignore SIGINT. A terminal's Ctrl-C reaches the whole process group; a worker would
    exit on it and the main process, which stops at the end of its step with a checkpoint
    (trainer/callbacks/preemption.py), would fail fetching its next batch first. The main process
    still ends its workers when it stops. Giving a worker_init_fn keeps Lightning from adding its own
    worker seeding (seed_everything(workers=True)), so that runs here too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream that starts each epoch where the data module says.

    Workers are not persistent, so the epoch number set here reaches the fresh workers of every
    epoch. Batches prefetched before a resolution change are resized here, in the main process.
    """

    def __init__(self, stream, dm: "ShardDataModule", num_workers: int, timeout: float = 0.0):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         timeout=timeout if num_workers > 0 else 0.0, pin_memory=pin_for(dm.trainer),
                         worker_init_fn=ignore_ctrl_c)
        self._dm = dm

    def __iter__(self):
        epoch, skip = self._dm._begin_epoch()
        self.dataset.epoch = epoch
        it = super().__iter__()
        return self._run(it, skip)

    def _run(self, it, skip: int):
        """``skip``: stream items of this epoch the run already trained on (a resume mid-epoch)."""
        if self._dm.batch_schedule is not None:
            yield from self._scheduled(it, skip)
            return
        for b, (images, labels) in enumerate(it):
            if b < skip:
                continue
            r = self.dataset.resolution
            if images.shape[-1] != r:
                images = resize_uint8(images, r)
            self._dm._yielded += 1
            yield images, labels


    def _scheduled(self, it, skip: int):
        """Single samples from the stream grouped into the schedule's batches: the global batch that
        starts at ``dm.images_pos`` images is batch_schedule(images_pos), split evenly over ranks."""
        dm = self._dm
        world = dm._rank_world()[1]
        imgs, labels = [], []
        for k, (images, lab) in enumerate(it):
            if k < skip:
                continue
            imgs.append(images)
            labels.append(lab)
            size = dm.batch_schedule(dm.images_pos)
            if size % world:
                raise DataError(f"A batch of {size} (at {dm.images_pos} images) is not divisible by the world "
                                f"size {world}.")
            if len(imgs) >= size // world:
                x, y = torch.cat(imgs), torch.cat(labels)
                imgs, labels = [], []
                dm.images_pos += size
                dm._yielded += 1
                yield x, y


class ShardDataModule(L.LightningDataModule):
    """LightningDataModule over webdataset shards (data.name=shards, data.path=DIR or URL pattern).

    The per-rank batch is data.batch_size // world size. Rank and world size come from the trainer
    (or the constructor) and are handed to the stream explicitly. The checkpoint keeps the seed and
    the epoch with the batches consumed in it. Both modes' streams are a function of (seed, rank,
    worker, epoch), so a resumed stream reads its epoch again and skips the batches already trained on:
    the run sees what the uninterrupted one would. Reading order also depends on the workers, the
    shuffle buffer and the batch, so a resume that changes them starts a new epoch, with a warning.
    """

    def __init__(self, path: str, resolution: int, batch_size: int, mode: str = "resampled",
                 shuffle_buffer: int = 1000, epoch_batches: int = 0, num_workers: int = 0, seed: int = 0,
                 allow_pipe: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 worker_timeout: float = 600.0):
        super().__init__()
        self.path, self.batch_size, self.mode = path, batch_size, mode
        self.shuffle_buffer, self.epoch_batches, self.num_workers = shuffle_buffer, epoch_batches, num_workers
        self.seed, self.allow_pipe, self.worker_timeout = seed, allow_pipe, worker_timeout
        self._rank, self._world = rank, world_size
        self._requested_resolution = resolution
        self.source = None
        self.stream = None
        self.epoch = -1  # the epoch being read (-1: none started)
        self._epoch_start_dsteps: Optional[int] = None
        self._epoch_start_images: Optional[int] = None  # scheduled batches: the module's count then
        self._yielded = 0  # batches handed out in the current epoch (incl. skipped-on-resume ones)
        self._resume: Optional[dict] = None
        # images consumed -> global batch size (set for Progressive GAN): the stream then reads single
        # samples that the loader groups; resampled mode only (see build_stream)
        self.batch_schedule: Optional[Callable[[int], int]] = None
        self.images_pos = 0  # images handed out (scheduled batches), restored from checkpoints

    def prepare(self) -> ShardInfo:
        """Resolves the shards now (so bad paths fail before any work) and returns what the model needs."""
        from data_pipelines.reader import resolve_shards

        if self.source is None:
            self.source = resolve_shards(self.path, "train", self.allow_pipe)
            if self._requested_resolution > self.source.resolution:
                raise DataError(f"data.resolution={self._requested_resolution} is above the {self.source.resolution} "
                                f"px the shards in '{self.path}' hold; they can only be downsampled. Rewrite them "
                                f"with `genscale data write --resolution {self._requested_resolution}`.")
        s = self.source
        return ShardInfo(s.channels, s.num_classes, s.resolution, s.total, s.urls)

    def setup(self, stage: str = "fit") -> None:
        self.prepare()

    def _rank_world(self):
        if self._rank is not None:
            return self._rank, self._world or 1
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def build_stream(self):
        from data_pipelines.reader import ShardStream

        self.prepare()
        rank, world = self._rank_world()
        if self.batch_size % world:
            raise DataError(f"data.batch_size={self.batch_size} is not divisible by the world size {world}.")
        if self.batch_schedule is not None and self.mode != "resampled":
            # an exact-mode resume skips batches of the stream, which are single samples here
            raise DataError("Batch sizes that change during the run (pgan.batch_sizes) need data.mode=resampled.")
        per_rank = 1 if self.batch_schedule is not None else self.batch_size // world
        self.stream = ShardStream(self.source, rank=rank, world_size=world, batch_size=per_rank,
                                  mode=self.mode, num_workers=self.num_workers, seed=self.seed,
                                  shuffle_buffer=self.shuffle_buffer, epoch_batches=self.epoch_batches,
                                  resolution=self._requested_resolution)
        return self.stream

    def train_dataloader(self) -> DataLoader:
        return ShardLoader(self.build_stream(), self, self.num_workers, self.worker_timeout)

    # ---- resolution (Progressive GAN) ------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.stream.resolution if self.stream is not None else self._requested_resolution

    @resolution.setter
    def resolution(self, value: int) -> None:
        """Batches from now on come at this resolution (downsampled from the stored one)."""
        if self.source is not None and value > self.source.resolution:
            raise DataError(f"Resolution {value} is above the stored {self.source.resolution} px of the shards.")
        self._requested_resolution = int(value)
        if self.stream is not None:
            self.stream.set_resolution(int(value))

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped so far (all workers)."""
        return self.stream.skipped if self.stream is not None else 0

    # ---- position --------------------------------------------------------------------------
    def _module_count(self, name: str) -> Optional[int]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return int(getattr(module, name)) if module is not None and hasattr(module, name) else None

    def _module_dsteps(self) -> Optional[int]:
        return self._module_count("d_steps")

    def _begin_epoch(self):
        """(epoch to read, stream items of it to skip) for the loader that is about to start. Items are
        batches, or single samples under a batch schedule."""
        done = skip = images_done = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            epoch, done = int(state.get("epoch", -1)), int(state.get("batches_in_epoch", 0))
            images_done = int(state.get("images_in_epoch", 0))
            if self.batch_schedule is not None:
                skip = images_done // self._rank_world()[1]  # this rank's samples in the batches done
                fresh = "images_in_epoch" not in state  # written before scheduled resumes were exact
            else:
                skip, fresh = done, False
            fresh = fresh or bool(state.get("new_epoch"))
            if epoch < 0:
                epoch, done, skip, images_done = 0, 0, 0, 0
            elif fresh or skip >= self.stream.epoch_length(epoch):
                epoch, done, skip, images_done = epoch + 1, 0, 0, 0
        else:
            epoch = self.epoch + 1
        self.epoch = epoch
        d = self._module_dsteps()
        self._epoch_start_dsteps = None if d is None else d - done
        self._epoch_start_images = self._images_consumed() - images_done
        self._yielded = done
        return epoch, skip

    def state_dict(self) -> dict:
        if self._resume is not None:  # restored but not started yet: keep what was restored
            return dict(self._resume)
        d = self._module_dsteps()
        # Lightning fetches a batch ahead, so the loader's count runs ahead of training; d_steps does not.
        done = d - self._epoch_start_dsteps if d is not None and self._epoch_start_dsteps is not None else self._yielded
        state = {"kind": "shards", **self._order(), "epoch": self.epoch, "batches_in_epoch": int(done),
                 "skipped": self.skipped}
        if self.batch_schedule is not None:
            state["images_consumed"] = seen = self._images_consumed()
            if self._epoch_start_images is not None:
                state["images_in_epoch"] = seen - self._epoch_start_images
        return state

    def _images_consumed(self) -> int:
        """Images the run has trained on: the module's count (the loader runs a batch ahead of training),
        or without a module the loader's."""
        seen = self._module_count("images_seen")
        return seen if seen is not None else self.images_pos

    def _order(self) -> dict:
        """What, besides (rank, world size, epoch), decides the order the stream reads in."""
        return {"mode": self.mode, "seed": self.seed, "num_workers": self.num_workers,
                "shuffle_buffer": self.shuffle_buffer, "batch_size": self.batch_size,
                "epoch_batches": self.epoch_batches}

    def load_state_dict(self, state: dict) -> None:
        self.images_pos = int(state.get("images_consumed", 0))
        changed = {k: (state[k], v) for k, v in self._order().items() if k in state and state[k] != v}
        if changed:
            what = ", ".join(f"data.{k} {a} -> {b}" for k, (a, b) in changed.items())
            warnings.warn(f"genscale data: the checkpoint's data position belongs to another reading order ({what}): "
                          "the run starts a new epoch, so it will not see exactly what an uninterrupted run "
                          "would. Resume with the same values for an exact continuation.")
            state = {"epoch": state.get("epoch", -1), "new_epoch": True}
        self._resume = dict(state)
        self.epoch = int(state.get("epoch", -1))
