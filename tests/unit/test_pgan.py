"""Progressive GAN networks: equalised lr, minibatch stddev, fade-in continuity, builder."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.pgan import (EqualizedConv2d, EqualizedLinear, PGANDiscriminator, PGANGenerator, fading, fmaps,
                         mbstd_group, minibatch_stddev, pixel_norm)
from models.registry import build_gan


def test_equalized_params_are_standard_normal_and_outputs_he_scaled():
    torch.manual_seed(0)
    lin = EqualizedLinear(512, 2048)
    conv = EqualizedConv2d(64, 256, 3)
    for w in (lin.weight.detach(), conv.weight.detach()):
        assert abs(float(w.mean())) < 0.01 and abs(float(w.std()) - 1.0) < 0.01
    assert lin.scale == pytest.approx(math.sqrt(2 / 512)) and conv.scale == pytest.approx(math.sqrt(2 / (64 * 9)))
    # unit-variance inputs: Var(out) = gain^2 = 2 (He), whatever the fan-in
    x = torch.randn(4096, 512)
    assert float(lin(x).var()) == pytest.approx(2.0, rel=0.05)
    y = conv(torch.randn(64, 64, 12, 12))[:, :, 1:-1, 1:-1]  # interior: no zero padding in the receptive field
    assert float(y.var()) == pytest.approx(2.0, rel=0.05)
    # a gain of 1 (to-RGB, last dense) gives unit variance
    assert float(EqualizedLinear(512, 2048, gain=1.0)(x).var()) == pytest.approx(1.0, rel=0.05)


def test_first_dense_gain_and_fmaps():
    G = PGANGenerator(z_dim=16, resolution=8, channels=1, fmap_base=64, fmap_max=16)
    assert G.dense.scale == pytest.approx(math.sqrt(2) / 4 / 4)  # gain sqrt(2)/4 over sqrt(fan_in 16)
    assert [fmaps(s, 8192, 512) for s in (1, 5, 6, 9)] == [512, 256, 128, 16]
    assert G.dense.weight.shape == (16 * 16, 16) and G.to_rgb[1].weight.shape == (1, 16, 1, 1)


def test_pixel_norm_unit_mean_square():
    x = torch.randn(5, 7, 3, 3) * 10
    assert torch.allclose(pixel_norm(x).pow(2).mean(1), torch.ones(5, 3, 3), atol=1e-5)


def test_minibatch_stddev_by_hand():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 2, 2)
    out = minibatch_stddev(x, group=4)
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], x)
    # sample i is in group i mod 2: {0, 2, 4, 6} and {1, 3, 5, 7}
    for m in range(2):
        members = x[m::2]  # (4, 3, 2, 2)
        var = ((members - members.mean(0)) ** 2).mean(0)  # biased, over the group
        want = (var + 1e-8).sqrt().mean()
        for i in range(m, 8, 2):
            assert torch.allclose(out[i, 3], want.expand(2, 2), atol=1e-6)
    assert mbstd_group(6, 4) == 3 and mbstd_group(3, 4) == 3 and mbstd_group(8, 4) == 4


def _nets():
    torch.manual_seed(0)
    G = PGANGenerator(z_dim=16, resolution=16, channels=3, fmap_base=64, fmap_max=16)
    D = PGANDiscriminator(resolution=16, channels=3, fmap_base=64, fmap_max=16)
    for p in list(G.parameters()) + list(D.parameters()):  # non-zero biases: a wrong path would show
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    return G, D


@pytest.mark.parametrize("level", [1, 2])
def test_alpha_zero_g_equals_previous_level_upsampled(level):
    G, _ = _nets()
    z = torch.randn(4, 16)
    prev = G(z, level - 1, 1.0)
    grown = G(z, level, 0.0)
    assert grown.shape[-1] == 2 * prev.shape[-1]
    assert torch.equal(grown, F.interpolate(prev, scale_factor=2, mode="nearest"))
    assert not torch.allclose(G(z, level, 0.5), grown)  # the new block does change the output


@pytest.mark.parametrize("level", [1, 2])
def test_alpha_zero_d_equals_previous_level_of_downsampled_input(level):
    _, D = _nets()
    x = torch.randn(8, 3, 4 * 2 ** level, 4 * 2 ** level)
    assert torch.equal(D(x, level, 0.0), D(F.avg_pool2d(x, 2), level - 1, 1.0))
    assert not torch.allclose(D(x, level, 0.5), D(x, level, 0.0))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.999])
def test_a_tensor_alpha_blends_exactly_as_the_float(alpha):
    """Training passes alpha as a 0-dim tensor while a block fades in (one compiled graph for the whole
    fade-in); the outputs are those of the float, bit for bit, at alpha 0 exactly the previous level."""
    G, D = _nets()
    z, x = torch.randn(4, 16), torch.randn(8, 3, 16, 16)
    t = torch.tensor(alpha)
    assert torch.equal(G(z, 2, t), G(z, 2, alpha)) and torch.equal(D(x, 2, t), D(x, 2, alpha))
    assert fading(t) and fading(alpha) and not fading(1.0)
    # a tensor always takes the blend; at 1 it is the new path up to rounding (the float skips the blend)
    torch.testing.assert_close(G(z, 2, torch.tensor(1.0)), G(z, 2, 1.0), rtol=0, atol=1e-6)


def test_builder_defaults_to_final_level_and_ignores_unknown_keys():
    G, D = build_gan("pgan", z_dim=8, resolution=8, channels=1, fmap_base=32, fmap_max=8, g_width=99)
    z = torch.randn(4, 8)
    assert G(z).shape == (4, 1, 8, 8) and torch.equal(G(z), G(z, 1, 1.0))
    assert D(G(z)).shape == (4,)
    with pytest.raises(ValueError, match="power-of-two"):
        build_gan("pgan", z_dim=8, resolution=24, channels=1)


def test_start_resolution_above_4():
    G = PGANGenerator(z_dim=8, resolution=16, channels=1, start_resolution=8, fmap_base=32, fmap_max=8)
    D = PGANDiscriminator(resolution=16, channels=1, start_resolution=8, fmap_base=32, fmap_max=8)
    z = torch.randn(4, 8)
    assert G(z, 0).shape == (4, 1, 8, 8) and D(G(z, 0), 0).shape == (4,)
    assert torch.equal(G(z, 1, 0.0), F.interpolate(G(z, 0), scale_factor=2, mode="nearest"))
