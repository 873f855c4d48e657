"""Shard writing (index, sha256, crash safety, sources) and the shard reader (modes, ranks, resume,
resolution, bad input). Images carry their sample id in two pixels, so every test can tell exactly
which samples a stream delivered."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import pickle
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data_pipelines.shards as shards
from data_pipelines.builtin import DataError, load_split
from data_pipelines.datamodule import ShardDataModule
from data_pipelines.reader import ShardSource, ShardStream, exact_plan, resolve_shards


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging."""
    def boom(*_):
        raise TimeoutError(f"no result within {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_npz(path: Path, n: int = 64, channels: int = 3, size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n) % 256  # the sample id, readable after decoding
    imgs[:, 0, 0, 1] = np.arange(n) // 256
    labels = np.arange(n) % 5
    np.savez(path, images=imgs, labels=labels)
    return path


def ids(images: torch.Tensor) -> list:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def write(tmp_path, name="shards", n=64, encoding="raw", maxcount=8, **kw) -> Path:
    npz = make_npz(tmp_path / f"{name}.npz", n=n)
    out = tmp_path / name
    shards.write_shards("npz", out, input_path=str(npz), encoding=encoding, maxcount=maxcount, **kw)
    return out


def stream_of(path, rank=0, world=1, batch=8, mode="exact", **kw) -> ShardStream:
    return ShardStream(resolve_shards(str(path)), rank=rank, world_size=world, batch_size=batch, mode=mode, **kw)


def take(it, k):
    return list(itertools.islice(iter(it), k))


# ---- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_write_then_read_round_trips_pixels_and_labels(tmp_path, encoding):
    out = write(tmp_path, encoding=encoding, n=70, maxcount=16)
    npz = str(tmp_path / "shards.npz")
    for split in ("train", "val"):  # the same split and values as the in-memory loader
        ref, got = load_split("npz", split, 8, 0.1, npz), shards.load_shard_split(str(out), split)
        assert torch.equal(ref.images, got.images) and torch.equal(ref.labels, got.labels)
    # Through the streaming reader (shuffled): exactly the train samples, each once, with their labels.
    ref = load_split("npz", "train", 8, 0.1, npz)
    s = stream_of(out, batch=7, mode="exact", shuffle_buffer=20)
    batches = list(s)
    assert len(batches) == s.epoch_length(0) == len(ref) // 7
    got = {i: (img, int(lab)) for x, y in batches for i, img, lab in zip(ids(x), x, y)}
    want = {i: (img, int(lab)) for i, img, lab in zip(ids(ref.images), ref.images, ref.labels)}
    assert len(got) == 7 * len(batches) and set(got) <= set(want)
    assert all(torch.equal(got[i][0], want[i][0]) and got[i][1] == want[i][1] for i in got)
    assert ids(batches[0][0]) != sorted(ids(batches[0][0]))  # shuffled


def test_index_contents_and_sha256(tmp_path):
    out = write(tmp_path, n=70, maxcount=16)
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "genscale-shards" and index["version"] == 1
    assert (index["encoding"], index["resolution"], index["channels"], index["shape"]) == ("raw", 8, 3, [3, 8, 8])
    assert index["classes"] == ["0", "1", "2", "3", "4"] and index["labels"] is True
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert (train["count"], val["count"]) == (63, 7)
    assert [s["count"] for s in train["shards"]] == [16, 16, 16, 15]
    assert [s["name"] for s in train["shards"]] == [f"train-{k:06d}.tar" for k in range(4)]
    for sh in train["shards"] + val["shards"]:
        assert sh["sha256"] == hashlib.sha256((out / sh["name"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [s["name"] for s in train["shards"] + val["shards"]])
    assert shards.inspect_shards(out, verify=True)["verify"]["ok"]
    raw = bytearray((out / "train-000001.tar").read_bytes())
    raw[600] ^= 0xFF  # one flipped byte inside a sample
    (out / "train-000001.tar").write_bytes(bytes(raw))
    problems = shards.inspect_shards(out, verify=True)["verify"]["problems"]
    assert any("train-000001.tar" in p and "sha256" in p for p in problems)
    val = out / "val-000000.tar"
    val.write_bytes(val.read_bytes()[:3000])  # truncated inside the second sample
    problems = shards.inspect_shards(out, verify=True)["verify"]["problems"]
    assert any("val-000000.tar" in p and "readable samples, index.json lists 7" in p for p in problems), problems
    # a damaged header is named in words with its byte, as the training reader says it (no Python reprs)
    raw = bytearray((out / "train-000002.tar").read_bytes())
    raw[1024 + 100] ^= 0xFF  # inside the second member's header
    (out / "train-000002.tar").write_bytes(bytes(raw))
    (bad,) = [p for p in shards.inspect_shards(out, verify=True)["verify"]["problems"]
              if p.startswith("train-000002.tar: unreadable")]
    assert "bad tar header checksum at byte 1024" in bad and "<_io" not in bad and "('" not in bad, bad
    from launch.cli import main as genscale

    assert genscale(["data", "inspect", str(out), "--verify"]) == 1  # problems: a failing exit status


def test_parallel_writing_is_byte_identical_to_serial(tmp_path):
    a = write(tmp_path, name="a", n=90, maxcount=10, workers=1)
    b = write(tmp_path, name="b", n=90, maxcount=10, workers=3)
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert len(ia["splits"]["train"]["shards"]) == 9
    assert ia["splits"] == ib["splits"]  # same names, counts and sha256: deterministic and idempotent


def test_crash_mid_write_leaves_the_earlier_write_and_no_trusted_partial_shards(tmp_path, monkeypatch):
    out = write(tmp_path, n=64, maxcount=8)  # a complete earlier write in the same directory
    assert resolve_shards(str(out)).urls
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = shards.encode_image

    def failing(img, encoding):
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("simulated crash")
        return real(img, encoding)

    monkeypatch.setattr(shards, "encode_image", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shards.write_shards("npz", out, input_path=str(tmp_path / "shards.npz"), encoding="raw", maxcount=4)
    # the new shards were staged apart: the earlier write is intact and nothing half-written is left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(shards.load_shard_split(str(out), "val")) + len(shards.load_shard_split(str(out), "train")) == 64
    # a killed writer's staging folder (shards without an index, never read) goes at the next write
    (out / ".staging-1").mkdir()
    (out / ".staging-1" / "train-000000.tar").write_bytes(b"partial")
    monkeypatch.setattr(shards, "encode_image", real)
    shards.write_shards("npz", out, input_path=str(tmp_path / "shards.npz"), encoding="raw", maxcount=8)
    assert not list(out.glob(".staging-*"))
    # a rewrite into fewer, larger shards leaves exactly the shards its index lists (no stale train/val tars)
    index = shards.write_shards("npz", out, input_path=str(tmp_path / "shards.npz"), encoding="raw", maxcount=64)
    listed = {sh["name"] for split in index["splits"].values() for sh in split["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed and len(listed) == 2


def test_imagefolder_classes_centre_crop_and_resize(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    colours = {"cat": (250, 10, 10), "dog": (10, 10, 250)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for k in range(6):
            arr = np.zeros((20, 40, 3), np.uint8)  # wide: the centre crop keeps columns 10..29
            arr[:, 10:30] = rgb
            arr[:, :10] = arr[:, 30:] = (0, 250, 0)  # green borders that the crop removes
            Image.fromarray(arr).save(root / name / f"{k}.png")
    out = tmp_path / "sh"
    index = shards.write_shards("imagefolder", out, input_path=str(root), resolution=8, maxcount=4)
    assert index["classes"] == ["cat", "dog"] and index["shape"] == [3, 8, 8]
    data = shards.load_shard_split(str(out), "train")
    assert len(data) == 11 and data.num_classes == 2
    for img, label in zip(data.images, data.labels):
        want = torch.tensor(colours[["cat", "dog"][int(label)]], dtype=torch.float32)
        assert (img.float().mean((1, 2)) - want).abs().max() < 3  # no green border, right class colour
    with pytest.raises(DataError, match="--resolution"):
        shards.write_shards("imagefolder", tmp_path / "x", input_path=str(root))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_rewrite_leaves_the_existing_shards_as_they_were(tmp_path, workers):
    """An unreadable input file is named in a short error, and the dataset already in --out (shards and
    index) is untouched: the new shards are staged and replace the old ones only when all are written."""
    from PIL import Image

    root = tmp_path / "folder"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / name / f"{k}.png")
    out = tmp_path / "sh"
    shards.write_shards("imagefolder", out, input_path=str(root), resolution=8, maxcount=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (root / "b" / "9.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"Cannot read the image '.*9\.png'"):
        shards.write_shards("imagefolder", out, input_path=str(root), resolution=8, maxcount=3, workers=workers)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either
    (root / "b" / "9.png").unlink()
    index = shards.write_shards("imagefolder", out, input_path=str(root), resolution=8, maxcount=3, workers=workers)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [sh["name"] for sp in ("train", "val") for sh in index["splits"][sp]["shards"]])
    assert len(shards.load_shard_split(str(out), "train")) + len(shards.load_shard_split(str(out), "val")) == 10


def test_write_without_input_or_into_an_unwritable_place_is_a_short_error(tmp_path):
    with pytest.raises(DataError, match="--source npz needs --input FILE.npz"):
        shards.write_shards("npz", tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="Cannot write shards to"):
        shards.write_shards("digits", tmp_path / "file" / "sub")


def test_cifar10_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in (("data_batch_1", 10), ("data_batch_2", 10), ("test_batch", 6)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=n))
        batches[name] = (data, labels)
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names}, fh)
    out = tmp_path / "sh"
    index = shards.write_shards("cifar10", out, input_path=str(root), encoding="png", maxcount=8)
    assert index["classes"][:2] == ["airplane", "automobile"] and index["shape"] == [3, 32, 32]
    assert (index["splits"]["train"]["count"], index["splits"]["val"]["count"]) == (20, 6)
    val = shards.load_shard_split(str(out), "val")  # the official test batch, in order
    data, labels = batches["test_batch"]
    assert torch.equal(val.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert val.labels.tolist() == [int(v) for v in labels]
    train = shards.load_shard_split(str(out), "train")
    ref = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]]).reshape(-1, 3, 32, 32)
    assert sorted(map(bytes, train.images.numpy())) == sorted(map(bytes, ref))


def test_jpg_encoding_is_close(tmp_path):
    out = write(tmp_path, n=20, encoding="jpg")
    ref = load_split("npz", "val", 8, 0.1, str(tmp_path / "shards.npz")).images.float()
    got = shards.load_shard_split(str(out), "val").images.float()
    assert got.shape == ref.shape and (got - ref).abs().mean() < 60  # lossy, but the same images


def test_builtin_digits_shards_match_the_in_memory_split(tmp_path):
    out = tmp_path / "digits"
    shards.write_shards("digits", out, resolution=16, encoding="raw", maxcount=400)
    ref, got = load_split("digits", "val", 16), load_split("shards", "val", 16, path=str(out))
    assert torch.equal(ref.images, got.images) and torch.equal(ref.labels, got.labels)
    assert got.num_classes == 10
    assert load_split("shards", "val", 8, path=str(out)).images.shape[-1] == 8  # downsampled on load


# ---- reading: ranks, modes, epochs ---------------------------------------------------------------


def test_exact_mode_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    out = write(tmp_path, n=70, maxcount=8)  # 63 train samples: 7 shards of 8 and one of 7
    per_rank = []
    for rank in (0, 1):
        s = stream_of(out, rank=rank, world=2, batch=4, mode="exact", seed=3)
        per_rank.append([i for x, _ in s for i in ids(x)])
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of batches on both ranks
    assert not set(per_rank[0]) & set(per_rank[1])
    train_ids = set(ids(shards.load_shard_split(str(out), "train").images))
    covered = set(per_rank[0]) | set(per_rank[1])
    assert covered <= train_ids and len(covered) == len(per_rank[0]) * 2
    assert len(train_ids - covered) < 2 * 4 * 2  # only the part that cannot fill a batch on every rank
    # The next epoch deals the shards differently but is again a disjoint cover.
    e1 = []
    for rank in (0, 1):
        s = stream_of(out, rank=rank, world=2, batch=4, mode="exact", seed=3)
        s.epoch = 1
        e1.append([i for x, _ in s for i in ids(x)])
    assert not set(e1[0]) & set(e1[1]) and e1 != per_rank


def test_exact_mode_even_shards_cover_everything_with_workers(tmp_path):
    out = write(tmp_path, n=36, maxcount=4)  # 32 train samples in 8 shards of 4
    seen = []
    for rank in (0, 1):
        dm = ShardDataModule(str(out), 8, batch_size=8, mode="exact", num_workers=2, seed=1, rank=rank, world_size=2)
        with deadline(60):
            batches = list(dm.train_dataloader())
        assert len(batches) == 4 and all(x.shape == (4, 3, 8, 8) for x, _ in batches)
        seen.append([i for x, _ in batches for i in ids(x)])
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(ids(shards.load_shard_split(str(out), "train").images))


def test_exact_plan_equal_batches_with_uneven_shards():
    counts = [50, 3, 3, 3, 40, 1]
    for epoch in range(5):
        shards_of, quota, per_rank = exact_plan(counts, world_size=2, num_workers=2, batch_size=4, seed=0, epoch=epoch)
        assert all(sum(quota[r, w] for w in range(2)) == per_rank for r in range(2))
        for (r, w), q in quota.items():  # every quota can be filled from that worker's own shards
            assert q * 4 <= sum(counts[i] for i in shards_of[r, w])
        assert sorted(i for v in shards_of.values() for i in v) == list(range(6))


def test_exact_plan_deals_shards_anew_each_epoch():
    """The shard-to-rank assignment is reshuffled every epoch (seeded by epoch): otherwise each rank
    would see the same subset of the data for the whole run."""
    plans = [exact_plan([8] * 16, 2, 1, 4, seed=0, epoch=e)[0] for e in (0, 1, 0)]
    assert plans[0] == plans[2]
    assert sorted(plans[0][0, 0]) != sorted(plans[1][0, 0])


def test_resampled_shard_draws_differ_by_rank_and_worker(tmp_path):
    """In resampled mode each (rank, worker) draws its own shard sequence, and repeats it when asked
    again (resume); equal sequences would make ranks or workers read the same shards."""
    src = resolve_shards(str(write(tmp_path, n=70, maxcount=4)))

    def draws(rank, worker):
        s = ShardStream(src, rank=rank, world_size=2, batch_size=4, mode="resampled", num_workers=2, seed=0,
                        epoch_batches=4)
        it, n = s._shard_iter(worker, 0, None, 0)
        urls = [d["url"] for d in it]
        assert len(urls) == n
        return urls

    assert draws(0, 0) == draws(0, 0)
    assert len({tuple(draws(r, w)) for r, w in ((0, 0), (1, 0), (0, 1), (1, 1))}) == 4


def test_resampled_mode_same_batch_count_on_every_rank_with_uneven_shards(tmp_path):
    big = write(tmp_path, name="big", n=56, maxcount=50)  # train shards of 50 and 0..: one big shard
    small = write(tmp_path, name="small", n=40, maxcount=3)  # many 3-sample shards
    urls = resolve_shards(str(big)).urls[:1] + resolve_shards(str(small)).urls[:2]
    counts = [50, 3, 3]
    src = ShardSource(urls, counts, "raw", (3, 8, 8), True, 5, None)
    got = []
    for rank in (0, 1):
        s = ShardStream(src, rank=rank, world_size=2, batch_size=5, mode="resampled", seed=0, epoch_batches=6,
                        shuffle_buffer=10)
        with deadline(30):
            epochs = [len(list(s)) for s.epoch in range(3)]
        assert epochs == [6, 6, 6]
        s.epoch = 0
        got.append([i for x, _ in s for i in ids(x)])
    assert got[0] != got[1]  # ranks draw their own shards and orders
    s = ShardStream(src, rank=0, world_size=2, batch_size=5, mode="resampled", seed=0, epoch_batches=6, shuffle_buffer=10)
    assert [i for x, _ in s for i in ids(x)] == got[0]  # deterministic per (seed, rank, epoch)


def test_resampled_epoch_length_default_and_worker_split(tmp_path):
    out = write(tmp_path, n=70, maxcount=8)  # 63 train samples
    dm = ShardDataModule(str(out), 8, batch_size=8, mode="resampled", num_workers=2, seed=0, rank=0, world_size=2)
    with deadline(60):
        batches = list(dm.train_dataloader())
    assert dm.stream.epoch_batches == 63 // 8 == len(batches)  # about one pass over the train split
    assert all(x.shape == (4, 3, 8, 8) and y.dtype == torch.int64 for x, y in batches)


def test_resume_continues_the_stream(tmp_path):
    out = write(tmp_path, n=100, maxcount=8)

    def run(state=None, k=3):
        dm = ShardDataModule(str(out), 8, batch_size=6, mode="resampled", epoch_batches=5, seed=4, shuffle_buffer=30)
        dm.prepare()
        if state is not None:
            dm.load_state_dict(state)
        it = iter(dm.train_dataloader())
        return dm, [ids(next(it)[0]) for _ in range(k)]

    dm, first = run()
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 3 and state["seed"] == 4
    _, whole = run(k=5)
    assert whole[:3] == first  # a fresh start replays: deterministic
    _, resumed = run(json.loads(json.dumps(state)), k=2)  # through a checkpoint-like round trip
    assert resumed == whole[3:]  # the rest of the 5-batch epoch, as without the stop


def next_batches(dm, k):
    """The next k batches' ids, over epochs as Lightning iterates the loader (once per epoch), stopping
    mid-epoch at k."""
    got = []
    while True:
        for x, _ in dm.train_dataloader():
            got.append(ids(x))
            if len(got) == k:
                return got


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_resume_is_exact_and_a_changed_order_starts_a_new_epoch(tmp_path, workers):
    out = write(tmp_path, n=100, maxcount=8)

    def dm_(**kw):
        args = dict(batch_size=6, mode="resampled", epoch_batches=4, seed=1, shuffle_buffer=20, num_workers=workers)
        dm = ShardDataModule(str(out), 8, **{**args, **kw})
        dm.prepare()
        return dm

    whole = next_batches(dm_(), 11)
    for stop in (1, 4, 6):
        first = dm_()
        head = next_batches(first, stop)
        assert head == whole[:stop]
        resumed = dm_()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + next_batches(resumed, 11 - stop) == whole, stop
    changed = dm_(shuffle_buffer=7)
    with pytest.warns(UserWarning, match="data.shuffle_buffer 20 -> 7"):
        changed.load_state_dict(first.state_dict())
    next(iter(changed.train_dataloader()))
    assert changed.epoch == 2  # first stopped in epoch 1: a new epoch, not a replay in another order


def test_scheduled_batches_resume_exactly_mid_epoch(tmp_path):
    """Progressive GAN's changing batch sizes (single samples grouped by the schedule): a resume skips
    the samples of the epoch already in trained batches."""
    out = write(tmp_path, n=100, maxcount=8)

    def dm_():
        dm = ShardDataModule(str(out), 8, batch_size=4, mode="resampled", epoch_batches=30, seed=3, shuffle_buffer=10)
        dm.batch_schedule = lambda images: 4 if images < 12 else 6
        dm.prepare()
        return dm

    whole = next_batches(dm_(), 9)  # 30 samples per epoch: 4, 4, 4, 6, 6, 6 (2 left over), then epoch 1
    assert [len(b) for b in whole] == [4, 4, 4, 6, 6, 6, 6, 6, 6]
    for stop in (2, 4, 6):
        first = dm_()
        it = iter(first.train_dataloader())
        head = [ids(next(it)[0]) for _ in range(stop)]
        first.images_pos = sum(len(b) for b in head)  # what the module had trained on (the loader may run ahead)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = dm_()
        resumed.load_state_dict(state)
        assert head + next_batches(resumed, 9 - stop) == whole, stop


@pytest.mark.parametrize("rank", [0, 1])
def test_scheduled_batches_resume_exactly_on_each_of_two_ranks(tmp_path, rank):
    """The same with two ranks: the checkpoint counts global images (8 then 12 per global batch), each
    rank skips its own half of them (images // world), and continues its own stream exactly."""
    out = write(tmp_path, n=100, maxcount=8)

    def dm_():
        dm = ShardDataModule(str(out), 8, batch_size=8, mode="resampled", epoch_batches=30, seed=3,
                             shuffle_buffer=10, rank=rank, world_size=2)
        dm.batch_schedule = lambda images: 8 if images < 24 else 12
        dm.prepare()
        return dm

    whole = next_batches(dm_(), 6)
    assert [len(b) for b in whole] == [4, 4, 4, 6, 6, 6]  # this rank's halves of the global batches
    for stop in (2, 4):
        first = dm_()
        it = iter(first.train_dataloader())
        head = [ids(next(it)[0]) for _ in range(stop)]
        first.images_pos = 2 * sum(len(b) for b in head)  # global images trained on
        resumed = dm_()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + next_batches(resumed, 6 - stop) == whole, stop


def test_exact_resume_skips_what_was_trained_on(tmp_path):
    out = write(tmp_path, n=72, maxcount=8)
    whole = [ids(x) for x, _ in ShardDataModule(str(out), 8, 4, mode="exact", seed=2).train_dataloader()]
    dm = ShardDataModule(str(out), 8, 4, mode="exact", seed=2)
    it = iter(dm.train_dataloader())
    head = [ids(next(it)[0]) for _ in range(5)]
    dm2 = ShardDataModule(str(out), 8, 4, mode="exact", seed=2)
    dm2.load_state_dict(dm.state_dict())
    tail = [ids(x) for x, _ in dm2.train_dataloader()]
    assert head + tail == whole  # the epoch continues exactly where it stopped
    assert dm2.state_dict()["epoch"] == 0 and dm2.state_dict()["batches_in_epoch"] == len(whole)


@pytest.mark.parametrize("workers", [0, 1])
def test_resolution_change_mid_stream(tmp_path, workers):
    out = write(tmp_path, n=200, maxcount=16)
    dm = ShardDataModule(str(out), 8, batch_size=4, epoch_batches=40, num_workers=workers, seed=0)
    with deadline(60):
        it = iter(dm.train_dataloader())
        assert next(it)[0].shape[-2:] == (8, 8)
        dm.resolution = 4
        nxt = [next(it)[0] for _ in range(6)]
    assert all(x.shape == (4, 3, 4, 4) and x.dtype == torch.uint8 for x in nxt)  # from the very next batch
    with pytest.raises(DataError, match="downsampled|above"):
        dm.resolution = 16


# ---- bad input ------------------------------------------------------------------------------------


def _custom_shard(path: Path, samples: list) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _good(i: int) -> dict:
    img = np.full((3, 8, 8), 7, np.uint8)
    img[0, 0, 0], img[0, 0, 1] = i, 0
    return {"__key__": f"s{i:04d}", "raw": img.tobytes(), "cls": str(i % 5).encode()}


def _read_all(urls, batch=2, epoch_batches=4, **kw):
    src = ShardSource(urls, None, "raw", (3, 8, 8), True, 5, None)
    s = ShardStream(src, rank=0, world_size=1, batch_size=batch, mode="resampled", epoch_batches=epoch_batches,
                    shuffle_buffer=1, **kw)
    with deadline(30), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(s)
    return s, out, [str(w.message) for w in caught]


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    bad = [
        {"__key__": "undecodable", "raw": b"not an image", "cls": b"1"},
        {"__key__": "nolabel", "raw": _good(1)["raw"]},
        {"__key__": "textlabel", "raw": _good(2)["raw"], "cls": b"seven"},
    ]
    url = _custom_shard(tmp_path / "mixed.tar", [_good(10), *bad, _good(11), _good(12)])
    s, out, msgs = _read_all([url], batch=3, epoch_batches=2)
    assert len(out) == 2 and all(x.shape == (3, 3, 8, 8) for x, _ in out)
    assert all(set(ids(x)) <= {10, 11, 12} for x, _ in out)
    assert s.skipped >= 3
    for key in ("undecodable", "nolabel", "textlabel"):
        assert any("mixed.tar" in m and key in m for m in msgs), (key, msgs)


def test_png_that_does_not_decode_is_skipped(tmp_path):
    out = write(tmp_path, n=30, encoding="png", maxcount=30)
    good = resolve_shards(str(out)).urls[0]
    url = _custom_shard(tmp_path / "broken.tar", [{"__key__": "x", "png": b"\x89PNG garbage", "cls": b"0"}])
    src = ShardSource([good, url], None, "png", (3, 8, 8), True, 5, None)
    s = ShardStream(src, rank=0, world_size=1, batch_size=4, mode="resampled", epoch_batches=8, shuffle_buffer=1)
    with deadline(30), pytest.warns(UserWarning, match="broken.tar"):
        assert len(list(s)) == 8
    assert s.skipped >= 1


def test_truncated_tar_is_skipped_and_counted(tmp_path):
    url = _custom_shard(tmp_path / "whole.tar", [_good(i) for i in range(40)])
    data = Path(url).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # ends inside a member
    s, out, msgs = _read_all([str(cut)], batch=2, epoch_batches=12)
    assert len(out) == 12 and s.skipped >= 1
    assert any("cut.tar" in m for m in msgs)


def test_everything_bad_raises_instead_of_hanging(tmp_path):
    url = _custom_shard(tmp_path / "allbad.tar", [{"__key__": f"k{i}", "raw": b"xx", "cls": b"1"} for i in range(5)])
    with pytest.raises(DataError, match="No readable sample"):
        _read_all([url])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 10)
    with pytest.raises(DataError, match="No readable sample"):
        _read_all([str(garbage)])
    # exact mode, index-listed shards that went bad after writing
    out = write(tmp_path, n=40, maxcount=8)
    for p in out.glob("train-*.tar"):
        p.write_bytes(b"\0" * 100)
    with deadline(30), pytest.raises(DataError, match="No readable sample"):
        list(stream_of(out, batch=4, mode="exact"))
    # raised inside a DataLoader worker process, it reaches the trainer as the same error
    dm = ShardDataModule(str(out), 8, 4, num_workers=1, epoch_batches=3)
    with deadline(60), pytest.raises(DataError, match="No readable sample"):
        list(dm.train_dataloader())


def test_data_pipelines_import_no_other_layer():
    import ast

    for py in (Path(shards.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("trainer", "models", "launch"), f"{py.name} imports {name}"


def test_empty_missing_and_unreachable_sources(tmp_path):
    out = write(tmp_path, n=40, maxcount=8)
    with pytest.raises(DataError, match="does not exist|do not exist"):
        resolve_shards(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="do not exist"):
        resolve_shards(str(out / "train-{000000..000009}.tar"))  # only 0..3 exist
    with pytest.raises(DataError, match="needs data.path"):
        resolve_shards("")
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["shards"] = []
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="no shards"):
        resolve_shards(str(out))
    with deadline(30), pytest.raises(DataError, match="cannot be reached"):
        resolve_shards("http://127.0.0.1:9/train-{0..3}.tar")


def test_pipe_urls_need_allow_pipe(tmp_path):
    out = write(tmp_path, n=40, maxcount=9, encoding="png")
    pattern = f"pipe:cat {out}/train-{{000000..000003}}.tar"
    with pytest.raises(DataError, match="allow_pipe"):
        resolve_shards(pattern)
    with pytest.raises(DataError, match="allow_pipe"):
        ShardDataModule(pattern, 8, 4).prepare()
    dm = ShardDataModule(pattern, 8, 4, allow_pipe=True, epoch_batches=5)
    info = dm.prepare()  # no index.json for pipes: the format is probed from the first shard
    assert (info.channels, info.resolution, dm.source.encoding) == (3, 8, "png")
    with deadline(30):
        got = [i for x, _ in dm.train_dataloader() for i in ids(x)]
    assert len(got) == 20 and set(got) <= set(ids(shards.load_shard_split(str(out), "train").images))


def test_exact_mode_needs_enough_shards(tmp_path):
    out = write(tmp_path, n=40, maxcount=12)  # 36 train samples in 3 shards
    with pytest.raises(DataError, match="at least ranks x workers = 2 x 2 = 4 shards"):
        ShardDataModule(str(out), 8, 8, mode="exact", num_workers=2, rank=0, world_size=2).train_dataloader()
    with pytest.raises(DataError, match="not divisible"):
        ShardDataModule(str(out), 8, 9, rank=0, world_size=2).train_dataloader()
    with pytest.raises(DataError, match="downsampled"):
        ShardDataModule(str(out), 16, 8).prepare()


def test_http_shards_with_their_index(tmp_path):
    import functools
    import http.server
    import threading

    out = write(tmp_path, n=40, maxcount=9)  # 36 train samples in 4 shards
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train-{{000000..000003}}.tar"
        src = resolve_shards(url)
        assert src.counts == [9, 9, 9, 9] and src.encoding == "raw"  # from index.json, fetched over http
        with deadline(60):
            got = [i for x, _ in ShardStream(src, rank=0, world_size=1, batch_size=4, mode="exact") for i in ids(x)]
        assert sorted(got) == sorted(ids(shards.load_shard_split(str(out), "train").images))
        with pytest.raises(DataError, match="cannot be reached"):
            resolve_shards(url.replace("train-", "nothing-"))
    finally:
        server.shutdown()
        server.server_close()


def test_an_npz_without_labels_is_unlabelled_not_one_class(tmp_path):
    """No 'labels' array: 0 classes (as an unlabelled image folder), both read directly and written to
    shards; an npz whose labels are all 0 is one class."""
    from data_pipelines.builtin import load_split

    imgs = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=imgs)
    np.savez(tmp_path / "one.npz", images=imgs, labels=np.zeros(20, np.int64))
    assert load_split("npz", "train", 8, path=str(tmp_path / "u.npz")).num_classes == 0
    assert load_split("npz", "train", 8, path=str(tmp_path / "one.npz")).num_classes == 1
    index = shards.write_shards("npz", tmp_path / "us", input_path=str(tmp_path / "u.npz"))
    assert (index["labels"], index["num_classes"], index["classes"]) == (False, 0, [])
    index = shards.write_shards("npz", tmp_path / "os", input_path=str(tmp_path / "one.npz"))
    assert (index["labels"], index["num_classes"], index["classes"]) == (True, 1, ["0"])


def test_cifar10_official_split_keeps_each_train_image_with_its_label(tmp_path):
    from data_pipelines import shards

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n, off in (("data_batch_1", 10, 0), ("data_batch_2", 10, 10), ("test_batch", 4, 20)):
        labels = [(off + i) % 10 for i in range(n)]
        data = np.zeros((n, 3072), np.uint8)
        data[:, 0] = [off + i for i in range(n)]  # pixel 0 = the image's number; label = number % 10
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    out = tmp_path / "sh"
    shards.write_shards("cifar10", out, input_path=str(root), encoding="png", maxcount=8)
    for split in ("train", "val"):
        ds = shards.load_shard_split(str(out), split)
        ids = ds.images[:, 0, 0, 0].long()
        assert (ds.labels == ids % 10).all(), split


@pytest.mark.parametrize("raw, message", [(b"-3", "label -3 is negative"), (b"x1", "is not an integer"),
                                          (None, "no 'cls' label")])
def test_bad_labels_are_refused_by_name(raw, message):
    from data_pipelines.shards import decode_label

    assert decode_label(b" 7\n") == 7
    with pytest.raises(ValueError, match=message):
        decode_label(raw)
