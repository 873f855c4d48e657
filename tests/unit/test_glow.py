"""Glow layers and model: exact inverses, log-dets against brute-force autograd Jacobians (float64),
ActNorm init semantics, priors, temperature, class conditioning and mixed precision."""
from __future__ import annotations

import copy
import io
import math
import threading

import pytest
import torch
from torch.autograd.functional import jacobian

from models.glow import (FLOWS, ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1,
                         InvConv1x1LU, build_flow, squeeze2d, unsqueeze2d)


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Moves every parameter off its (often zero / identity) init so that no term is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def brute_logdet(fn, x: torch.Tensor) -> float:
    """log|det J| of fn at x (one example), with J from autograd."""
    jac = jacobian(fn, x).reshape(x.numel(), x.numel())
    return float(torch.linalg.slogdet(jac)[1])


def layer_cases():
    torch.manual_seed(0)
    return {
        "actnorm": ActNorm(4),
        "invconv": InvConv1x1(4),
        "invconv_lu": InvConv1x1LU(4),
        "affine": AffineCoupling(4, 8),
        "additive": AdditiveCoupling(4, 8),
        "step_affine_lu": FlowStep(4, 8, "affine", lu=True),
        "step_additive_plain": FlowStep(4, 8, "additive", lu=False),
    }


# ---- squeeze ------------------------------------------------------------------------------------


def test_squeeze_moves_2x2_patches_into_channels():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    s = squeeze2d(x)
    assert s.shape == (2, 12, 2, 3)
    # channel c*4 + 2*dy + dx at (i, j) holds x[c, 2i + dy, 2j + dx]
    assert s[1, 2 * 4 + 2 * 1 + 0, 1, 2] == x[1, 2, 3, 4]
    assert s[0, 0 * 4 + 2 * 0 + 1, 0, 1] == x[0, 0, 0, 3]
    assert torch.equal(unsqueeze2d(s), x)


# ---- per-layer inverse and log-det --------------------------------------------------------------


@pytest.mark.parametrize("name", list(layer_cases()))
def test_layer_inverse_and_logdet_match_brute_force(name):
    layer = layer_cases()[name].double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    for m in layer.modules():  # data-initialise the ActNorms inside, then move every parameter
        if isinstance(m, ActNorm):
            m._init_reduce = lambda t: t
    with torch.no_grad():
        layer(x)
    perturb(layer)
    y, logdet = layer(x)
    assert logdet.shape == (3,)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10, rtol=0)
    for i in range(3):
        expected = brute_logdet(lambda t: layer(t)[0], x[i:i + 1])
        assert abs(float(logdet[i].detach()) - expected) < 1e-8, (name, i, float(logdet[i]), expected)


def test_affine_coupling_is_not_volume_preserving_and_additive_is():
    # Guards the brute-force test above against a degenerate case where every log-det is 0.
    torch.manual_seed(1)
    aff, add = AffineCoupling(4, 8).double(), AdditiveCoupling(4, 8).double()
    perturb(aff)
    perturb(add)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    assert aff(x)[1].abs().min() > 1e-3
    assert torch.equal(add(x)[1], torch.zeros(2, dtype=torch.float64))


def test_affine_coupling_at_init_scales_by_sigmoid_2():
    # zero-initialised last conv: shift 0, scale sigmoid(0 + 2) on every element of the second half
    c = AffineCoupling(4, 8).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, logdet = c(x)
    s = 1.0 / (1.0 + math.exp(-2.0))
    assert torch.allclose(y[:, :2], x[:, :2]) and torch.allclose(y[:, 2:], x[:, 2:] * s)
    assert torch.allclose(logdet, torch.full((2,), 2 * 3 * 3 * math.log(s), dtype=torch.float64))


def test_lu_and_plain_invconv_agree():
    torch.manual_seed(2)
    lu = InvConv1x1LU(6).double()
    perturb(lu)
    plain = InvConv1x1(6).double()
    with torch.no_grad():
        plain.weight.copy_(lu.weight(torch.float64))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    (y1, ld1), (y2, ld2) = lu(x), plain(x)
    assert torch.allclose(y1, y2, atol=1e-12) and torch.allclose(ld1, ld2, atol=1e-10)
    assert torch.allclose(lu.inverse(y1), plain.inverse(y2), atol=1e-12)


