"""GANModule phases without a Trainer: gradient accumulation equivalence (BN-free), class labels
reaching G and D of a conditional model, DCGAN untouched, the orthogonal regulariser in G's step,
and the class-count check at build time."""
from __future__ import annotations

import pytest
import torch

from trainer.build import build_module, resolve_num_classes
from trainer.config import ConfigError, load_config
from trainer.gan_module import GANModule
from trainer.losses import ortho_params, ortho_reg


def module(experiment: str, *overrides: str, num_classes: int = 10) -> GANModule:
    cfg = load_config(experiment, ["logging.wandb=false", *overrides])
    m = build_module(cfg, channels=1, num_classes=num_classes)
    m.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
    return m


def pooled(m: GANModule, n_max: int, seed: int = 0) -> None:
    """Latents and penalty mixes from fixed pools, consumed in order: k micro-batches of b and one batch
    of k*b then see exactly the same samples (torch.randn(k*b) is not k draws of randn(b))."""
    g = torch.Generator().manual_seed(seed)
    z, mix = torch.randn(n_max, m.z_dim, generator=g), torch.rand(n_max, generator=g)
    pos = {"z": 0, "mix": 0}

    def take(pool, key, n):
        out = pool[pos[key]: pos[key] + n]
        pos[key] += n
        return out

    m.sample_latents = lambda n, gen: take(z, "z", n)
    m.sample_mix = lambda n, gen: take(mix, "mix", n)


