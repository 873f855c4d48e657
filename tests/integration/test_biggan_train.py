"""A tiny class-conditional BigGAN run on CPU: resume is exact (weights, spectral-norm u-vectors, BN
statistics, G_ema, optimiser states, counters), the class count is checked at start, and the
checkpoint samples by class with truncation and evaluates with both BN policies."""
import pytest
import torch

from trainer.build import train
from trainer.config import ConfigError
from trainer.images import to_uint8
from trainer.evaluate import (evaluate_checkpoint, interpolation_grid, interpolation_images, sample_grid,
                              standing_stats)

from test_resume import _assert_same, _state  # tests/integration is on sys.path (rootdir conftest)

TINY = ["model.g_width=4", "model.d_width=4", "model.shared_dim=8", "data.batch_size=8", "optim.accumulate=2",
        "ema.start_iter=2", "trainer.progress_bar=false", "logging.wandb=false", "trainer.deterministic=true",
        "trainer.sample_every=0", "trainer.log_every=1", "trainer.sample_grid=10"]


def test_resume_keeps_sn_vectors_ema_and_counters(tmp_path):
    n = 3
    common = [f"logging.root={tmp_path}", f"trainer.checkpoint.every_n_iters={n}", *TINY]
    full = train("biggan_mnist5k", common + [f"trainer.max_iters={2 * n}", "logging.run_id=full"])
    half = train("biggan_mnist5k", common + [f"trainer.max_iters={n}", "logging.run_id=half"])
    resumed = train(None, [f"resume={half.run_dir}", f"trainer.max_iters={2 * n}"])
    sd_full, opt_full, meta_full = _state(full.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    sd_res, opt_res, meta_res = _state(resumed.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    sd_half, _, _ = _state(half.run_dir / "checkpoints" / f"iter-{n:07d}.ckpt")
    u_keys = [k for k in sd_full if k.endswith(".u")]
    assert any(k.startswith("G.") for k in u_keys) and any(k.startswith("D.") for k in u_keys)
    assert any(k.startswith("G_ema.") for k in u_keys)
    # the u-vectors really move during training, so equality after resume means they were restored
    moving = [k for k in u_keys if k.startswith(("G.", "D.")) and sd_full[k].numel() > 1]  # (1,): always [1]
    assert moving and all(not torch.equal(sd_half[k], sd_full[k]) for k in moving)
    assert not torch.equal(sd_half["G_ema.linear.weight"], sd_full["G_ema.linear.weight"])
    for k in ("iteration", "d_steps", "images_seen"):
        assert int(sd_full[k]) == int(sd_res[k]) and int(sd_half[k]) < int(sd_full[k])
    assert meta_full["iteration"] == meta_res["iteration"] == 2 * n
    _assert_same(sd_full, sd_res, "state_dict")
    _assert_same(opt_full, opt_res, "optimizer_states")
    assert meta_res["config"]["model"]["num_classes"] == 10  # resolved from the data and recorded


def test_class_count_mismatch_stops_the_run_at_start(tmp_path):
    with pytest.raises(ConfigError, match="has 10 classes"):
        train("biggan_mnist5k", [f"logging.root={tmp_path}", "model.num_classes=1000", *TINY])
    assert not (tmp_path / "biggan_mnist5k").exists()  # nothing was started


def test_sample_and_evaluate_a_biggan_checkpoint(tmp_path):
    run = train("biggan_mnist5k", [f"logging.root={tmp_path}/runs", "trainer.max_iters=2", *TINY])
    out = sample_grid(run.run_dir, num=10, out=tmp_path / "c7.png", truncation=0.5, label=7)
    assert out.exists()
    with pytest.raises(ConfigError, match=r"0\.\.9"):
        sample_grid(run.run_dir, num=4, out=tmp_path / "bad.png", label=10)
    feats = tmp_path / "features"
    res = evaluate_checkpoint(run.run_dir, num_samples=40, features_dir=feats, bn_mode="standing", truncation=1.0)
    assert res["protocol"]["bn_mode"] == "standing" and res["protocol"]["truncation"] == 1.0
    assert 0.0 <= res["class_accuracy"] <= 1.0 and len(res["class_accuracy_per_class"]) == 10
    plain = evaluate_checkpoint(run.run_dir, num_samples=40, features_dir=feats)
    assert plain["protocol"]["bn_mode"] == "eval" and plain["protocol"]["truncation"] is None
    assert plain["fid"] != res["fid"]
    # standing statistics: a copy with re-accumulated BN statistics; G itself and all u-vectors untouched
    G = run.module.G_ema
    before = {k: v.clone() for k, v in G.state_dict().items()}
    S = standing_stats(G, G.z_dim, 2, 0, torch.device("cpu"))
    _assert_same(G.state_dict(), before, "G after standing_stats")
    after = S.state_dict()
    assert not torch.equal(after["out_bn.running_mean"], before["out_bn.running_mean"])
    assert int(after["out_bn.num_batches_tracked"]) == 2 and not S.training
    _assert_same({k: v for k, v in after.items() if k.endswith(".u")},
                 {k: v for k, v in before.items() if k.endswith(".u")}, "u-vectors")


def test_class_and_latent_interpolation_grids(tmp_path):
    run = train("biggan_mnist5k", [f"logging.root={tmp_path}/runs", "trainer.max_iters=1", *TINY])
    G = run.module.G_ema.eval()
    imgs = interpolation_images(G, "class", 2, 5, rows=3, steps=4, seed=1).view(3, 4, 1, 32, 32)
    z = torch.Generator().manual_seed(1)
    z = torch.randn(3, G.z_dim, generator=z)
    with torch.no_grad():  # the end columns are the two classes themselves, the middle ones neither
        ends = [to_uint8(G(z, torch.full((3,), c)).float()) for c in (2, 5)]
    assert (imgs[:, 0].int() - ends[0].int()).abs().max() <= 1 and (imgs[:, -1].int() - ends[1].int()).abs().max() <= 1
    assert (imgs[:, 1].int() - ends[0].int()).abs().max() > 1
    rows = interpolation_images(G, "z", 3, 7, rows=0, steps=5)
    assert rows.shape == (5 * 5, 1, 32, 32)  # one row per class 3..7
    assert interpolation_grid(run.run_dir, "class", 0, 9, out=tmp_path / "i.png").exists()
    with pytest.raises(ConfigError, match=r"0\.\.9"):
        interpolation_images(G, "class", 0, 12, rows=1, steps=2)
