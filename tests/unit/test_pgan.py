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


@pytest.mark.parametrize("h,w", [(1, 1), (4, 4), (5, 8), (8, 6)])
def test_fused_resampling_convs_equal_the_separate_ops(h, w):
    """The 4x4 kernels built from the 3x3 one: values and every gradient as upsample-then-conv and
    conv-then-pool (fp64), borders included."""
    torch.manual_seed(h * 10 + w)
    conv = EqualizedConv2d(5, 7, 3).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 5, h, w, dtype=torch.float64, requires_grad=True)
    pairs = [(conv.up, lambda x: conv(F.interpolate(x, scale_factor=2, mode="nearest")))]
    if h % 2 == 0 and w % 2 == 0:
        pairs.append((conv.down, lambda x: F.avg_pool2d(conv(x), 2)))
    for fused, separate in pairs:
        a, b = fused(x), separate(x)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        g = torch.randn_like(a)
        ga = torch.autograd.grad(a, [x, conv.weight, conv.bias], g)
        gb = torch.autograd.grad(b, [x, conv.weight, conv.bias], g)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-11)


def _pair(fused: bool, start_resolution: int = 4):
    torch.manual_seed(0)
    kw = dict(resolution=32, channels=3, start_resolution=start_resolution, fmap_base=64, fmap_max=16,
              fused_scale=fused)
    G, D = PGANGenerator(z_dim=16, **kw).double(), PGANDiscriminator(**kw).double()
    for p in list(G.parameters()) + list(D.parameters()):
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    return G, D


@pytest.mark.parametrize("start", [4, 8])
def test_fused_generator_is_the_same_function(start):
    (G, _), (Gf, _) = _pair(False, start), _pair(True, start)
    Gf.load_state_dict(G.state_dict())
    z = torch.randn(4, 16, dtype=torch.float64)
    for level, alpha in [(0, 1.0), (1, 0.4), (G.levels - 1, 1.0), (G.levels - 1, 0.7)]:
        torch.testing.assert_close(Gf(z, level, alpha), G(z, level, alpha), rtol=0, atol=1e-12)


def test_fused_discriminator_pools_before_the_activation():
    """The official code's order: lrelu(pool(conv(h))) in each block (and in the head above the start
    resolution), where the separate ops compute pool(lrelu(conv(h)))."""
    (_, D), (_, Df) = _pair(False, 8), _pair(True, 8)
    Df.load_state_dict(D.state_dict())
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    h = lrelu(Df.from_rgb[1](x))
    c0, c1 = Df.blocks[1]
    h = lrelu(F.avg_pool2d(c1(lrelu(c0(h))), 2))  # 16 -> 8 px
    h = lrelu(F.avg_pool2d(Df.post[1](lrelu(Df.post[0](h))), 2))  # 8 -> 4 px (start resolution 8)
    h = lrelu(Df.conv_top(minibatch_stddev(h, 4)))
    want = Df.dense2(lrelu(Df.dense1(h.flatten(1)))).squeeze(1)
    torch.testing.assert_close(Df(x, 1, 1.0), want, rtol=0, atol=1e-12)
    assert not torch.allclose(D(x, 1, 1.0), want)  # the separate order is another function