def test_invconv_inits_are_orthogonal():
    torch.manual_seed(3)
    for layer in (InvConv1x1(8), InvConv1x1LU(8)):
        w = layer.weight.double() if isinstance(layer, InvConv1x1) else layer.weight(torch.float64)
        assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-6)


# ---- ActNorm init -------------------------------------------------------------------------------


def test_actnorm_init_gives_zero_mean_unit_variance_on_the_init_batch():
    x = torch.randn(16, 3, 5, 5) * torch.tensor([3.0, 0.5, 10.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -2.0, 7.0]).view(1, 3, 1, 1)
    torch.manual_seed(4)
    glow = Glow(3, 8, levels=2, steps=2, hidden=8)
    an = ActNorm(3)
    an._init_reduce = lambda t: t
    y, logdet = an(x)
    assert bool(an.initialized) and an._init_reduce is None
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(logdet, torch.full((16,), 25 * float(an.logs.detach().sum())))
    # Whole model: every ActNorm's output is normalised on the init batch (checked by hooks).
    xs = torch.rand(16, 3, 8, 8) - 0.5
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o[0].detach())) for m in glow.actnorms()]
    glow.initialize_actnorm(xs)
    for h in hooks:
        h.remove()
    assert glow.actnorm_initialized() and len(outs) == len(glow.actnorms()) == 2 * 2 * 3
    for o in outs:
        assert torch.allclose(o.mean(dim=(0, 2, 3)), torch.zeros(o.shape[1]), atol=1e-4)
        assert torch.allclose(o.var(dim=(0, 2, 3), unbiased=False), torch.ones(o.shape[1]), atol=1e-3)


def test_fresh_actnorm_is_identity_and_forward_never_initialises():
    an = ActNorm(2)
    x = torch.randn(4, 2, 3, 3)
    y, logdet = an(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4)) and not bool(an.initialized)


