"""`-m gpu`: every model family in bf16 on CUDA. Forward values agree with fp32 on the same weights
and inputs, and a few real training iterations in bf16-mixed stay finite. Skipped without a GPU, so
CI (CPU only) stays green; run on a GPU machine with `python -m pytest -m gpu tests/gpu`."""
import csv
import math

import pytest
import torch

from trainer.build import build_module, train
from trainer.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    "wgan_gp_mnist5k": ["model.g_width=32", "model.d_width=32"],
    "biggan_mnist5k": ["model.g_width=8", "model.d_width=8"],
    "glow_digits": [],
}
SHAPE = {"wgan_gp_mnist5k": (1, 10), "biggan_mnist5k": (1, 10), "glow_digits": (1, 10)}


def _module(exp):
    cfg = load_config(exp, CASES[exp] + ["logging.wandb=false"])
    channels, classes = SHAPE[exp]
    return build_module(cfg, channels=channels, num_classes=classes).cuda(), cfg


@pytest.mark.parametrize("exp", list(CASES))
def test_bf16_forward_agrees_with_fp32(exp):
    torch.manual_seed(0)
    module, cfg = _module(exp)
    module.eval()
    n, r = 16, cfg.data.resolution
    with torch.no_grad():
        if hasattr(module, "glow"):
            x = torch.rand(n, 1, r, r, device="cuda") - 0.5
            ref = module.glow.log_prob(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = module.glow.log_prob(x).float()
            scale = ref.abs().mean()
        else:
            z = torch.randn(n, cfg.model.z_dim, device="cuda")
            y = torch.arange(n, device="cuda") % 10 if module.num_classes else None
            ref = module._d(module._g(z, y), y).float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = module._d(module._g(z, y), y).float()
            scale = ref.abs().mean() + ref.std()
    assert torch.isfinite(low).all()
    err = float((low - ref).abs().max() / scale)
    assert err < 0.05, f"{exp}: bf16 differs from fp32 by {err:.3g} of the output scale"


@pytest.mark.parametrize("exp", list(CASES))
def test_bf16_training_iterations_stay_finite(exp, tmp_path):
    run = train(exp, CASES[exp] + [f"logging.root={tmp_path}", "logging.wandb=false", "trainer.accelerator=gpu",
                                   "trainer.devices=1", "trainer.precision=bf16-mixed", "trainer.max_iters=5",
                                   "trainer.log_every=1", "trainer.sample_every=0", "trainer.progress_bar=false"])
    assert int(run.module.iteration) == 5
    for k, v in run.module.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    key = "train/bpd" if exp.startswith("glow") else "d/loss"
    vals = [float(r[key]) for r in rows if r.get(key)]
    assert len(vals) == 5 and all(math.isfinite(v) for v in vals)


def test_fp16_gan_has_one_scaler_per_network(tmp_path):
    run = train("wgan_gp_mnist5k", CASES["wgan_gp_mnist5k"] + [
        f"logging.root={tmp_path}", "logging.wandb=false", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.precision=16-mixed", "trainer.max_iters=3", "trainer.sample_every=0", "trainer.progress_bar=false"])
    m = run.module
    assert set(m._scalers) == {"G", "D"} and m._scalers["G"] is not m._scalers["D"]
    assert run.trainer.precision_plugin.scaler is None  # Lightning's shared scaler is off
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())


def test_bf16_gradient_penalty_in_autocast_trains_finite(tmp_path):
    """loss.gp_autocast=true: WGAN-GP's penalty critic in bf16 on CUDA, 5 iterations, finite weights and
    a logged penalty of the fp32 run's size (same seed and data; only the penalty's precision differs)."""
    gp = {}
    for on in ("false", "true"):
        run = train("wgan_gp_mnist5k", CASES["wgan_gp_mnist5k"] + [
            f"logging.root={tmp_path}", f"logging.run_id=gp_autocast_{on}", "logging.wandb=false",
            "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", "trainer.max_iters=5",
            "trainer.log_every=1", "trainer.sample_every=0", "trainer.progress_bar=false", f"loss.gp_autocast={on}"])
        assert all(torch.isfinite(v).all() for v in run.module.state_dict().values() if v.is_floating_point())
        rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
        gp[on] = [float(r["d/gp"]) for r in rows if r.get("d/gp")]
    assert len(gp["true"]) == 5 and all(math.isfinite(v) for v in gp["true"])
    assert abs(gp["true"][0] - gp["false"][0]) <= 0.05 * abs(gp["false"][0])  # the first step: same weights
