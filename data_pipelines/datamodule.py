"""LightningDataModule over in-memory arrays, with a sampler whose position is checkpointed.

The train loader never ends: global batch b of the run takes positions [b*B, (b+1)*B) of an endless
stream made of one seeded permutation per epoch, and rank r takes its contiguous slice of that
batch. The position is a pure function of the number of batches consumed, which is saved in every
checkpoint, so a resumed run reads exactly the images the uninterrupted run would have read.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipelines.builtin import ArrayDataset, DataError, load_split


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


class ArrayDataModule(L.LightningDataModule):
    def __init__(self, name: str, resolution: int, batch_size: int, val_fraction: float = 0.1,
                 path: str = "", num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.name, self.resolution, self.batch_size = name, resolution, batch_size
        self.val_fraction, self.path, self.num_workers, self.seed = val_fraction, path, num_workers, seed
        self.batches_consumed = 0  # restored from checkpoints through load_state_dict
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
        sampler = StreamBatchSampler(len(self.train), self.batch_size, rank, world, self.seed,
                                     start_batch=self.batches_consumed)
        return DataLoader(_Images(self.train), batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict:
        module = self.trainer.lightning_module if self.trainer is not None else None
        consumed = int(module.d_steps) if module is not None and hasattr(module, "d_steps") else 0
        return {"batches_consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state.get("batches_consumed", 0))
