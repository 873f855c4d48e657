"""Shards end to end: `genscale data write` -> training with data.name=shards -> checkpoint -> resume,
`genscale data inspect`, and exact-mode splitting across two real gloo processes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp

from launch.cli import main as genscale
from trainer.build import train
from trainer.checkpointing import load_checkpoint


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits16"
    assert genscale(["data", "write", "--source", "digits", "--out", str(out), "--resolution", "16",
                     "--shard-maxcount", "200", "--workers", "2"]) == 0
    return out


def test_cli_write_and_inspect(digit_shards, tmp_path, capsys):
    index = json.loads((digit_shards / "index.json").read_text())
    assert index["splits"]["train"]["count"] == 1617 and len(index["splits"]["train"]["shards"]) == 9
    capsys.readouterr()
    assert genscale(["data", "inspect", str(digit_shards), "--grid", str(tmp_path / "g.png"), "--verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["ok"] and report["verify"]["readable_samples"] == 1797
    assert set(report["verify"]["train_per_class"]) == {str(k) for k in range(10)}
    assert sum(report["verify"]["train_per_class"].values()) == 1617  # the train split's images, not val's
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (8 * 18 + 2, 8 * 18 + 2)  # 8x8 tiles of 16 px, 2 px gaps
    # Bad usage exits 2 with a message, not a traceback.
    assert genscale(["data", "write", "--source", "imagefolder", "--out", str(tmp_path / "x")]) == 2
    assert "--input" in capsys.readouterr().err
    assert genscale(["data", "inspect", str(tmp_path)]) == 2
    assert "index.json" in capsys.readouterr().err


def test_train_on_shards_checkpoint_and_resume(digit_shards, tmp_path):
    base = ["data.name=shards", f"data.path={digit_shards}", "data.epoch_batches=3", "logging.wandb=false",
            "trainer.progress_bar=false", f"logging.root={tmp_path}", "trainer.checkpoint.every_n_iters=5"]
    run = train("gan_digits", base + ["trainer.max_iters=5"])
    assert int(run.module.iteration) == 5
    import csv

    with open(run.run_dir / "metrics.csv") as fh:
        skipped = [r for r in csv.DictReader(fh) if r.get("data/skipped")]
    assert skipped and float(skipped[0]["data/skipped"]) == 0.0  # the reader's skip counter is logged,
    assert skipped[0]["iteration"] == "1.0" and float(skipped[0]["progress/kimg"]) > 0  # keyed like the rest
    ckpt = load_checkpoint(str(run.run_dir))
    state = ckpt["ShardDataModule"]
    # 5 batches of 3-batch epochs: epoch 0 done, 2 batches into epoch 1.
    assert (state["mode"], state["epoch"], state["batches_in_epoch"], state["seed"]) == ("resampled", 1, 2, 0)
    assert ckpt["genscale"]["config"]["data"]["name"] == "shards"
    resumed = train(None, [f"resume={run.run_dir}", "trainer.max_iters=8"])
    assert int(resumed.module.iteration) == 8
    after = resumed.datamodule.state_dict()
    assert after["epoch"] == 2 and after["batches_in_epoch"] == 2  # epoch 1 finished, then 2 of epoch 2


def test_exact_mode_training_resumes_mid_epoch(digit_shards, tmp_path):
    base = ["data.name=shards", f"data.path={digit_shards}", "data.mode=exact", "logging.wandb=false",
            "trainer.progress_bar=false", f"logging.root={tmp_path}"]
    run = train("gan_digits", base + ["trainer.max_iters=4"])
    state = load_checkpoint(str(run.run_dir))["ShardDataModule"]
    # Counted from the module's D steps, not from the loader (Lightning fetches one batch ahead).
    assert (state["mode"], state["epoch"], state["batches_in_epoch"]) == ("exact", 0, 4)
    resumed = train(None, [f"resume={run.run_dir}", "trainer.max_iters=7"])
    after = resumed.datamodule.state_dict()
    assert (after["epoch"], after["batches_in_epoch"]) == (0, 7)  # the same epoch, continued


def _exact_rank(rank: int, world: int, path: str, out: str, init: str) -> None:
    import torch.distributed as dist

    from data_pipelines.datamodule import ShardDataModule

    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"  # misleading on purpose: must not be used
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dm = ShardDataModule(path, 8, batch_size=16, mode="exact", num_workers=2, seed=5, rank=rank, world_size=world)
    batches = list(dm.train_dataloader())
    ids = [int(i) for x, _ in batches for i in x[:, 0, 0, 0]]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"n": len(batches), "ids": ids, "shape": list(batches[0][0].shape)})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_gloo_processes_exact_mode_disjoint_and_covering(tmp_path):
    import numpy as np

    from data_pipelines.shards import load_shard_split, write_shards

    imgs = np.random.default_rng(0).integers(0, 256, size=(71, 1, 8, 8), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(71)  # sample id
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(71) % 3)
    index = write_shards("npz", tmp_path / "sh", input_path=str(tmp_path / "d.npz"), encoding="png", maxcount=8)
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [8] * 8
    val_ids = {int(i) for i in load_shard_split(str(tmp_path / "sh"), "val").images[:, 0, 0, 0]}
    train_ids = set(range(71)) - val_ids
    out = tmp_path / "result.json"
    # fork: the children start with everything imported (spawn re-imports torch and Lightning: ~15 s here)
    tmp_mp.start_processes(_exact_rank, args=(2, str(tmp_path / "sh"), str(out), f"file://{tmp_path}/pg"),
                           nprocs=2, join=True, start_method="fork")
    r0, r1 = json.loads(out.read_text())
    assert r0["n"] == r1["n"] == 4 and r0["shape"] == [8, 1, 8, 8]  # global batch 16 split over 2 ranks
    assert not set(r0["ids"]) & set(r1["ids"])  # disjoint
    assert sorted(r0["ids"] + r1["ids"]) == sorted(train_ids)  # together exactly the epoch


def test_a_run_on_a_shard_pattern_evaluates_on_the_directorys_val_split(digit_shards, tmp_path):
    """data.path as a brace pattern of the train shards: the held-out split for FID (during training and
    in `genscale eval`) comes from the index.json beside them; a pattern without one is a clear error."""
    from data_pipelines.builtin import DataError
    from data_pipelines.shards import load_shard_split
    from trainer.evaluate import evaluate_checkpoint

    pattern = f"{digit_shards}/train-{{000000..000008}}.tar"
    run = train("gan_digits", [f"data.path={pattern}", "data.name=shards", "data.epoch_batches=2",
                               "logging.wandb=false", "trainer.progress_bar=false", f"logging.root={tmp_path}",
                               "trainer.max_iters=2", "eval.every_n_iters=2", "eval.num_samples=50",
                               f"eval.features_dir={tmp_path}/features"])
    logged = json.loads((run.run_dir / "eval.jsonl").read_text().splitlines()[0])
    assert logged["protocol"]["num_real"] == len(load_shard_split(str(digit_shards), "val")) == 180
    again = evaluate_checkpoint(run.run_dir, features_dir=f"{tmp_path}/features")
    assert again["fid"] == pytest.approx(logged["fid"], rel=1e-6)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    with pytest.raises(DataError, match="pattern with none beside its shards"):
        load_shard_split(f"{lonely}/train-{{0..1}}.tar", "val")


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(digit_shards, tmp_path, capsys):
    """A failure at the start of fit (here: exact mode with more workers than shards) removes the run
    directory it had just made, so the same command with the cause fixed simply runs (before, the id was
    blocked by a directory holding only config.yaml, with a hint to resume a run that had no checkpoint)."""
    from data_pipelines.builtin import DataError

    base = ["data.name=shards", f"data.path={digit_shards}", "data.mode=exact", "logging.wandb=false",
            "trainer.progress_bar=false", f"logging.root={tmp_path}", "logging.run_id=r1", "trainer.max_iters=2"]
    with pytest.raises((DataError, ValueError), match="needs at least ranks x workers"):
        train("gan_digits", base + ["data.num_workers=16"])
    assert not (tmp_path / "gan_digits" / "r1").exists()
    assert "failed before its first step" in capsys.readouterr().err
    assert int(train("gan_digits", base).module.iteration) == 2


def test_a_failure_after_training_started_keeps_the_directory(tmp_path):
    from types import SimpleNamespace

    import torch

    from trainer.build import discard_unstarted

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    trained = SimpleNamespace(iteration=torch.tensor(3))
    assert not discard_unstarted(run_dir, trained) and run_dir.is_dir()
    (run_dir / "checkpoints" / "iter-0000003.ckpt").write_bytes(b"x")
    assert not discard_unstarted(run_dir, None) and run_dir.is_dir()
    (run_dir / "checkpoints" / "iter-0000003.ckpt").unlink()
    assert discard_unstarted(run_dir, None) and not run_dir.exists()
