"""Progressive GAN training: schedule followed step by step (resolution, alpha, batch size), exact
resume in the middle of a fade-in, optimiser reset on growing, grids per resolution, bad input."""
import csv

import pytest
import torch

from tests.integration.test_resume import _assert_same, _state
from trainer.build import build_datamodule, train
from trainer.checkpointing import load_checkpoint
from trainer.config import ConfigError, load_config
from trainer.pgan_module import fade_reals

# 4 px: 16 images at batch 8 (2 steps); 8 px: fade-in over 24 images at batch 4 (6 steps), then stable.
TINY = ["data.name=digits", "data.resolution=8", "pgan.fmap_base=32", "pgan.fmap_max=8", "model.z_dim=8",
        "pgan.batch_sizes=[8,4]", "pgan.stable_images=[16]", "pgan.fade_images=[24]", "trainer.sample_grid=4",
        "trainer.sample_every=0", "trainer.log_every=1", "trainer.deterministic=true", "trainer.cpu_threads=1"]


def _rows(run):
    with open(run.run_dir / "metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r.get("d/loss")]


def _common(tmp_path, n):
    return [f"logging.root={tmp_path}", "trainer.progress_bar=false", "logging.wandb=false",
            f"trainer.checkpoint.every_n_iters={n}", *TINY]


def test_resume_mid_fade_in_is_exact(tmp_path):
    n = 4  # the halfway checkpoint falls at 24 images seen: 8 px, alpha 1/3 next
    common = _common(tmp_path, n)
    full = train("pgan_mnist5k", common + [f"trainer.max_iters={2 * n}", "logging.run_id=full"])
    half = train("pgan_mnist5k", common + [f"trainer.max_iters={n}", "logging.run_id=half"])
    assert half.module.phase.phase == "fade" and int(half.module.images_seen) == 24
    resumed = train(None, [f"resume={half.run_dir}", f"trainer.max_iters={2 * n}"])
    sd_full, opt_full, meta_full = _state(full.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    sd_res, opt_res, meta_res = _state(resumed.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    assert meta_full["images_seen"] == meta_res["images_seen"] == 16 + 6 * 4
    _assert_same(sd_full, sd_res, "state_dict")
    _assert_same(opt_full, opt_res, "optimizer_states")
    # the schedule step by step, identical in the resumed run's log (its first half is the half run's)
    want_res = [4, 4] + [8] * 6
    want_alpha = [1, 1] + [k / 6 for k in range(6)]
    want_batch = [8, 8] + [4] * 6
    for run in (full, resumed):
        rows = _rows(run)
        assert [int(float(r["pgan/resolution"])) for r in rows] == want_res
        assert [float(r["pgan/alpha"]) for r in rows] == pytest.approx(want_alpha)
        assert [int(float(r["train/effective_batch"])) for r in rows] == want_batch
    # a grid of the finished 4 px phase, written when G grew
    assert [p.name for p in (full.run_dir / "samples" / "resolutions").glob("*.png")] == ["res_0004px_iter_0000002.png"]
    sd_half, _, _ = _state(half.run_dir / "checkpoints" / f"iter-{n:07d}.ckpt")
    assert not torch.equal(sd_half["G.to_rgb.1.weight"], sd_full["G.to_rgb.1.weight"])


def test_optimizer_state_is_reset_when_a_layer_is_added(tmp_path):
    common = _common(tmp_path, 2)
    run = train("pgan_mnist5k", common + ["trainer.max_iters=3", "logging.run_id=reset"])
    # iteration 3 is the first at 8 px: Adam's step count restarted there (1), instead of 3
    opt_g = load_checkpoint(run.run_dir / "checkpoints" / "iter-0000003.ckpt")["optimizer_states"][0]
    assert {int(s["step"]) for s in opt_g["state"].values()} == {1}
    keep = train("pgan_mnist5k", common + ["trainer.max_iters=3", "logging.run_id=keep", "pgan.reset_optimizer=false"])
    opt_g = load_checkpoint(keep.run_dir / "checkpoints" / "iter-0000003.ckpt")["optimizer_states"][0]
    assert {int(s["step"]) for s in opt_g["state"].values()} == {1, 3}  # new layers 1, old ones 3


def test_batches_follow_the_schedule_without_crossing_resolutions():
    cfg = load_config("pgan_mnist5k", TINY)
    dm = build_datamodule(cfg)
    dm.prepare()
    it = iter(dm.train_dataloader())
    batches = [next(it)[0] for _ in range(5)]
    assert [b.shape[0] for b in batches] == [8, 8, 4, 4, 4]  # the 8-image batches end exactly at 16 images
    # the position is images consumed: a loader resumed at 16 images continues with the third batch
    dm.images_consumed = 16
    assert torch.equal(next(iter(dm.train_dataloader()))[0], batches[2])


def test_fade_reals_blends_like_the_generator():
    x = torch.randn(2, 1, 8, 8)
    low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    assert torch.equal(fade_reals(x, 8, 0.0), low)
    assert torch.equal(fade_reals(x, 8, 1.0), x)
    assert torch.allclose(fade_reals(x, 8, 0.25), 0.75 * low + 0.25 * x, atol=1e-6)
    assert torch.equal(fade_reals(x, 4, 1.0), torch.nn.functional.avg_pool2d(x, 2))


@pytest.mark.parametrize("extra,msg", [
    (["pgan.batch_sizes=[8,4,2]"], "batch_sizes has 3 entries"),
    (["pgan.stable_images=[1,2,3]"], "stable_images has 3 entries"),
    (["pgan.final_resolution=16"], "pgan.final_resolution=16 but data.resolution=8"),
    (["data.resolution=12"], "power-of-two"),
])
def test_mismatched_schedule_is_refused_at_start(extra, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("pgan_mnist5k", TINY + extra)


@pytest.fixture(scope="module")
def shards8(tmp_path_factory):
    from launch.cli import main as genscale

    out = tmp_path_factory.mktemp("shards") / "digits8"
    assert genscale(["data", "write", "--source", "digits", "--out", str(out), "--resolution", "8",
                     "--shard-maxcount", "500", "--workers", "1"]) == 0
    return out


def test_shards_follow_the_per_resolution_batches(shards8, tmp_path):
    run = train("pgan_mnist5k", _common(tmp_path, 4) + ["trainer.max_iters=4", "data.name=shards",
                                                        f"data.path={shards8}"])
    rows = _rows(run)
    assert [int(float(r["train/effective_batch"])) for r in rows] == [8, 8, 4, 4]
    assert [int(float(r["pgan/resolution"])) for r in rows] == [4, 4, 8, 8]


def test_target_resolution_above_the_shards_is_refused(shards8, tmp_path):
    from data_pipelines.builtin import DataError

    with pytest.raises(DataError, match="above the 8 px"):
        train("pgan_mnist5k", _common(tmp_path, 4) + ["data.resolution=16", "pgan.batch_sizes=[8,4,4]",
                                                      "data.name=shards", f"data.path={shards8}"])


def test_a_checkpoint_samples_and_evaluates_at_its_own_level(tmp_path):
    """sample/eval build G from a checkpoint: mid-growth (8 px, mid fade-in) it must run at that level
    and alpha, not at the final resolution's untrained layers; the module's phase follows too."""
    from trainer.evaluate import _build_generator, _run_data

    run = train("pgan_mnist5k", _common(tmp_path, 2) + ["trainer.max_iters=4", "trainer.checkpoint.save_top_k=-1",
                                                         "logging.run_id=lv", "pgan.stable_images=[16,64]"])
    ckpt = load_checkpoint(run.run_dir / "checkpoints" / "iter-0000002.ckpt")  # 16 images: 8 px fade starts
    cfg, state = ckpt["genscale"]["config"], ckpt["state_dict"]
    G, _ = _build_generator(cfg, state, _run_data(cfg, "val"), use_ema=True)
    assert (G.level, G.alpha) == (1, 0.0)
    z = torch.randn(4, 8)
    with torch.no_grad():
        low = G.G(z, 0, 1.0)  # alpha 0 right after growing: exactly the 4 px image, upsampled
        assert torch.equal(G(z), torch.nn.functional.interpolate(low, size=8, mode="nearest"))
    from trainer.build import build_module
    from trainer.config import load_config

    module = build_module(load_config(base=cfg), channels=1, num_classes=10)
    module.load_state_dict(state)
    assert (module.phase.level, module.phase.alpha) == (1, 0.0)


def test_periodic_eval_mid_growth_matches_eval_of_the_checkpoint(tmp_path):
    """The FID logged during training (eval.every_n_iters) is taken where growth stands, exactly as
    `genscale eval` of the checkpoint written at the same iteration, not at the untrained final level."""
    import json

    from trainer.evaluate import evaluate_checkpoint

    run = train("pgan_mnist5k", _common(tmp_path, 3) + [
        "trainer.max_iters=3", "logging.run_id=ev", "eval.every_n_iters=3", "eval.num_samples=64",
        "data.name=digits", f"eval.features_dir={tmp_path}/features"])
    assert run.module.phase.phase == "fade" and run.module.phase.level == 1  # mid fade-in to 8 px
    logged = json.loads((run.run_dir / "eval.jsonl").read_text().splitlines()[0])
    assert logged["iteration"] == 3
    again = evaluate_checkpoint(run.run_dir / "checkpoints" / "iter-0000003.ckpt", features_dir=f"{tmp_path}/features")
    assert again["fid"] == pytest.approx(logged["fid"], rel=1e-6)