def one_update(accum: int, loss: str, *extra: str) -> tuple:
    torch.manual_seed(0)
    m = module("gan_digits", "model.g_norm=none", "model.d_norm=layer" if loss == "wgan_gp" else "model.d_norm=none",
               f"loss.name={loss}", f"optim.accumulate={accum}", "data.batch_size=12", "model.g_width=8",
               "model.d_width=8", "model.z_dim=8", *extra)
    pooled(m, 64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt_g = torch.optim.SGD(m.G.parameters(), lr=1.0)
    opt_d = torch.optim.SGD(m.D.parameters(), lr=1.0)
    real = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gen = torch.Generator().manual_seed(2)
    stats = m.d_step(real, gen, opt_d)
    m.g_step(12, gen, opt_g)
    deltas = {k: v - before[k] for k, v in m.state_dict().items() if v.is_floating_point()}
    return deltas, {k: float(v) for k, v in stats.items()}


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating", "wgan_gp"])
def test_accumulation_equals_one_large_batch(loss):
    """BN-free networks: 3 micro-batches of 4 give the same D and G updates as one batch of 12, and the
    same logged D statistics (each a mean over the 12 samples, not a sum over micro-batches)."""
    (big, big_stats), (micro, micro_stats) = one_update(1, loss), one_update(3, loss)
    assert any(float(v.abs().max()) > 1e-4 for k, v in big.items() if k.startswith("D."))
    assert any(float(v.abs().max()) > 1e-4 for k, v in big.items() if k.startswith("G."))
    for k in big:
        torch.testing.assert_close(micro[k], big[k], rtol=1e-4, atol=1e-6, msg=lambda s: f"{k}: {s}")
    assert big_stats.keys() == micro_stats.keys() >= {"d/real", "d/fake", "d/loss"}
    for k in big_stats:
        assert micro_stats[k] == pytest.approx(big_stats[k], rel=1e-4, abs=1e-6), k


def tiny_biggan(*extra: str) -> GANModule:
    return module("biggan_mnist5k", "model.g_width=4", "model.d_width=4", "model.shared_dim=8",
                  "data.batch_size=8", *extra)


def record_calls(net: torch.nn.Module) -> list:
    calls = []
    orig = net.forward

    def forward(x, y=None):
        calls.append(None if y is None else y.clone())
        return orig(x, y)
    net.forward = forward
    return calls


def test_conditional_labels_reach_g_and_d():
    torch.manual_seed(0)
    m = tiny_biggan()
    assert m.num_classes == 10
    g_calls, d_calls = record_calls(m.G), record_calls(m.D)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    opt_g, opt_d = (torch.optim.SGD(n.parameters(), lr=0.0) for n in (m.G, m.D))
    m.d_step(real, torch.Generator().manual_seed(5), opt_d, labels)
    (y_fake,), (y_d,) = g_calls, d_calls
    assert torch.equal(y_d[:8], labels) and torch.equal(y_d[8:], y_fake)  # real first, then the fakes'
    assert y_fake.min() >= 0 and y_fake.max() < 10
    # the fake labels come from the step's generator: the same seed gives the same labels
    m.d_step(real, torch.Generator().manual_seed(5), opt_d, labels)
    assert torch.equal(g_calls[1], y_fake)
    m.g_step(8, torch.Generator().manual_seed(6), opt_g)
    assert torch.equal(g_calls[2], d_calls[2]) and g_calls[2].shape == (8,)
    # sample grids: classes cycle over the grid
    img = m.generate(torch.randn(12, m.z_dim), use_ema=False)
    assert img.shape == (12, 1, 32, 32) and torch.equal(g_calls[-1], torch.arange(12) % 10)


def test_uniform_fake_labels_cover_all_classes():
    m = tiny_biggan()
    y = m.sample_labels(5000, torch.Generator().manual_seed(0))
    counts = torch.bincount(y, minlength=10).float()
    assert counts.min() > 400 and counts.max() < 600  # 500 each expected


def test_dcgan_gets_no_labels_and_draws_none():
    m = module("gan_digits", "model.g_width=8", "model.d_width=8", "model.z_dim=8")
    assert m.num_classes == 0 and m.sample_labels(4, torch.Generator()) is None
    calls = []
    orig = m.D.forward
    m.D.forward = lambda *a: calls.append(len(a)) or orig(*a)
    opt = torch.optim.SGD(m.D.parameters(), lr=0.0)
    m.d_step(torch.rand(8, 1, 16, 16), torch.Generator().manual_seed(0), opt, None)
    assert calls == [1, 1]  # reals, then fakes (D has BatchNorm), each without labels


def test_class_conditional_false_trains_unconditionally():
    m = tiny_biggan("model.class_conditional=false")
    assert m.num_classes == 0 and m.G.shared is None and m.D.embed is None


def test_ortho_reg_enters_the_g_step_once():
    """g/loss with the regulariser minus g/loss without it is the regulariser itself (not accum times it)."""
    def g_loss(beta: float, accum: int):
        torch.manual_seed(0)
        m = tiny_biggan(f"loss.ortho_reg={beta}", f"optim.accumulate={accum}")
        opt = torch.optim.SGD(m.G.parameters(), lr=0.0)
        stats = m.g_step(8, torch.Generator().manual_seed(1), opt)
        return stats, m
    for accum in (1, 2):
        with_reg, m = g_loss(1e-2, accum)
        without, _ = g_loss(0.0, accum)
        assert "g/ortho" not in without
        expected = float(ortho_reg(ortho_params(m.G), 1e-2))
        assert float(with_reg["g/ortho"]) == pytest.approx(expected, rel=1e-5) and expected > 0
        assert float(with_reg["g/loss"] - without["g/loss"]) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_class_count_mismatch_is_caught_at_build():
    cfg = load_config("biggan_mnist5k", ["logging.wandb=false", "model.num_classes=5"])
    with pytest.raises(ConfigError, match=r"model.num_classes=5 .* has 10 classes"):
        build_module(cfg, channels=1, num_classes=10)
    cfg = load_config("biggan_mnist5k", ["logging.wandb=false"])
    assert resolve_num_classes(cfg, 10) == 10 and cfg.model.num_classes == 10  # recorded for resumes
    assert resolve_num_classes(cfg, 10) == 10


def test_unsupported_resolution_is_a_config_error():
    cfg = load_config("biggan_mnist5k", ["logging.wandb=false", "data.resolution=48"])
    with pytest.raises(ConfigError, match="32, 64, 128, 256, 512"):
        build_module(cfg, channels=1, num_classes=10)


def test_a_batchnorm_critic_scores_fakes_as_in_the_g_step():
    """A D with BatchNorm (the DCGAN critic) scores reals and fakes in separate calls, as the DCGAN and
    WGAN reference code do: the fakes' scores in D's step equal D on the fakes alone (what G's step
    differentiates) and do not depend on the reals beside them. A D without BatchNorm (BigGAN's) keeps
    the reference's one call, so spectral norm's power iteration runs once per step."""
    torch.manual_seed(0)
    m = module("gan_digits", "model.g_width=8", "model.d_width=8", "model.z_dim=8", "model.d_norm=batch")
    assert m._d_batchnorm
    g = torch.Generator().manual_seed(1)
    fake, real_a, real_b = (torch.rand(8, 1, 16, 16, generator=g) * 2 - 1 for _ in range(3))
    real_b = real_b * 0.2 + 0.5  # other statistics than real_a
    alone = m._d(fake, None).float()
    for real in (real_a, real_b):
        s_real, s_fake = m._d_real_fake(real, fake, None, None)
        torch.testing.assert_close(s_fake, alone, rtol=0, atol=0)
        torch.testing.assert_close(s_real, m._d(real, None).float(), rtol=0, atol=0)
    # the joint call would have mixed the statistics: the fakes' scores then differ with the reals
    joint = m._d(torch.cat([real_b, fake]), None).float()[8:]
    assert float((joint - alone).abs().max()) > 1e-3

    b = module("biggan_mnist5k", "model.g_width=4", "model.d_width=4", "model.z_dim=20", "model.shared_dim=8",
               "model.attention_res=0")
    assert not b._d_batchnorm
    calls = []
    b.D.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    y = torch.arange(8) % 10
    b._d_real_fake(torch.rand(8, 1, 32, 32), torch.rand(8, 1, 32, 32), y, y)
    assert calls == [16]


def test_every_batch_must_split_into_processes_times_micro_batches():
    """2 ranks x optim.accumulate: a per-rank batch that does not split into accumulate equal parts is
    refused before training (the module would otherwise scale D's gradient down or drop G's samples)."""
    from trainer.build import _check_per_rank_batches
    from trainer.gan_module import check_micro_batches

    cfg = load_config("gan_digits", ["data.batch_size=12", "optim.accumulate=4"])
    _check_per_rank_batches(cfg, 1)
    with pytest.raises(ConfigError, match=r"Batch size 12 does not split into 2 process\(es\) x optim.accumulate=4"):
        _check_per_rank_batches(cfg, 2)
    pgan = load_config("pgan_mnist5k", ["optim.accumulate=2", "pgan.batch_sizes=[32,32,32,6]"])
    with pytest.raises(ConfigError, match="Batch size 6"):
        _check_per_rank_batches(pgan, 2)
    assert check_micro_batches(8, 4) == 2
    with pytest.raises(ConfigError, match="does not split into optim.accumulate=4"):
        check_micro_batches(6, 4)


def _tiny_critic_module(*overrides: str) -> GANModule:
    torch.manual_seed(0)
    return module("gan_digits", "loss.name=wgan_gp", "model.d_norm=layer", "model.g_norm=none", "data.batch_size=8",
                  "model.g_width=8", "model.d_width=8", "model.z_dim=8", *overrides)


REALS = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _d_losses(*overrides: str) -> dict:
    """One D step of a tiny WGAN-GP critic at lr 0 from fixed latents, mixes and reals."""
    m = _tiny_critic_module(*overrides)
    pooled(m, 64)
    return m.d_step(REALS, torch.Generator().manual_seed(2), torch.optim.SGD(m.D.parameters(), lr=0.0))


def test_d_loss_adds_the_penalty_times_gp_weight():
    """d/loss = wasserstein + gp_weight * gp: changing loss.gp_weight from 0 to 10 changes d/loss by
    exactly 10 * d/gp (the same critic, reals, fakes and mixes)."""
    off, on = _d_losses("loss.gp_weight=0"), _d_losses("loss.gp_weight=10")
    assert float(on["d/gp"]) > 1e-3 and float(on["d/gp"]) == pytest.approx(float(off["d/gp"]), rel=1e-6)
    assert float(on["d/loss"] - off["d/loss"]) == pytest.approx(10.0 * float(on["d/gp"]), rel=1e-5)


def test_drift_penalty_is_on_the_real_scores():
    """Progressive GAN's drift term: loss.drift * mean(D(real)^2), on the real scores, not the fakes'."""
    with torch.no_grad():
        expected = 0.5 * float(_tiny_critic_module().D(REALS).float().pow(2).mean())
    base, drift = _d_losses("loss.gp_weight=0"), _d_losses("loss.gp_weight=0", "loss.drift=0.5")
    assert expected > 1e-4
    assert float(drift["d/loss"] - base["d/loss"]) == pytest.approx(expected, rel=1e-4)


def test_step_noise_differs_between_ranks_and_repeats_within_one():
    """Each rank draws its own latents, labels, penalty mixes and flips: the step generator is seeded by
    (seed, rank, D steps). Equal streams on two ranks would make data parallelism train on copies."""
    from unittest import mock

    m = module("gan_digits")
    a, again = torch.rand(16, generator=m._rng()), torch.rand(16, generator=m._rng())
    with mock.patch.object(GANModule, "global_rank", new_callable=mock.PropertyMock, return_value=1):
        b = torch.rand(16, generator=m._rng())
    assert torch.equal(a, again) and not torch.equal(a, b)