def test_fused_scale_flops_by_hand():
    """G and D forward and backward at 64 px (widths capped at 64): each resampling 3x3 conv at output
    (G) or input (D) resolution r costs 9 r^2 cin cout multiply-adds per sample separately and 4 r^2 cin
    cout fused (a 4x4 kernel at half the resolution in D, a stride-2 transposed 4x4 kernel in G), and
    its backward twice its forward (input and weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops, n = {}, 4
    for fused in (False, True):
        torch.manual_seed(0)
        G, D = build_gan("pgan", z_dim=32, resolution=64, channels=3, fmap_max=64, fused_scale=fused)
        with FlopCounterMode(display=False) as fc:
            D(G(torch.randn(n, 32))).sum().backward()
        flops[fused] = fc.get_total_flops()
    saved_macs = sum(5 * (4 * 2 ** i) ** 2 * conv.weight.shape[0] * conv.weight.shape[1] * n
                     for i in range(1, G.levels) for conv in (G.blocks[i][0], D.blocks[i][1]))
    assert flops[False] - flops[True] == 2 * 3 * saved_macs  # 2 FLOPs per multiply-add, fwd + 2x bwd
    assert flops[True] < 0.73 * flops[False]  # and at 256 px with the paper's widths: 0.65x


def test_generator_normalises_the_latent_before_its_dense_layer():
    """The paper's G pixel-normalises z first, so G(7 z) = G(z). With the dense layer's bias non-zero a
    missing normalisation shows (with a zero bias the later pixel norms would cancel the scale)."""
    torch.manual_seed(0)
    G = PGANGenerator(z_dim=16, resolution=8, channels=1, fmap_base=64, fmap_max=16)
    with torch.no_grad():
        G.dense.bias.normal_()
    z = torch.randn(4, 16)
    torch.testing.assert_close(G(7.0 * z), G(z), rtol=1e-4, atol=1e-5)


def test_pgan_generator_pixel_norms_by_hand():
    from models.pgan import PGANGenerator, _lrelu, pixel_norm

    torch.manual_seed(0)
    G = PGANGenerator(z_dim=8, resolution=8, channels=1, fmap_base=32, fmap_max=8, fused_scale=False)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases, so a missing norm shows
    z = torch.randn(3, 8)
    h = _lrelu(G.dense(pixel_norm(z))).view(3, -1, 4, 4)
    h = pixel_norm(_lrelu(G.conv0(pixel_norm(h))))
    torch.testing.assert_close(G._base(z), h)
    c0, c1 = G.blocks[1]
    up = pixel_norm(_lrelu(c1(pixel_norm(_lrelu(c0(F.interpolate(h, scale_factor=2, mode="nearest")))))))
    torch.testing.assert_close(G._block(1, h), up)


def test_pgan_output_layers_use_gain_one():
    from models.pgan import PGANDiscriminator, PGANGenerator

    G = PGANGenerator(z_dim=8, resolution=8, channels=1, fmap_base=32, fmap_max=8)
    D = PGANDiscriminator(resolution=8, channels=1, fmap_base=32, fmap_max=8)
    for rgb in G.to_rgb:  # to-RGB: linear output, gain 1 (the reference), He scale 1 / sqrt(fan_in)
        assert rgb.scale == pytest.approx(1.0 / math.sqrt(rgb.weight.shape[1]))
    assert D.dense2.scale == pytest.approx(1.0 / math.sqrt(D.dense2.weight.shape[1]))
    assert D.dense1.scale == pytest.approx(math.sqrt(2.0) / math.sqrt(D.dense1.weight.shape[1]))


def test_critic_top_widths_follow_the_reference_stages():
    """The reference's 4x4 critic block: a 3x3 conv to nf(1) on the features plus the stddev channel,
    then dense layers nf(1)*16 -> nf(0) -> 1. With fmap_base 32 (nf = 32, 16, 8, 4 for stages 0..3)
    every stage has its own width, so a stage off by one shows."""
    D = PGANDiscriminator(resolution=16, channels=1, fmap_base=32, fmap_max=64)
    assert [fmaps(s, 32, 64) for s in range(4)] == [32, 16, 8, 4]
    assert tuple(D.conv_top.weight.shape[:2]) == (16, 17)
    assert tuple(D.dense1.weight.shape) == (32, 16 * 16) and tuple(D.dense2.weight.shape) == (1, 32)


def test_dcgan_critic_uses_leaky_relu_0_2_everywhere():
    from models.dcgan import DCGANDiscriminator

    D = DCGANDiscriminator(width=8, resolution=32, channels=1, norm="layer")
    slopes = [m.negative_slope for m in D.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 3
