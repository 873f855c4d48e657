"""Atomic checkpoint writes, clear errors for unusable checkpoints, and pruning of old ones."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import trainer.checkpointing as ckpt_mod
from trainer.checkpointing import (AtomicCheckpointIO, CheckpointError, IterationCheckpoint, atomic_link,
                                   load_checkpoint, resolve_checkpoint)


def genscale_ckpt(it: int = 1) -> dict:
    return {"state_dict": {"w": torch.arange(1000, dtype=torch.float32) * it},
            "genscale": {"format": 1, "kind": "gan", "config": {}, "iteration": it, "images_seen": 0}}


def hidden_files(d: Path):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


# ---- atomic writes -----------------------------------------------------------------------------


def test_save_writes_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "iter-0000001.ckpt"  # parent created on demand
    AtomicCheckpointIO().save_checkpoint(genscale_ckpt(1), path)
    assert path.exists()
    loaded = torch.load(path, weights_only=False)
    assert loaded["genscale"]["iteration"] == 1
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(1000, dtype=torch.float32))
    assert hidden_files(path.parent) == []


def test_save_overwrites_existing(tmp_path):
    path = tmp_path / "a.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(genscale_ckpt(1), path)
    io.save_checkpoint(genscale_ckpt(2), path)
    assert torch.load(path, weights_only=False)["genscale"]["iteration"] == 2
    assert hidden_files(tmp_path) == []


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(genscale_ckpt(1), path)
    before = path.read_bytes()
    written = []

    def crashing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:  # half a file, then the process "dies"
            fh.write(b"PK\x03\x04partial")
        written.append(Path(f))
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(genscale_ckpt(2), path)
    assert written and written[0] != path  # the partial bytes went to a temporary file
    assert written[0].parent == path.parent  # in the same directory (so the rename is atomic)
    assert path.read_bytes() == before
    assert hidden_files(tmp_path) == []
    monkeypatch.undo()
    assert load_checkpoint(path)["genscale"]["iteration"] == 1


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    def crashing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"xx")
        raise RuntimeError("boom")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(RuntimeError):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_link(tmp_path):
    src = tmp_path / "iter-1.ckpt"
    src.write_bytes(b"one")
    dst = tmp_path / "last.ckpt"
    dst.write_bytes(b"old")
    atomic_link(src, dst)
    assert dst.read_bytes() == b"one"
    src2 = tmp_path / "iter-2.ckpt"
    src2.write_bytes(b"two")
    atomic_link(src2, dst)
    assert dst.read_bytes() == b"two" and src.read_bytes() == b"one"
    src2.unlink()  # last.ckpt survives pruning of the file it points to
    assert dst.read_bytes() == b"two"
    assert hidden_files(tmp_path) == []


# ---- loading -----------------------------------------------------------------------------------


def test_load_valid(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save(genscale_ckpt(7), path)
    ck = load_checkpoint(path)
    assert ck["genscale"]["iteration"] == 7 and ck["_path"] == str(path)


def test_load_truncated(tmp_path):
    path = tmp_path / "iter-0000002.ckpt"
    torch.save(genscale_ckpt(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (tmp_path / "iter-0000001.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert "truncated or corrupt" in msg and str(path) in msg
    assert "iter-0000001.ckpt" in msg  # points at the other checkpoints beside it


def test_load_garbage(tmp_path):
    path = tmp_path / "g.ckpt"
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "e.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("obj", [{"state_dict": {}}, {"model": 1, "optimizer": 2}, torch.zeros(3), [1, 2]])
def test_load_foreign_file(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a genscale checkpoint"):
        load_checkpoint(path)


def test_load_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_load_directory_without_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(run)
    assert "No checkpoint" in str(ei.value) and "last.ckpt" in str(ei.value) and str(run) in str(ei.value)


def test_run_directory_resolves_to_last(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(genscale_ckpt(3), run / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(run)["genscale"]["iteration"] == 3
    # a checkpoints/ directory itself works too
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "last.ckpt"


# ---- IterationCheckpoint -----------------------------------------------------------------------


class FakeTrainer:
    """What IterationCheckpoint uses of a Trainer. Like Lightning, save_checkpoint asks the callbacks
    for their state while it writes the file."""

    def __init__(self, callbacks=()):
        self.callback_metrics = {}
        self.is_global_zero = True
        self.callbacks = list(callbacks)
        self.strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)

    def save_checkpoint(self, path, weights_only=False):
        state = {"callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks}}
        state.update(genscale_ckpt(0))
        AtomicCheckpointIO().save_checkpoint(state, path)


def fake_module(it: int):
    return SimpleNamespace(iteration=torch.tensor(it), g_stepped=True)


def names(d: Path):
    return sorted(p.name for p in d.glob("iter-*.ckpt"))


def _register_and_prune(cb, tr, name, it):
    cb.kept[name] = cb._score(tr, it)
    cb._prune()


def test_prune_keeps_newest_k(tmp_path):
    cb = IterationCheckpoint(tmp_path, save_top_k=3)
    tr = SimpleNamespace(callback_metrics={})
    for it in range(100, 700, 100):
        name = f"iter-{it:07d}.ckpt"
        (tmp_path / name).write_bytes(b"x")
        _register_and_prune(cb, tr, name, it)
    assert names(tmp_path) == ["iter-0000400.ckpt", "iter-0000500.ckpt", "iter-0000600.ckpt"]
    assert set(cb.kept) == set(names(tmp_path))


def test_prune_by_monitor_keeps_best(tmp_path):
    cb = IterationCheckpoint(tmp_path, save_top_k=2, monitor="eval/fid")
    tr = SimpleNamespace(callback_metrics={})
    fids = {100: 50.0, 200: 20.0, 300: 35.0, 400: 10.0, 500: 40.0}
    for it, fid in fids.items():
        name = f"iter-{it:07d}.ckpt"
        (tmp_path / name).write_bytes(b"x")
        tr.callback_metrics = {"eval/fid": torch.tensor(fid)}
        _register_and_prune(cb, tr, name, it)
    # the lowest fid, and the newest (kept whatever it scores: a resume starts there)
    assert names(tmp_path) == ["iter-0000200.ckpt", "iter-0000400.ckpt", "iter-0000500.ckpt"]
    # a monitored save without the metric ranks last instead of evicting a measured one
    tr.callback_metrics = {}
    (tmp_path / "iter-0000600.ckpt").write_bytes(b"x")
    _register_and_prune(cb, tr, "iter-0000600.ckpt", 600)
    assert names(tmp_path) == ["iter-0000200.ckpt", "iter-0000400.ckpt", "iter-0000600.ckpt"]


def test_prune_never_drops_the_newest_and_ties_go_to_the_newer(tmp_path):
    """Between evaluations a save carries the last value: the newest must survive (resume=auto resumes
    from it), and of two saves with the same value the newer is the one kept."""
    cb = IterationCheckpoint(tmp_path, save_top_k=1, monitor="eval/bpd")
    tr = SimpleNamespace(callback_metrics={})
    for it, bpd in [(5, 3.0), (8, 3.0), (10, 2.5), (13, 2.5), (15, 2.9)]:
        name = f"iter-{it:07d}.ckpt"
        (tmp_path / name).write_bytes(b"x")
        tr.callback_metrics = {"eval/bpd": torch.tensor(bpd)}
        _register_and_prune(cb, tr, name, it)
        if it == 8:  # the stale value ties with iteration 5's: 8 is both newest and the tie's winner
            assert names(tmp_path) == ["iter-0000008.ckpt"]
    # 13 ties with 10 and wins; 15 ranks worse but is the newest, so it stays besides the best
    assert names(tmp_path) == ["iter-0000013.ckpt", "iter-0000015.ckpt"]
    assert set(cb.kept) == set(names(tmp_path))


def test_prune_negative_k_keeps_all(tmp_path):
    cb = IterationCheckpoint(tmp_path, save_top_k=-1)
    tr = SimpleNamespace(callback_metrics={})
    for it in range(1, 6):
        name = f"iter-{it:07d}.ckpt"
        (tmp_path / name).write_bytes(b"x")
        _register_and_prune(cb, tr, name, it)
    assert len(names(tmp_path)) == 5


def test_save_every_n_iters_links_last_and_prunes(tmp_path):
    cb = IterationCheckpoint(tmp_path, every_n_iters=2, save_top_k=2)
    tr = FakeTrainer([cb])
    for it in range(1, 8):
        cb.on_train_batch_end(tr, fake_module(it), None, None, 0)
    assert names(tmp_path) == ["iter-0000004.ckpt", "iter-0000006.ckpt"]
    assert (tmp_path / "last.ckpt").read_bytes() == (tmp_path / "iter-0000006.ckpt").read_bytes()
    assert cb.last_path == tmp_path / "iter-0000006.ckpt"
    # no save on D-only steps
    m = fake_module(8)
    m.g_stepped = False
    cb.on_train_batch_end(tr, m, None, None, 0)
    assert cb.last_path.name == "iter-0000006.ckpt"
    # the end of training saves the final iteration once
    cb.on_train_end(tr, fake_module(9))
    cb.on_train_end(tr, fake_module(9))
    assert names(tmp_path) == ["iter-0000006.ckpt", "iter-0000009.ckpt"]
    assert load_checkpoint(tmp_path / "last.ckpt")["genscale"]
    assert hidden_files(tmp_path) == []


def test_state_round_trip():
    cb = IterationCheckpoint("x")
    cb.kept = {"iter-0000001.ckpt": -1.0}
    cb2 = IterationCheckpoint("x")
    cb2.load_state_dict(cb.state_dict())
    assert cb2.kept == cb.kept and cb2.kept is not cb.kept


def test_resume_keeps_pruning_the_resumed_checkpoint(tmp_path):
    cb = IterationCheckpoint(tmp_path, every_n_iters=1, save_top_k=2)
    tr = FakeTrainer([cb])
    for it in range(1, 6):
        cb.save(tr, fake_module(it))
    assert names(tmp_path) == ["iter-0000004.ckpt", "iter-0000005.ckpt"]
    # resume from last.ckpt (iteration 5) with a fresh callback, as Lightning restores it
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    cb2 = IterationCheckpoint(tmp_path, every_n_iters=1, save_top_k=2)
    cb2.load_state_dict(saved["callbacks"]["IterationCheckpoint"])
    tr2 = FakeTrainer([cb2])
    for it in range(6, 10):
        cb2.save(tr2, fake_module(it))
    assert names(tmp_path) == ["iter-0000008.ckpt", "iter-0000009.ckpt"]
