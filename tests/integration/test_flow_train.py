"""Glow through the config system, the assembly point and the CLI: `train("glow_digits", ...)` trains
(bits/dim falls in metrics.csv, checkpoints and sample grids are written), `genscale eval` reports
held-out bits/dim with its protocol, `genscale sample --temperature` writes grids, bad flow configs
fail with clear errors, and resume is exact (N + resume + N == 2N)."""
import csv
import json

import pytest
import torch

from launch.cli import main
from trainer.build import _strategy, build_trainer, train
from trainer.callbacks.ema import EMACallback
from trainer.checkpointing import load_checkpoint
from trainer.config import ConfigError, load_config
from trainer.flow_module import FLOW_DEFAULTS, FlowModule

TINY = ["trainer.progress_bar=false", "logging.wandb=false", "trainer.sample_grid=16"]


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return train("glow_digits", TINY + [f"logging.root={root}", "trainer.max_iters=40", "trainer.log_every=5",
                                        "trainer.sample_every=20", "trainer.checkpoint.every_n_iters=20"])


def test_glow_digits_trains_through_the_config_system(digits_run):
    run = digits_run
    assert isinstance(run.module, FlowModule) and int(run.module.iteration) == 40
    assert not any(isinstance(c, EMACallback) for c in run.trainer.callbacks)  # FlowModule keeps its own EMA
    rows = [r for r in _rows(run.run_dir) if r.get("train/bpd")]
    assert [int(float(r["iteration"])) for r in rows] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    first, last = float(rows[0]["train/bpd"]), float(rows[-1]["train/bpd"])
    assert 4.5 < first < 7.0 and last < first - 0.5, (first, last)
    ckpt = load_checkpoint(run.run_dir)
    g = ckpt["genscale"]
    assert (g["kind"], g["iteration"], g["world_size"]) == ("flow", 40, 1)
    assert g["config"]["model"]["name"] == "glow" and g["config"]["flow"]["n_bits"] == 5
    assert (run.run_dir / "checkpoints" / "iter-0000020.ckpt").exists()
    assert sorted(p.name for p in (run.run_dir / "samples").glob("*.png")) == ["iter_0000020.png",
                                                                             "iter_0000040.png"]
    # every key FlowModule reads is in the run config (the schema mirrors FLOW_DEFAULTS, less flow.model)
    for section, keys in FLOW_DEFAULTS.items():
        assert set(keys) - {"model"} <= set(run.module.cfg[section]), section


