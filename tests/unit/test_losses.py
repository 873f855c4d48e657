"""GAN objectives, gradient penalty, weight clipping and drift penalty against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from models.dcgan import DCGANDiscriminator
from trainer.losses import (LOSSES, clip_weights, drift_penalty, get_loss, gradient_penalty, hinge_d, hinge_g,
                            ns_d, ns_g, wgan_d, wgan_g)

REAL = torch.tensor([1.0, -2.0, 0.5])
FAKE = torch.tensor([-1.0, 0.0, 3.0])


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def close(t: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert t.dim() == 0, f"loss must be a scalar, got shape {tuple(t.shape)}"
    v = float(t.detach())
    assert abs(v - expected) <= tol, f"{v} != {expected}"


# ---- objectives --------------------------------------------------------------------------------


def test_registry_contents_and_flags():
    assert set(LOSSES) == {"nonsaturating", "hinge", "wgan", "wgan_gp"}
    assert (LOSSES["nonsaturating"].uses_gp, LOSSES["nonsaturating"].clips_weights) == (False, False)
    assert (LOSSES["hinge"].uses_gp, LOSSES["hinge"].clips_weights) == (False, False)
    assert (LOSSES["wgan"].uses_gp, LOSSES["wgan"].clips_weights) == (False, True)
    assert (LOSSES["wgan_gp"].uses_gp, LOSSES["wgan_gp"].clips_weights) == (True, False)
    assert get_loss("wgan_gp").d is wgan_d and get_loss("wgan_gp").g is wgan_g


def test_nonsaturating_d_by_hand():
    # softplus(-real) = -log sigmoid(real); softplus(fake) = -log(1 - sigmoid(fake))
    exp_real = (softplus(-1.0) + softplus(2.0) + softplus(-0.5)) / 3
    exp_fake = (softplus(-1.0) + softplus(0.0) + softplus(3.0)) / 3
    close(ns_d(REAL, FAKE), exp_real + exp_fake)
    close(LOSSES["nonsaturating"].d(REAL, FAKE), exp_real + exp_fake)


def test_nonsaturating_d_matches_log_sigmoid_definition():
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = (-sum(math.log(sig(r)) for r in REAL.tolist()) / 3
                - sum(math.log(1.0 - sig(f)) for f in FAKE.tolist()) / 3)
    close(ns_d(REAL, FAKE), expected, 1e-5)


def test_nonsaturating_g_by_hand():
    expected = (softplus(1.0) + math.log(2.0) + softplus(-3.0)) / 3  # -log sigmoid(fake)
    close(ns_g(FAKE), expected)
    close(LOSSES["nonsaturating"].g(FAKE), expected)


def test_nonsaturating_is_stable_for_large_logits():
    big = torch.tensor([100.0, 80.0])
    close(ns_d(big, -big), 0.0, 1e-12)  # a perfect D: log(1 + e^-100) ~ 0, no inf/nan
    close(ns_g(-big), 90.0, 1e-4)  # softplus(100) = 100, softplus(80) = 80


def test_hinge_by_hand():
    # relu(1 - real) = [0, 3, 0.5]; relu(1 + fake) = [0, 1, 4]
    close(hinge_d(REAL, FAKE), 3.5 / 3 + 5.0 / 3)
    close(LOSSES["hinge"].d(REAL, FAKE), 8.5 / 3)
    close(hinge_g(FAKE), -2.0 / 3)
    close(LOSSES["hinge"].g(FAKE), -2.0 / 3)


def test_wgan_by_hand():
    # mean(fake) = 2/3, mean(real) = -1/6
    for name in ("wgan", "wgan_gp"):
        close(LOSSES[name].d(REAL, FAKE), 2.0 / 3 + 1.0 / 6)
        close(LOSSES[name].g(FAKE), -2.0 / 3)


def test_losses_are_means_not_sums():
    real2, fake2 = REAL.repeat(2), FAKE.repeat(2)
    for name, loss in LOSSES.items():
        close(loss.d(real2, fake2), float(loss.d(REAL, FAKE)))
        close(loss.g(fake2), float(loss.g(FAKE)))


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(KeyError) as ei:
        get_loss("wgan-gp")
    msg = str(ei.value)
    assert "wgan-gp" in msg
    for name in ("hinge", "nonsaturating", "wgan", "wgan_gp"):
        assert name in msg


def test_unknown_model_names_the_valid_ones():
    from models.registry import build_gan

    with pytest.raises(KeyError, match="dcgan"):
        build_gan("stylegan9")


# ---- gradient penalty --------------------------------------------------------------------------


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: grad_x D = w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1)


def quadratic_critic(x):
    """D(x) = 0.5 ||x||^2 per sample: grad_x D = x."""
    return 0.5 * x.flatten(1).pow(2).sum(1)


def test_gp_linear_critic_closed_form():
    critic = LinearCritic([1.0, 2.0, 2.0, 4.0])  # ||w|| = 5 -> GP = (5 - 1)^2 = 16 at every x_hat
    torch.manual_seed(0)
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    for eps in (torch.rand(6), torch.zeros(6), torch.ones(6)):
        close(gradient_penalty(critic, real, fake, eps), 16.0, 1e-5)


def test_gp_unit_norm_linear_critic_is_zero():
    critic = LinearCritic([0.6, 0.8])
    real, fake = torch.randn(3, 2), torch.randn(3, 2)
    close(gradient_penalty(critic, real, fake, torch.rand(3)), 0.0, 1e-10)


def test_gp_quadratic_critic_closed_form():
    real = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    fake = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    eps = torch.tensor([0.5, 0.25, 0.9])
    # x_hat = eps*real + (1-eps)*fake = [1.5, 2], [-0.5, 0], [0, 2]; norms 2.5, 0.5, 2
    # (norm - 1)^2 = 2.25, 0.25, 1.0; mean = 3.5 / 3
    close(gradient_penalty(quadratic_critic, real, fake, eps), 3.5 / 3)


def test_gp_interpolates_with_eps_on_real():
    real = torch.tensor([[3.0, 4.0]])
    fake = torch.tensor([[0.0, 0.0]])
    close(gradient_penalty(quadratic_critic, real, fake, torch.ones(1)), 16.0)  # x_hat = real: (5-1)^2
    close(gradient_penalty(quadratic_critic, real, fake, torch.zeros(1)), 1.0)  # x_hat = fake: (0-1)^2
    close(gradient_penalty(quadratic_critic, real, fake, torch.tensor([0.2])), 0.0)  # norm 1


def test_gp_image_shaped_inputs_use_per_sample_norm():
    # (N, C, H, W): the norm is over all of C*H*W per sample
    real = torch.full((2, 2, 2, 2), 1.0)  # ||x|| = sqrt(8)
    fake = torch.zeros(2, 2, 2, 2)
    eps = torch.tensor([1.0, 0.5])  # norms sqrt(8), sqrt(8)/2 = sqrt(2)
    expected = ((math.sqrt(8) - 1) ** 2 + (math.sqrt(2) - 1) ** 2) / 2
    close(gradient_penalty(quadratic_critic, real, fake, eps), expected, 1e-5)


def test_gp_is_a_mean_over_the_batch():
    torch.manual_seed(1)
    real, fake, eps = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    one = gradient_penalty(quadratic_critic, real, fake, eps)
    two = gradient_penalty(quadratic_critic, torch.cat([real, real]), torch.cat([fake, fake]), torch.cat([eps, eps]))
    close(two, float(one.detach()), 1e-6)


def test_gp_gradients_reach_critic_params_with_closed_form():
    critic = LinearCritic([1.0, 2.0, 2.0, 4.0])
    real, fake = torch.randn(5, 4), torch.randn(5, 4, requires_grad=True)
    gp = gradient_penalty(critic, real, fake, torch.rand(5))
    gp.backward()
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 2 * 4 * w / 5
    expected = torch.tensor([1.0, 2.0, 2.0, 4.0]) * 8.0 / 5.0
    assert critic.w.grad is not None
    torch.testing.assert_close(critic.w.grad, expected, rtol=0, atol=1e-5)
    assert fake.grad is None  # fakes are detached: no gradient into G through the penalty


def test_gp_does_not_backpropagate_into_the_generator():
    a = nn.Parameter(torch.tensor(2.0))
    critic = lambda x: 0.5 * a * x.flatten(1).pow(2).sum(1)  # noqa: E731  grad_x = a * x_hat
    real = torch.tensor([[3.0, 4.0]])
    fake = torch.tensor([[1.0, 0.0]], requires_grad=True)
    gp = gradient_penalty(critic, real, fake, torch.tensor([0.5]))
    # x_hat = [2, 2], ||a x_hat|| = 2 * sqrt(8) -> GP = (4 sqrt(2) - 1)^2
    close(gp, (4 * math.sqrt(2) - 1) ** 2, 1e-4)
    gp.backward()
    assert fake.grad is None  # the penalty trains D only
    # d/da (a sqrt(8) - 1)^2 = 2 (a sqrt(8) - 1) sqrt(8)
    assert abs(float(a.grad) - 2 * (2 * math.sqrt(8) - 1) * math.sqrt(8)) < 1e-4


def test_gp_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.rand(4)
    # reference: the definition, written out in fp32 with no autocast anywhere
    x_hat = (eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
    ref = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert abs(float(gradient_penalty(critic, real, fake, eps).detach()) - float(ref)) <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic(real).dtype == torch.bfloat16  # autocast is really active for this critic
        amp = gradient_penalty(critic, real, fake, eps)
    assert amp.dtype == torch.float32
    # in bf16 the same penalty is off by ~5e-4 here; fp32 agrees to rounding
    assert abs(float(amp.detach()) - float(ref.detach())) <= 1e-6


def test_gp_autocast_runs_the_critic_in_bf16_and_stays_close():
    """loss.gp_autocast: under the caller's bf16 autocast the critic's convolutions run in bf16 (they do
    not by default), the penalty comes out fp32 and within bf16 rounding of the fp32 penalty."""
    torch.manual_seed(0)
    critic = DCGANDiscriminator(width=8, resolution=16, channels=1, norm="layer")
    seen = []
    critic.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    real, fake, eps = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.rand(8)
    ref = gradient_penalty(critic, real, fake, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_inside = gradient_penalty(critic, real, fake, eps)
        amp = gradient_penalty(critic, real, fake, eps, autocast=True)
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    assert amp.dtype == torch.float32 and float(ref) > 0.1
    assert abs(float(fp32_inside) - float(ref)) <= 1e-6 * float(ref)
    assert 0 < abs(float(amp) - float(ref)) <= 0.02 * float(ref)


def test_gp_accepts_low_precision_inputs():
    critic = LinearCritic([3.0, 4.0])
    real = torch.randn(3, 2).to(torch.bfloat16)
    fake = torch.randn(3, 2).to(torch.bfloat16)
    gp = gradient_penalty(critic, real, fake, torch.rand(3).to(torch.bfloat16))
    assert gp.dtype == torch.float32
    close(gp, 16.0, 1e-5)


def _double_backward_gp(critic, real, fake, eps):
    """The penalty as WGAN-GP's reference code writes it: autograd.grad with create_graph=True."""
    e = eps.view(-1, 1, 1, 1)
    x_hat = (e * real + (1 - e) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@pytest.mark.parametrize("critic_name", ["dcgan_layer_norm", "pgan_fade"])
def test_gp_parameter_gradients_equal_the_autograd_double_backward(critic_name):
    """The vjp form gives the reference's value and the same gradient for every critic weight, on
    critics whose input gradient mixes samples (minibatch stddev) or normalises over them (layer norm)."""
    from models.pgan import PGANDiscriminator

    torch.manual_seed(0)
    if critic_name == "dcgan_layer_norm":
        D = DCGANDiscriminator(width=8, resolution=16, channels=1, norm="layer")
        critic = D
    else:
        D = PGANDiscriminator(16, 1, fmap_base=32, fmap_max=8)
        critic = lambda x: D(x, 2, 0.3)  # noqa: E731  the fade-in branch: both from-RGB layers in play
    real, fake, eps = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.rand(8)
    grads = []
    for fn in (_double_backward_gp, gradient_penalty):
        D.zero_grad(set_to_none=True)
        value = fn(critic, real, fake, eps)
        value.backward()
        grads.append((value.detach(), {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}))
    (ref, g_ref), (got, g_got) = grads
    assert float(ref) > 0.1  # a penalty far from zero, so the gradients are not trivially small
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert g_got.keys() == g_ref.keys() and len(g_ref) >= 6
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("critic_name", ["dcgan_layer_norm", "pgan"])
def test_gp_with_fp16_critic_weights_matches_fp32(critic_name):
    """DeepSpeed's fp16 engines hold D in fp16, so the penalty differentiates an fp16 critic twice. With
    wgan_gp_mnist5k's critic at DCGAN's init on noise-like inputs (activations of std 0.009 before the
    layer norm) group norm's double backward (a composite formula, run in the input's dtype) overflowed in fp16 and every penalty was NaN; the layer norm now computes in
    fp32. The penalty and every weight's gradient must agree with the fp32 critic's to fp16 rounding."""
    import copy

    from models.dcgan import dcgan_init
    from models.pgan import PGANDiscriminator

    torch.manual_seed(0)
    if critic_name == "dcgan_layer_norm":
        D = DCGANDiscriminator(width=16, resolution=32, channels=1, norm="layer")
        dcgan_init(D)
        call = lambda net: net  # noqa: E731
    else:
        D = PGANDiscriminator(32, 1, fmap_base=64, fmap_max=16)
        call = lambda net: (lambda x: net(x, 3))  # noqa: E731
    D16 = copy.deepcopy(D).half()
    real, fake, eps = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 1, 32, 32).clamp(-1, 1), torch.rand(16)
    out = []
    for net, dtype in ((D, torch.float32), (D16, torch.float16)):
        value = gradient_penalty(call(net), real, fake, eps, dtype)
        value.backward()
        out.append((value.detach(), [p.grad.float() for p in net.parameters() if p.grad is not None]))
    (ref, g_ref), (got, g_got) = out
    assert torch.isfinite(got) and float(ref) > 1e-3
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    assert len(g_got) == len(g_ref) >= 6
    # The whole gradient within 2% (fp16 rounding: the weights' parts agree to about 1%; the biases',
    # a thousandth of their size, are sums that mostly cancel and differ by up to 40%).
    a, b = torch.cat([g.flatten() for g in g_got]), torch.cat([g.flatten() for g in g_ref])
    assert torch.isfinite(a).all() and float((a - b).norm()) <= 0.02 * float(b.norm())


