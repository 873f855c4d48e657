"""EMA generator: beta schedule, the update rule, buffers, and the callback on a real GANModule."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainer.callbacks.ema import EMACallback, ema_beta, ema_update


# ---- schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("it, expected", [
    (0, 0.0), (9, 0.0),            # before start_iter: plain copy
    (10, 0.0),                     # ramp starts at 0
    (15, 0.9 * 5 / 20),            # 0.225
    (20, 0.9 * 10 / 20),           # 0.45
    (29, 0.9 * 19 / 20),           # 0.855
    (30, 0.9), (31, 0.9), (10_000, 0.9),
])
def test_ema_beta_ramp(it, expected):
    assert ema_beta(it, decay=0.9, start_iter=10, rampup_iters=20) == pytest.approx(expected, abs=1e-12)


def test_ema_beta_without_ramp():
    assert ema_beta(0, 0.999) == 0.999
    assert ema_beta(123, 0.999) == 0.999
    assert ema_beta(4, 0.999, start_iter=5) == 0.0
    assert ema_beta(5, 0.999, start_iter=5) == 0.999


def test_ema_beta_ramp_from_zero():
    assert ema_beta(0, 0.5, 0, 4) == 0.0
    assert ema_beta(1, 0.5, 0, 4) == pytest.approx(0.125)
    assert ema_beta(3, 0.5, 0, 4) == pytest.approx(0.375)
    assert ema_beta(4, 0.5, 0, 4) == pytest.approx(0.5)


# ---- update rule -------------------------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def set_dyadic(net: nn.Module, gen: torch.Generator) -> None:
    """Parameters on a grid of 1/4: the EMA arithmetic below is then exact in float32."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=gen).float() / 4)


def test_ema_update_matches_formula_exactly():
    gen = torch.Generator().manual_seed(0)
    model, ema = small_net(), small_net()
    set_dyadic(model, gen)
    set_dyadic(ema, gen)
    beta = 0.75
    expected = [p.detach().clone() for p in ema.parameters()]
    for _ in range(4):
        set_dyadic(model, gen)  # a "training step" changes G
        src = [p.detach().clone() for p in model.parameters()]
        expected = [beta * e + (1 - beta) * s for e, s in zip(expected, src)]
        ema_update(ema, model, beta)
        for e, p in zip(expected, ema.parameters()):
            assert torch.equal(p, e)
        for s, p in zip(src, model.parameters()):
            assert torch.equal(p, s)  # the source network is not touched


def test_ema_update_random_values_close_to_formula():
    torch.manual_seed(0)
    model, ema = small_net(), small_net()
    expected = [p.detach().clone() for p in ema.parameters()]
    for beta in (0.9, 0.5, 0.999):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        expected = [beta * e + (1 - beta) * p.detach() for e, p in zip(expected, model.parameters())]
        ema_update(ema, model, beta)
        for e, p in zip(expected, ema.parameters()):
            torch.testing.assert_close(p, e, rtol=0, atol=1e-6)


def test_ema_update_beta_zero_copies():
    torch.manual_seed(0)
    model, ema = small_net(), small_net()
    ema_update(ema, model, 0.0)
    for p, e in zip(model.parameters(), ema.parameters()):
        assert torch.equal(p, e)


def test_ema_update_beta_one_would_freeze():
    torch.manual_seed(0)
    model, ema = small_net(), small_net()
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 1.0)
    for b, e in zip(before, ema.parameters()):
        assert torch.equal(b, e)


def test_ema_update_copies_buffers():
    torch.manual_seed(0)
    model, ema = small_net(), small_net()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3) * 3 + 1)  # moves BatchNorm running stats
    bn_m, bn_e = model[1], ema[1]
    assert not torch.equal(bn_m.running_mean, bn_e.running_mean)
    ema_update(ema, model, 0.9)  # buffers are copied whatever beta is
    assert torch.equal(bn_e.running_mean, bn_m.running_mean)
    assert torch.equal(bn_e.running_var, bn_m.running_var)
    assert int(bn_e.num_batches_tracked) == 3


def test_ema_update_keeps_ema_frozen_params():
    model, ema = small_net(), small_net()
    for p in ema.parameters():
        p.requires_grad_(False)
    ema_update(ema, model, 0.5)
    assert all(not p.requires_grad for p in ema.parameters())


# ---- callback on a real module -----------------------------------------------------------------


def build(overrides):
    from trainer.build import build_module
    from trainer.config import load_config

    cfg = load_config("gan_digits", ["logging.wandb=false", "model.z_dim=8", "model.g_width=8",
                                     "model.d_width=8", "data.resolution=8"] + overrides)
    return build_module(cfg, channels=1, num_classes=10)


def perturb(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn_like(m.running_mean))


def test_ema_callback_follows_schedule_with_previous_iteration():
    torch.manual_seed(0)
    module = build(["ema.decay=0.9", "ema.start_iter=2", "ema.rampup_iters=4"])
    cb = EMACallback(0.9, start_iter=2, rampup_iters=4)
    assert module.G_ema is not None
    # G_ema starts as a copy of G and does not train
    for p, e in zip(module.G.parameters(), module.G_ema.parameters()):
        assert torch.equal(p, e) and not e.requires_grad
    betas = []
    for iteration in range(1, 10):  # iteration already counts the G step just taken
        perturb(module.G)
        module.iteration.fill_(iteration)
        module.g_stepped = True
        old = [p.detach().clone() for p in module.G_ema.parameters()]
        beta = ema_beta(iteration - 1, 0.9, 2, 4)
        betas.append(beta)
        cb.on_train_batch_end(None, module, None, None, 0)
        for o, p, e in zip(old, module.G.parameters(), module.G_ema.parameters()):
            torch.testing.assert_close(e, beta * o + (1 - beta) * p.detach(), rtol=0, atol=1e-6)
        for b, be in zip(module.G.buffers(), module.G_ema.buffers()):
            assert torch.equal(b, be)
    # hand schedule for steps 0..8: copy, copy, then 0.9 * (it - 2) / 4, then 0.9
    assert betas == pytest.approx([0.0, 0.0, 0.0, 0.225, 0.45, 0.675, 0.9, 0.9, 0.9])


def test_ema_callback_at_ramp_start_copies():
    """iteration 3 means step 2 was just taken: beta(2) = 0, so G_ema == G (not beta(3) = 0.225)."""
    torch.manual_seed(0)
    module = build(["ema.decay=0.9", "ema.start_iter=2", "ema.rampup_iters=4"])
    cb = EMACallback(0.9, start_iter=2, rampup_iters=4)
    perturb(module.G)
    module.iteration.fill_(3)
    module.g_stepped = True
    cb.on_train_batch_end(None, module, None, None, 0)
    for p, e in zip(module.G.parameters(), module.G_ema.parameters()):
        assert torch.equal(p, e)


def test_ema_callback_skips_d_only_steps():
    torch.manual_seed(0)
    module = build(["ema.decay=0.5"])
    cb = EMACallback(0.5)
    perturb(module.G)
    module.iteration.fill_(5)
    module.g_stepped = False
    before = [p.detach().clone() for p in module.G_ema.parameters()]
    cb.on_train_batch_end(None, module, None, None, 0)
    for b, e in zip(before, module.G_ema.parameters()):
        assert torch.equal(b, e)


def test_ema_callback_without_ema_is_a_no_op():
    module = build(["ema.enabled=false"])
    assert module.G_ema is None
    module.g_stepped = True
    module.iteration.fill_(1)
    EMACallback(0.5).on_train_batch_end(None, module, None, None, 0)