def test_cli_eval_reports_held_out_bits_per_dim(digits_run, capsys):
    assert main(["eval", str(digits_run.run_dir), "--num", "100", "--seed", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    p = result["protocol"]
    assert (p["n_bits"], p["split"], p["num_images"], p["ema"], p["dequantisation_seed"]) == (5, "val", 100, False, 3)
    assert 3.0 < result["bpd"] < 5.5 and result["iteration"] == 40
    logged = [json.loads(line) for line in (digits_run.run_dir / "eval.jsonl").read_text().splitlines()]
    assert logged[-1]["bpd"] == result["bpd"]
    assert float(_rows(digits_run.run_dir)[-1]["eval/bpd"]) == pytest.approx(result["bpd"])
    # the same seed gives the same number; a model that learnt beats the uniform 5 bits/dim
    assert main(["eval", str(digits_run.run_dir), "--num", "100", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["bpd"] == result["bpd"]


def test_cli_sample_with_temperatures(digits_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", str(digits_run.run_dir), "--temperature", "0.7", "--num", "9", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["out"] == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and info["temperature"] == [0.7]
    assert main(["sample", str(digits_run.run_dir), "--temperature", "0", "1", "--out", str(out)]) == 0
    assert (tmp_path / "s_T0.png").exists() and (tmp_path / "s_T1.png").exists()
    capsys.readouterr()
    assert main(["sample", str(digits_run.run_dir), "--class", "3"]) == 2  # unconditional model
    assert "class-conditional" in capsys.readouterr().err


def test_cli_sample_interpolates_between_held_out_images(digits_run, tmp_path, capsys):
    from trainer.evaluate import _run_data
    from trainer.flow_eval import load_flow_module
    from trainer.images import to_uint8

    out = tmp_path / "interp.png"
    assert main(["sample", str(digits_run.run_dir), "--interpolate", "3", "7", "--num", "5", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["interpolate"] == [3, 7] and out.exists()
    # the endpoints reconstruct the (dequantised) held-out images: every level's latent is reused
    module = load_flow_module(digits_run.run_dir)
    val = _run_data(module.cfg, "val")
    g = torch.Generator().manual_seed(0)
    xa, xb = module.prep(val.images[3:4], g), module.prep(val.images[7:8], g)
    x = module.glow.interpolate(xa, xb, torch.linspace(0, 1, 5))
    assert torch.allclose(x[0], xa[0], atol=1e-4) and torch.allclose(x[-1], xb[0], atol=1e-4)
    assert not torch.allclose(x[2], xa[0], atol=1e-2)
    assert main(["sample", str(digits_run.run_dir), "--interpolate", "0", "99999"]) == 2
    assert "held-out" in capsys.readouterr().err
    # options for GAN checkpoints are refused with the usual error line, not ignored
    for argv, said in ((["--interpolate-z", "1", "2"], "--interpolate-z apply to class-conditional GAN"),
                       (["--truncation", "1.0"], "--truncation applies to GAN checkpoints")):
        assert main(["sample", str(digits_run.run_dir), *argv, "--out", str(tmp_path / "no.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("genscale sample: error:") and said in err
    assert not (tmp_path / "no.png").exists()
    assert main(["eval", str(digits_run.run_dir), "--num", "0"]) == 2
    assert "--num must be at least 2" in capsys.readouterr().err


def test_cli_lists_the_flow_model(capsys):
    assert main(["list", "models"]) == 0
    assert "glow" in capsys.readouterr().out


def test_flow_config_errors():
    with pytest.raises(ConfigError, match=r"flow.levels=3.*data.resolution=12"):
        load_config("glow_digits", ["data.resolution=12", "flow.levels=3"])
    with pytest.raises(ConfigError, match=r"flow.n_bits.*1..8"):
        load_config("glow_digits", ["flow.n_bits=9"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'flow.hiden'.*flow.hidden"):
        load_config("glow_digits", ["flow.hiden=8"])
    with pytest.raises(ConfigError, match="flow.coupling"):
        load_config("glow_digits", ["flow.coupling=spline"])
    with pytest.raises(ConfigError, match="Unknown model"):
        load_config("glow_digits", ["model.name=glw"])
    with pytest.raises(ConfigError, match="gan_ddp is for GANs"):
        _strategy(load_config("glow_digits", ["trainer.strategy=gan_ddp"]).trainer, flow=True)
    # GANs still refuse plain ddp; flows with several processes get Lightning's DDP
    with pytest.raises(ConfigError, match="wraps G and D"):
        _strategy(load_config("gan_digits", ["trainer.strategy=ddp"]).trainer)
    from lightning.pytorch.strategies import DDPStrategy
    cfg = load_config("glow_digits", ["trainer.devices=2", "trainer.accelerator=cpu"])
    assert isinstance(_strategy(cfg.trainer, flow=True), DDPStrategy)


def test_flow_resume_is_exact(tmp_path):
    n = 4
    common = TINY + [f"logging.root={tmp_path}", "trainer.deterministic=true", f"trainer.checkpoint.every_n_iters={n}",
                     "trainer.sample_every=0", "trainer.log_every=1", "ema.enabled=true", "ema.decay=0.9",
                     "flow.warmup_images=256"]
    full = train("glow_digits", common + [f"trainer.max_iters={2 * n}", "logging.run_id=full"])
    half = train("glow_digits", common + [f"trainer.max_iters={n}", "logging.run_id=half"])
    resumed = train(None, [f"resume={half.run_dir}", f"trainer.max_iters={2 * n}"])
    a = load_checkpoint(full.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    assert a["genscale"]["iteration"] == b["genscale"]["iteration"] == 2 * n
    assert any(k.startswith("glow_ema.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    its = [int(float(r["iteration"])) for r in _rows(resumed.run_dir) if r.get("train/bpd")]
    assert its == list(range(1, 2 * n + 1))
    h = load_checkpoint(half.run_dir / "checkpoints" / f"iter-{n:07d}.ckpt")["state_dict"]
    assert any(not torch.equal(v, a["state_dict"][k]) for k, v in h.items() if v.is_floating_point())


def test_periodic_held_out_bits_per_dim_during_training(tmp_path):
    run = train("glow_digits", TINY + [f"logging.root={tmp_path}", "trainer.max_iters=20", "trainer.sample_every=0",
                                       "eval.every_n_iters=10", "eval.at_start=true", "eval.num_samples=64",
                                       "trainer.checkpoint.monitor=eval/bpd", "trainer.checkpoint.every_n_iters=10"])
    evals = [json.loads(line) for line in (run.run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 10, 20]
    assert all(e["protocol"]["num_images"] == 64 for e in evals)
    assert evals[2]["bpd"] < evals[0]["bpd"]
    rows = [r for r in _rows(run.run_dir) if r.get("eval/bpd")]
    assert [int(float(r["iteration"])) for r in rows] == [0, 10, 20]


def test_the_untrained_eval_sees_the_flow_training_starts_from(tmp_path):
    """eval.at_start evaluates after ActNorm's data-dependent init on the first batch (as the first step
    would do it), not the identity ActNorm of a fresh flow: with a negligible learning rate, the value
    before the first step equals the value after it."""
    run = train("glow_digits", TINY + [f"logging.root={tmp_path}", "trainer.max_iters=1", "trainer.sample_every=0",
                                       "eval.every_n_iters=1", "eval.at_start=true", "eval.num_samples=64",
                                       "flow.lr=1e-12"])
    evals = [json.loads(line) for line in (run.run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1]
    assert evals[0]["bpd"] == pytest.approx(evals[1]["bpd"], abs=1e-4)


def test_the_interpolation_grid_shows_the_held_out_images_at_its_ends(digits_run, tmp_path, monkeypatch):
    """The flow works on [-0.5, 0.5]; the grid is drawn in [-1, 1]: its end tiles are the two held-out
    images themselves (to within 5-bit quantisation and dequantisation noise)."""
    import trainer.flow_eval as flow_eval
    from trainer.evaluate import _run_data

    drawn = []
    monkeypatch.setattr(flow_eval, "save_grid", lambda x, out: drawn.append(x) or out)
    flow_eval.flow_interpolate(load_checkpoint(digits_run.run_dir), 3, 7, num=5, out=tmp_path / "i.png")
    val = _run_data(digits_run.module.cfg, "val")
    (x,) = drawn
    for tile, i in ((x[0], 3), (x[-1], 7)):
        assert (tile - (val.images[i].float() / 127.5 - 1)).abs().max() < 0.1


def test_eval_caps_the_images_at_the_held_out_split(digits_run):
    from trainer.flow_eval import evaluate_flow_checkpoint

    p = evaluate_flow_checkpoint(str(digits_run.run_dir), num=10 ** 6)["protocol"]
    assert p["num_images"] == p["num_val"] > 100


def test_eval_uses_the_ema_flow_unless_the_run_or_the_caller_says_not(tmp_path):
    from trainer.flow_eval import evaluate_flow_checkpoint

    run = train("glow_digits", TINY + [f"logging.root={tmp_path}", "trainer.max_iters=4", "ema.enabled=true"])
    ckpt = load_checkpoint(run.run_dir)
    assert evaluate_flow_checkpoint(ckpt, num=20)["protocol"]["ema"] is True
    assert evaluate_flow_checkpoint(ckpt, num=20, use_ema=False)["protocol"]["ema"] is False
    ckpt["genscale"]["config"]["eval"]["use_ema"] = False
    raw = evaluate_flow_checkpoint(ckpt, num=20)
    assert raw["protocol"]["ema"] is False
    assert raw["bpd"] == evaluate_flow_checkpoint(ckpt, num=20, use_ema=False)["bpd"]