def test_actnorm_init_is_not_rerun_after_load_state_dict():
    torch.manual_seed(5)
    a = Glow(1, 8, levels=2, steps=2, hidden=8)
    a.initialize_actnorm(torch.rand(8, 1, 8, 8) - 0.5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(6)
    b = Glow(1, 8, levels=2, steps=2, hidden=8)
    assert not b.actnorm_initialized()
    b.load_state_dict(torch.load(buf))
    assert b.actnorm_initialized()
    other = 3.0 * torch.rand(8, 1, 8, 8)  # very different moments: a re-init would change the params
    b.initialize_actnorm(other)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    x = torch.rand(4, 1, 8, 8) - 0.5
    assert torch.equal(a.log_prob(x), b.log_prob(x))


def test_distributed_init_with_reduce_fn_matches_the_union_batch():
    """Two 'ranks' (threads) with different data and a barrier all-reduce give identical parameters,
    equal to a single-process init on the union of their batches."""
    torch.manual_seed(7)
    base = Glow(1, 8, levels=2, steps=2, hidden=8).double()
    data = torch.rand(2, 6, 1, 8, 8, dtype=torch.float64) - 0.5
    data[1] = data[1] * 0.3 + 0.1  # rank 1 sees differently distributed data
    ranks = [copy.deepcopy(base) for _ in range(2)]
    barrier, slots = threading.Barrier(2), [None, None]

    def make_reduce(r):
        def reduce_fn(t):
            slots[r] = t.clone()
            barrier.wait()
            out = (slots[0] + slots[1]) / 2
            barrier.wait()  # both have read the slots before the next layer overwrites them
            return out
        return reduce_fn

    threads = [threading.Thread(target=ranks[r].initialize_actnorm, args=(data[r],),
                                kwargs={"reduce_fn": make_reduce(r)}) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    union = copy.deepcopy(base)
    union.initialize_actnorm(torch.cat([data[0], data[1]]))
    for (k, p0), p1, pu in zip(ranks[0].state_dict().items(), ranks[1].state_dict().values(),
                               union.state_dict().values()):
        assert torch.equal(p0, p1), k
        assert torch.allclose(p0.double(), pu.double(), atol=1e-9), k
    single = copy.deepcopy(base)
    single.initialize_actnorm(data[0])
    assert not torch.allclose(single.levels[0].steps[0].actnorm.logs, union.levels[0].steps[0].actnorm.logs)


# ---- whole model --------------------------------------------------------------------------------


def tiny_glow(coupling="affine", lu=True, num_classes=0, seed=0, channels=3, scale=0.1) -> Glow:
    torch.manual_seed(seed)
    g = Glow(channels, 4, levels=2, steps=1, hidden=8, coupling=coupling, lu=lu, num_classes=num_classes).double()
    g.initialize_actnorm(torch.rand(8, channels, 4, 4, dtype=torch.float64) - 0.5,
                         y=torch.arange(8) % num_classes if num_classes else None)
    perturb(g, scale, seed=seed)
    return g


def brute_log_prob(glow: Glow, x: torch.Tensor, y=None) -> float:
    """log p(z) (Gaussians written out here) + log|det dz/dx| of the whole map by autograd."""
    with torch.no_grad():
        latents, priors = glow.encode(x, y, return_priors=True)
    logpz = 0.0
    for z, (mean, logs) in zip(latents, priors):
        logpz += float((-0.5 * math.log(2 * math.pi) - logs - 0.5 * ((z - mean) / logs.exp()) ** 2).sum())
    flat = lambda t: torch.cat([z.flatten() for z in glow.encode(t, y)])  # noqa: E731
    return logpz + brute_logdet(flat, x)


@pytest.mark.parametrize("coupling,lu", [("affine", True), ("affine", False), ("additive", True), ("additive", False)])
def test_glow_log_prob_is_change_of_variables_by_brute_force(coupling, lu):
    glow = tiny_glow(coupling, lu)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5
    lp = glow.log_prob(x)
    for i in range(2):
        expected = brute_log_prob(glow, x[i:i + 1])
        assert abs(float(lp[i].detach()) - expected) < 1e-7, (float(lp[i].detach()), expected)
    latents = glow.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == glow.latent_shapes == [(6, 2, 2), (24, 1, 1)]
    assert torch.allclose(glow.decode(latents), x, atol=1e-10, rtol=0)


def test_glow_float32_round_trip():
    torch.manual_seed(8)
    glow = Glow(1, 8, levels=3, steps=2, hidden=16)
    x = torch.rand(4, 1, 8, 8) - 0.5
    glow.initialize_actnorm(x)
    assert torch.allclose(glow.decode(glow.encode(x)), x, atol=1e-5)
    perturb(glow, 0.05)  # latents up to ~6 with strongly scaled couplings: float32 error grows
    assert torch.allclose(glow.decode(glow.encode(x)), x, atol=2e-4)


def test_fresh_additive_glow_is_a_standard_normal_density():
    # identity ActNorm, zero couplings and priors, orthogonal 1x1 convs: volume and norm preserving
    for lu in (True, False):
        torch.manual_seed(9)
        glow = Glow(3, 8, levels=2, steps=2, hidden=8, coupling="additive", lu=lu).double()
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        expected = -0.5 * (x ** 2).flatten(1).sum(1) - 0.5 * x[0].numel() * math.log(2 * math.pi)
        assert torch.allclose(glow.log_prob(x), expected, atol=1e-9)


def test_temperature_zero_samples_are_the_prior_means_and_temperature_scales_std():
    # a milder perturbation: samples at T=1 must stay where the inverse is well conditioned
    glow = tiny_glow("affine", True, seed=3, scale=0.03)
    x0 = glow.sample(3, temperature=0.0)
    latents, priors = glow.encode(x0, return_priors=True)
    for z, (mean, _) in zip(latents, priors):
        assert mean.abs().max() > 1e-3  # the perturbed priors have non-zero means
        assert torch.allclose(z, mean, atol=1e-9)
    eps = {}
    for t in (1.0, 0.5):
        xs = glow.sample(3, temperature=t, generator=torch.Generator().manual_seed(11))
        zs, ps = glow.encode(xs, return_priors=True)
        eps[t] = torch.cat([((z - m) / logs.exp()).flatten(1) for z, (m, logs) in zip(zs, ps)], 1)
    assert torch.allclose(eps[0.5], 0.5 * eps[1.0], atol=1e-8)
    assert eps[1.0].std() > 0.5


def test_class_conditional_glow():
    glow = tiny_glow("affine", True, num_classes=3, seed=4)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5
    y0, y1 = torch.tensor([0, 0]), torch.tensor([1, 1])
    assert (glow.log_prob(x, y0) - glow.log_prob(x, y1)).abs().min() > 1e-4
    # the class only shifts the top prior: the bijection (hence decode(encode)) is unchanged
    assert torch.equal(glow.encode(x, y0)[0], glow.encode(x, y1)[0])
    assert torch.allclose(glow.decode(glow.encode(x, y1)), x, atol=1e-10)
    assert abs(float(glow.log_prob(x[:1], y1[:1]).detach()) - brute_log_prob(glow, x[:1], y1[:1])) < 1e-7
    logp, logits = glow(x, y0)
    top = glow.encode(x, y0)[-1]
    head = glow.classifier
    expected = (top.mean(dim=(2, 3)) @ head.linear.weight.T + head.linear.bias) * torch.exp(3 * head.logs)
    assert logits.shape == (2, 3) and torch.allclose(logits, expected)
    assert torch.equal(logp, glow.log_prob(x, y0))
    with pytest.raises(ValueError, match="class-conditional"):
        glow.log_prob(x)
    s = glow.sample(2, 0.0, y=torch.tensor([2, 2]))
    assert torch.allclose(glow.encode(s, torch.tensor([2, 2]))[-1],
                          glow.top_params(2, torch.tensor([2, 2]), torch.float64, "cpu")[0], atol=1e-9)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(10)
    glow = Glow(1, 8, levels=2, steps=2, hidden=8)
    x = torch.rand(4, 1, 8, 8) - 0.5
    glow.initialize_actnorm(x)
    perturb(glow, 0.05)
    grads = []
    for ckpt in (False, True):
        glow.zero_grad()
        glow.checkpointing = ckpt
        (-glow.log_prob(x.requires_grad_(True)).mean()).backward()
        grads.append([p.grad.clone() for p in glow.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_runs_only_coupling_convs_in_bf16_and_agrees_with_fp32(fused):
    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvDtypes(TorchDispatchMode):  # the dtype of every convolution torch runs, below autocast
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(12)
    glow = Glow(1, 8, levels=2, steps=2, hidden=16)
    glow.set_fused(fused)
    x = torch.rand(8, 1, 8, 8) - 0.5
    glow.initialize_actnorm(x)
    perturb(glow, 0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16), ConvDtypes() as convs:
        lp16 = glow.log_prob(x)
    lp32 = glow.log_prob(x)
    assert lp16.dtype == torch.float32
    # 2 levels x 2 steps x 3 coupling convs in bf16; in fp32 each step's 1x1 conv (4), the split
    # prior and the top prior.
    assert convs.seen.count(torch.bfloat16) == 2 * 2 * 3 and convs.seen.count(torch.float32) == 4 + 2
    # Stated tolerance: 0.005 bits/dim (bf16 has an 8-bit mantissa; the log-dets stay fp32). Measured
    # 3e-4 here; the difference is non-zero, so bf16 really ran.
    bpd_diff = (lp16 - lp32).abs() / (x[0].numel() * math.log(2))
    assert 0 < bpd_diff.max() < 0.005, bpd_diff


def test_bad_sizes_and_registry():
    with pytest.raises(ValueError, match=r"divisible by 2\^L = 8"):
        Glow(1, 12, levels=3)
    glow = Glow(1, 8, levels=2, steps=1, hidden=4)
    with pytest.raises(ValueError, match="built for inputs"):
        glow.log_prob(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="Unknown coupling"):
        FlowStep(4, 4, "spline")
    assert "glow" in FLOWS
    g = build_flow("glow", channels=1, resolution=8, levels=2, steps=1, hidden=4)
    assert isinstance(g, Glow) and g.latent_shapes == [(2, 4, 4), (8, 2, 2)]
    with pytest.raises(KeyError, match="Valid flow models: glow"):
        build_flow("realnvp")


def test_interpolation_reuses_every_latent_and_hits_the_endpoints():
    glow = tiny_glow("affine", True, seed=5, scale=0.03)
    xa, xb = (torch.rand(1, 3, 4, 4, dtype=torch.float64) - 0.5 for _ in range(2))
    out = glow.interpolate(xa, xb, torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, 3, 4, 4)
    assert torch.allclose(out[0], xa[0], atol=1e-10) and torch.allclose(out[2], xb[0], atol=1e-10)
    mid = [(a + b) / 2 for a, b in zip(glow.encode(xa), glow.encode(xb))]
    assert torch.allclose(out[1], glow.decode(mid)[0], atol=1e-12)
    cond = tiny_glow("additive", False, num_classes=3, seed=6, scale=0.03)
    out = cond.interpolate(xa, xb, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], xa[0], atol=1e-10) and torch.allclose(out[1], xb[0], atol=1e-10)


def test_sampling_from_given_noise_uses_it_scaled_by_temperature():
    glow = tiny_glow("affine", True, seed=7, scale=0.03)
    eps = torch.randn(2, glow.n_dims, dtype=torch.float64)
    assert sum(math.prod(s) for s in glow.latent_shapes) == glow.n_dims == 48
    x = glow.sample(2, temperature=0.6, eps=eps)
    zs, ps = glow.encode(x, return_priors=True)
    got = torch.cat([((z - m) / logs.exp()).flatten(1) for z, (m, logs) in zip(zs, ps)], 1)
    assert torch.allclose(got, 0.6 * eps, atol=1e-9)


# ---- LU weights assembled once per level --------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lu_weights_are_assembled_once_per_level_and_match_the_layers(monkeypatch, checkpointing):
    """The level assembles every step's W = P L U in one batched pass (also when gradient checkpointing
    recomputes the steps); values and parameter gradients equal the per-layer assembly's."""
    import models.glow as glow_mod

    torch.manual_seed(0)
    g = Glow(1, 8, levels=2, steps=3, hidden=8).double()
    perturb(g)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5

    def grads_of(model):
        model.zero_grad(set_to_none=True)
        model.log_prob(x).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    per_layer = copy.deepcopy(g)
    for level in per_layer.levels:  # the old path: each step builds its own W in its forward
        level.conv_weights = lambda h, n=len(level.steps): [(None, None, None)] * n
    calls = {"level": 0, "layer": 0}
    real_lu, real_weight = glow_mod.lu_weights, InvConv1x1LU.weight
    monkeypatch.setattr(glow_mod, "lu_weights", lambda *a: (calls.__setitem__("level", calls["level"] + 1),
                                                             real_lu(*a))[1])
    monkeypatch.setattr(InvConv1x1LU, "weight", lambda self, *a: (calls.__setitem__("layer", calls["layer"] + 1),
                                                                   real_weight(self, *a))[1])
    g.checkpointing = checkpointing
    batched = grads_of(g)
    assert calls == {"level": 2, "layer": 0}  # two levels, no per-layer rebuild (not even in recomputation)
    calls.update(level=0, layer=0)
    reference = grads_of(per_layer)
    assert calls == {"level": 0, "layer": 6}
    torch.testing.assert_close(g.log_prob(x), per_layer.log_prob(x), rtol=1e-12, atol=1e-10)
    assert batched.keys() == reference.keys() and any(".lower" in n for n in batched)
    for n in batched:
        torch.testing.assert_close(batched[n], reference[n], rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


# ---- ActNorm and the zero convs' scales folded into the convolutions (flow.fused) ---------------


def _fused_pair(coupling: str, lu: bool, seed: int = 0):
    """The same initialised and perturbed float64 Glow twice: fused (the default) and separate layers."""
    torch.manual_seed(seed)
    fused = Glow(2, 8, levels=2, steps=2, hidden=8, coupling=coupling, lu=lu).double()
    x = torch.rand(6, 2, 8, 8, dtype=torch.float64) - 0.5
    separate = copy.deepcopy(fused)
    separate.set_fused(False)
    fused.initialize_actnorm(x)
    separate.initialize_actnorm(x)
    # ActNorm's data-dependent init runs the layers separately in both: identical parameters
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), separate.state_dict().values()))
    perturb(fused, 0.03, seed)
    separate.load_state_dict(fused.state_dict())
    return fused, separate, x


@pytest.mark.parametrize("coupling,lu,checkpointing", [("affine", True, False), ("affine", False, False),
                                                       ("additive", True, False), ("affine", True, True)])
def test_fused_glow_is_the_same_function_with_the_same_gradients(coupling, lu, checkpointing):
    fused, separate, x = _fused_pair(coupling, lu)
    assert fused.levels[0].fused and not separate.levels[0].fused

    def run(model):
        model.checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        lp = model.log_prob(x)
        lp.sum().backward()
        return lp.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (lp_f, g_f), (lp_s, g_s) = run(fused), run(separate)
    torch.testing.assert_close(lp_f, lp_s, rtol=1e-12, atol=1e-10)
    assert g_f.keys() == g_s.keys() and any("actnorm.logs" in n for n in g_f) and any("net.0.norm" in n for n in g_f)
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_s[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{n}: {m}")
    # the inverse (sampling) runs the coupling networks fused too: exact round trip and the same samples
    zs = fused.encode(x)
    torch.testing.assert_close(fused.decode(zs), x, rtol=0, atol=1e-10)
    eps = torch.randn(3, fused.n_dims, dtype=torch.float64)
    torch.testing.assert_close(fused.sample(3, 0.7, eps=eps), separate.sample(3, 0.7, eps=eps), rtol=0, atol=1e-10)


def _initialised_glow(fused: bool, steps: int, hidden: int, n: int):
    """A fresh 3 x 16 x 16, two-level Glow, fused or not, ActNorm-initialised on n random images."""
    torch.manual_seed(0)
    glow = Glow(3, 16, levels=2, steps=steps, hidden=hidden)
    glow.set_fused(fused)
    x = torch.rand(n, 3, 16, 16) - 0.5
    glow.initialize_actnorm(x)
    return glow, x


@pytest.mark.parametrize("amp,at_most", [(False, 0.6), (True, 0.35)])
def test_fused_glow_keeps_far_fewer_activations_for_backward(amp, at_most):
    """Bytes autograd keeps per extra example (parameters and buffers excluded), counted with saved-tensor
    hooks. Folding drops the conv outputs that ActNorm's and the zero conv's backward kept, and under
    autocast the coupling networks' activations stay bf16 (ActNorm's fp32 output went). Measured here
    0.557 (fp32) and 0.319 (bf16) of the separate layers'; for glow_cifar10 (width 512) 87.4 -> 44.7 MB
    per image in fp32 and 107.5 -> 23.2 MB in bf16."""

    def saved_bytes(glow, x):
        own = {t.untyped_storage().data_ptr() for t in [*glow.parameters(), *glow.buffers()]}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            glow.log_prob(x)
        return sum(seen.values())

    per_example = {}
    for fused in (True, False):
        glow, x = _initialised_glow(fused, steps=2, hidden=64, n=8)
        per_example[fused] = (saved_bytes(glow, x[:6]) - saved_bytes(glow, x[:2])) / 4
    assert per_example[False] > 0
    assert per_example[True] < at_most * per_example[False], per_example


def test_fused_glow_folds_each_level_in_batched_ops():
    """Ops per forward and backward (aten ops below autograd, views excluded: about one kernel each on
    a GPU). The level folds all its steps' layers together, so the folding costs a few ops per level and
    the ops it saves grow with the step count. Measured here 795 fused against 1,361 separate at K=8
    (0.58); for glow_cifar10's shape (K=32, L=3) 3,499 against 7,588."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("detach", "alias", "_unsafe_view", "lift_fresh"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    ops = {}
    for fused in (True, False):
        glow, x = _initialised_glow(fused, steps=8, hidden=16, n=4)
        with Ops() as count:
            glow.log_prob(x).sum().backward()
        ops[fused] = count.n
    assert ops[True] < 0.7 * ops[False], ops


def test_class_prior_shifts_the_learned_top_prior():
    """Class-conditional Glow: the top prior's (mean, log-scale) = learn-top conv output + a linear map
    of the one-hot label, both in play (replacing one with the other would leave parameters dead)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    g = Glow(1, 4, levels=1, steps=1, hidden=4, num_classes=3).double()
    with torch.no_grad():
        for p in list(g.top_prior.parameters()) + list(g.class_prior.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    y, c = torch.tensor([0, 2]), g.top_shape[0]
    h = g.top_prior(torch.zeros(2, 2 * c, *g.top_shape[1:], dtype=torch.float64))
    h = h + g.class_prior(F.one_hot(y, 3).double())[:, :, None, None]
    mean, logs = g.top_params(2, y, torch.float64, "cpu")
    torch.testing.assert_close(mean, h[:, :c])
    torch.testing.assert_close(logs, h[:, c:])