# ---- weight clipping and drift -----------------------------------------------------------------


def test_clip_weights_on_dcgan_discriminator():
    torch.manual_seed(0)
    D = DCGANDiscriminator(width=8, resolution=16, channels=1, norm="layer")
    with torch.no_grad():
        for p in D.parameters():
            p.copy_(torch.randn_like(p) * 0.05)  # ~84% of the entries outside [-0.01, 0.01]
    before = [p.detach().clone() for p in D.parameters()]
    c = 0.01
    clip_weights(D, c)
    n_inside = n_outside = 0
    for old, p in zip(before, D.parameters()):
        assert p.min() >= -c and p.max() <= c
        inside = old.abs() <= c
        n_inside += int(inside.sum())
        n_outside += int((~inside).sum())
        assert torch.equal(p[inside], old[inside])
        assert torch.equal(p[old > c], torch.full_like(p[old > c], c))
        assert torch.equal(p[old < -c], torch.full_like(p[old < -c], -c))
    assert n_inside > 0 and n_outside > 0


def test_clip_weights_leaves_no_autograd_history():
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.mul_(100)
    clip_weights(lin, 0.5)
    assert lin.weight.is_leaf and lin.weight.grad_fn is None
    assert float(lin.weight.detach().abs().max()) <= 0.5


def test_drift_penalty_value():
    close(drift_penalty(REAL), (1.0 + 4.0 + 0.25) / 3)  # mean(D(x)^2) = 1.75
    out = drift_penalty(REAL.to(torch.bfloat16))
    assert out.dtype == torch.float32
    close(out, 1.75)
