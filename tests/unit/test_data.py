"""Stream sampler (rank slices, epochs, resume) and the built-in / npz loaders."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipelines.builtin import DataError, load_split, resize_uint8
from data_pipelines.datamodule import ArrayDataModule, StreamBatchSampler


def take(sampler, k):
    return list(itertools.islice(iter(sampler), k))


# ---- StreamBatchSampler ------------------------------------------------------------------------


def test_ranks_split_the_global_batch():
    n, B = 50, 8
    whole = take(StreamBatchSampler(n, B, rank=0, world_size=1, seed=3), 20)
    r0 = take(StreamBatchSampler(n, B, rank=0, world_size=2, seed=3), 20)
    r1 = take(StreamBatchSampler(n, B, rank=1, world_size=2, seed=3), 20)
    for g, a, b in zip(whole, r0, r1):
        assert len(a) == len(b) == 4
        assert a == g[:4] and b == g[4:]  # rank r takes its contiguous slice
    for a, b in zip(r0[:6], r1[:6]):  # batches 0..5 = positions 0..47, all in epoch 0
        assert not set(a) & set(b)


def test_four_ranks_partition_each_global_batch():
    n, B = 64, 16
    whole = take(StreamBatchSampler(n, B, 0, 1, seed=0), 4)
    per_rank = [take(StreamBatchSampler(n, B, r, 4, seed=0), 4) for r in range(4)]
    for b in range(4):
        got = [per_rank[r][b] for r in range(4)]
        assert sum(got, []) == whole[b]
        assert len(set(sum(got, []))) == B


def test_each_epoch_is_a_permutation():
    n, B = 24, 6  # 4 global batches per epoch
    batches = take(StreamBatchSampler(n, B, 0, 1, seed=7), 12)
    for e in range(3):
        flat = sum(batches[4 * e: 4 * e + 4], [])
        assert sorted(flat) == list(range(n))
    e0, e1 = sum(batches[:4], []), sum(batches[4:8], [])
    assert e0 != e1  # a fresh permutation every epoch
    assert e0 != list(range(n))  # and it is shuffled


def test_each_epoch_is_a_permutation_across_ranks():
    n, B = 24, 6
    r0 = take(StreamBatchSampler(n, B, 0, 2, seed=7), 4)
    r1 = take(StreamBatchSampler(n, B, 1, 2, seed=7), 4)
    assert sorted(sum(r0 + r1, [])) == list(range(n))


def test_epoch_boundary_inside_a_batch():
    n, B = 10, 4  # 5 batches = 20 positions = exactly two epochs
    flat = sum(take(StreamBatchSampler(n, B, 0, 1, seed=1), 5), [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


def test_seed_changes_the_order_and_is_deterministic():
    a = take(StreamBatchSampler(100, 10, 0, 1, seed=0), 3)
    assert a == take(StreamBatchSampler(100, 10, 0, 1, seed=0), 3)
    assert a != take(StreamBatchSampler(100, 10, 0, 1, seed=1), 3)


@pytest.mark.parametrize("k", [0, 1, 3, 7, 13])
@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_start_batch_equals_skipping(k, world, rank):
    n, B = 30, 8  # batches straddle epoch boundaries
    full = take(StreamBatchSampler(n, B, rank, world, seed=5), k + 6)
    resumed = take(StreamBatchSampler(n, B, rank, world, seed=5, start_batch=k), 6)
    assert resumed == full[k:]


def test_batch_not_divisible_by_world_size():
    with pytest.raises(DataError, match="not divisible"):
        StreamBatchSampler(100, 10, 0, 3, seed=0)


# ---- datamodule --------------------------------------------------------------------------------


def test_datamodule_loader_and_resume_position():
    dm = ArrayDataModule("digits", resolution=8, batch_size=16, seed=2)
    dm.setup("fit")
    assert dm.state_dict() == {"batches_consumed": 0}  # no trainer attached
    it = iter(dm.train_dataloader())
    first = [next(it) for _ in range(5)]
    images, labels = first[0]
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    dm.load_state_dict({"batches_consumed": 3})
    resumed = next(iter(dm.train_dataloader()))
    assert torch.equal(resumed[0], first[3][0]) and torch.equal(resumed[1], first[3][1])


# ---- built-in datasets -------------------------------------------------------------------------


def test_mnist5k_split():
    tr = load_split("mnist5k", "train", 28)
    va = load_split("mnist5k", "val", 28, val_fraction=0.1)
    assert len(tr) + len(va) == 5000 and len(va) == 500
    for d in (tr, va):
        assert d.images.dtype == torch.uint8 and d.images.shape[1:] == (1, 28, 28)
        assert d.labels.dtype == torch.int64 and d.num_classes == 10 and d.channels == 1
        assert int(d.images.max()) > 200  # the full 0..255 range, not 0..1
    # disjoint: no image of the held-out split is in train
    train_set = {t.numpy().tobytes() for t in tr.images}
    assert not any(t.numpy().tobytes() in train_set for t in va.images)
    # fixed split: the same images in the same order on every call
    va2 = load_split("mnist5k", "val", 28)
    assert torch.equal(va.images, va2.images) and torch.equal(va.labels, va2.labels)


def test_mnist5k_resized():
    va = load_split("mnist5k", "val", 32)
    assert va.images.shape == (500, 1, 32, 32) and va.images.dtype == torch.uint8


def test_digits_split():
    tr = load_split("digits", "train", 16)
    va = load_split("digits", "val", 16)
    assert len(tr) + len(va) == 1797 and len(va) == 180  # round(179.7)
    assert tr.images.shape == (1617, 1, 16, 16) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and tr.num_classes == 10
    tr8 = load_split("digits", "train", 8)
    assert set(torch.unique(tr8.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert torch.equal(tr8.labels, tr.labels)


def test_unknown_dataset():
    with pytest.raises(DataError, match="digits, mnist5k, npz"):
        load_split("cifar", "train", 32)


# ---- resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst", [(28, 32), (28, 16), (28, 8), (8, 64), (28, 28)])
def test_resize_keeps_constant_images_constant(src, dst):
    for value in (0, 1, 77, 200, 255):
        x = torch.full((2, 1, src, src), value, dtype=torch.uint8)
        y = resize_uint8(x, dst)
        assert y.shape == (2, 1, dst, dst) and y.dtype == torch.uint8
        assert bool((y == value).all()), (value, torch.unique(y))


def test_resize_same_size_is_identity():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(resize_uint8(x, 8), x)


def test_resize_downsample_is_antialiased():
    # vertical lines every 4th column (mean 255/4 = 63.75): an antialiased 4x reduction gives the
    # local mean 64 away from the borders; plain bilinear would sample between the lines and give 0
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[..., ::4] = 255
    y = resize_uint8(x, 8)
    assert bool((y[..., 1:-1] == 64).all()), y
    # and the 1-px checkerboard averages to mid grey
    c = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    c[..., ::2, ::2] = 255
    c[..., 1::2, 1::2] = 255
    assert bool((resize_uint8(c, 8)[..., 1:-1, 1:-1] == 128).all())


# ---- npz ---------------------------------------------------------------------------------------


def test_npz_missing_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError) as ei:
        load_split("npz", "train", 8, path=str(missing))
    assert str(missing) in str(ei.value)


def test_npz_empty_path():
    with pytest.raises(DataError, match="data.path"):
        load_split("npz", "train", 8, path="")


def test_npz_not_an_npz(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.npz"):
        load_split("npz", "train", 8, path=str(p))


def test_npz_float_images_refused(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, images=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_split("npz", "train", 8, path=str(p))


def test_npz_round_trip_grey(tmp_path):
    n = 20
    imgs = np.stack([np.full((8, 8), i * 10, np.uint8) for i in range(n)])  # image i is constant 10*i
    p = tmp_path / "grey.npz"
    np.savez(p, images=imgs, labels=np.arange(n))
    tr = load_split("npz", "train", 8, val_fraction=0.25, path=str(p))
    va = load_split("npz", "val", 8, val_fraction=0.25, path=str(p))
    assert len(va) == 5 and len(tr) == 15
    assert tr.images.shape == (15, 1, 8, 8) and tr.images.dtype == torch.uint8
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == list(range(n))  # disjoint, complete
    for d in (tr, va):
        for img, lab in zip(d.images, d.labels):
            assert bool((img == 10 * int(lab)).all())  # labels stay attached to their images
    assert tr.num_classes == n


def test_npz_round_trip_rgb_channels_last(tmp_path):
    n = 10
    imgs = np.zeros((n, 8, 8, 3), np.uint8)
    for i in range(n):
        for c in range(3):
            imgs[i, :, :, c] = 20 * i + c
    p = tmp_path / "rgb.npz"
    np.savez(p, images=imgs, labels=np.arange(n))
    tr = load_split("npz", "train", 8, val_fraction=0.2, path=str(p))
    assert tr.images.shape == (8, 3, 8, 8) and tr.channels == 3
    for img, lab in zip(tr.images, tr.labels):
        for c in range(3):
            assert bool((img[c] == 20 * int(lab) + c).all())


def test_npz_without_labels(tmp_path):
    p = tmp_path / "nolab.npz"
    np.savez(p, images=np.zeros((10, 8, 8), np.uint8))
    tr = load_split("npz", "train", 16, path=str(p))
    assert tr.images.shape == (9, 1, 16, 16)
    assert tr.labels.tolist() == [0] * 9 and tr.labels.dtype == torch.int64


def test_loader_workers_ignore_ctrl_c_and_keep_lightnings_seeding(monkeypatch):
    """ignore_ctrl_c is the loaders' worker_init_fn, which stops Lightning from adding its own: with
    seed_everything(workers=True) (PL_SEED_WORKERS=1) the worker's generators are seeded as Lightning would."""
    import random
    import signal

    from lightning.fabric.utilities.seed import pl_worker_init_function

    from data_pipelines.datamodule import ignore_ctrl_c

    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    previous = signal.getsignal(signal.SIGINT)
    try:
        torch.manual_seed(123)
        ignore_ctrl_c(1)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        ours = (random.random(), float(np.random.rand()), float(torch.rand(())))
        torch.manual_seed(123)
        pl_worker_init_function(1)
        assert ours == (random.random(), float(np.random.rand()), float(torch.rand(())))
    finally:
        signal.signal(signal.SIGINT, previous)
