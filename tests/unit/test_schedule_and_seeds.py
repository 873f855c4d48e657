"""Critic-step schedule (WGAN's boosted phases) and the splitmix seed mixer."""
from __future__ import annotations

import itertools

import pytest
import torch

from trainer.gan_module import critic_steps, mix_seed

# The WGAN paper's Algorithm 1 (wgan_mnist5k.yaml): 100 critic steps for the first 25 G iterations
# and every 500th one, 5 otherwise.
PAPER = dict(n_critic=5, boost_steps=100, boost_first=25, boost_every=500)


@pytest.mark.parametrize("it", list(range(25)) + [500, 1000, 1500, 10_000])
def test_wgan_boosted_iterations(it):
    assert critic_steps(it, **PAPER) == 100


@pytest.mark.parametrize("it", [25, 26, 27, 100, 250, 499, 501, 502, 999, 1001, 1499])
def test_wgan_normal_iterations(it):
    assert critic_steps(it, **PAPER) == 5


def test_wgan_schedule_total_d_steps():
    # iterations 0..999: 25 boosted at the start + {500} = 26 boosted, 974 at 5
    total = sum(critic_steps(i, **PAPER) for i in range(1000))
    assert total == 26 * 100 + 974 * 5


@pytest.mark.parametrize("n_critic", [1, 5])
def test_boost_off_is_always_n_critic(n_critic):
    for it in itertools.chain(range(30), [500, 1000]):
        assert critic_steps(it, n_critic, 0, 25, 500) == n_critic


def test_boost_every_zero_only_boosts_the_start():
    assert critic_steps(24, 5, 100, 25, 0) == 100
    assert critic_steps(25, 5, 100, 25, 0) == 5
    assert critic_steps(500, 5, 100, 25, 0) == 5


def test_module_uses_schedule_from_config():
    from trainer.build import build_module
    from trainer.config import load_config

    cfg = load_config("wgan_mnist5k", ["logging.wandb=false", "data.resolution=8", "model.g_width=8",
                                       "model.d_width=8", "model.z_dim=8"])
    module = build_module(cfg, channels=1, num_classes=10)
    for it, expected in [(0, 100), (24, 100), (25, 5), (499, 5), (500, 100), (501, 5)]:
        module.iteration.fill_(it)
        assert module.n_critic_now() == expected


# ---- mix_seed ----------------------------------------------------------------------------------


def test_mix_seed_is_deterministic():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    assert mix_seed(12345, 7, 999_999) == mix_seed(12345, 7, 999_999)


def test_mix_seed_of_nothing_is_the_golden_ratio_constant():
    assert mix_seed() == 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF


def test_mix_seed_distinct_for_neighbouring_tuples():
    tuples = list(itertools.product(range(4), range(4), range(64)))
    seeds = [mix_seed(*t) for t in tuples]
    assert len(set(seeds)) == len(tuples)


def test_mix_seed_order_matters():
    assert mix_seed(0, 1, 0) != mix_seed(1, 0, 0)
    assert mix_seed(0, 0, 1) != mix_seed(0, 1, 0)
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_mix_seed_is_a_valid_torch_seed_and_decorrelates_streams():
    vals = []
    for parts in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 2**40), (-1, 0, 0)]:
        s = mix_seed(*parts)
        assert 0 <= s < 2**63
        g = torch.Generator().manual_seed(s)
        vals.append(torch.randn(1000, generator=g))
    for a, b in itertools.combinations(vals, 2):
        assert not torch.equal(a, b)
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(float(corr)) < 0.15


def test_mix_seed_high_bits_vary_for_neighbouring_steps():
    # splitmix avalanche: consecutive steps flip about half of the 63 bits
    flips = [bin(mix_seed(0, 0, t) ^ mix_seed(0, 0, t + 1)).count("1") for t in range(200)]
    assert 24 <= sum(flips) / len(flips) <= 40
