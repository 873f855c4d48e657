"""DCGAN generator and discriminator: shapes, ranges, norms and the DCGAN initialisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.dcgan import DCGANDiscriminator, DCGANGenerator
from models.registry import MODELS, build_gan


@torch.no_grad()
@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("ch", [1, 3])
def test_shapes(res, ch):
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=8, width=8, resolution=res, channels=ch)
    D = DCGANDiscriminator(width=8, resolution=res, channels=ch)
    z = torch.randn(3, 8)
    x = G(z)
    assert x.shape == (3, ch, res, res)
    s = D(x)
    assert s.shape == (3,)
    assert D(torch.randn(5, ch, res, res)).shape == (5,)


@pytest.mark.parametrize("res, levels", [(8, 1), (16, 2), (32, 3), (64, 4)])
def test_number_of_stride2_stages(res, levels):
    G = DCGANGenerator(z_dim=4, width=4, resolution=res)
    D = DCGANDiscriminator(width=4, resolution=res)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in G.modules()) == levels
    assert sum(isinstance(m, nn.Conv2d) for m in D.modules()) == levels
    # widths double towards the 4x4 end: G starts at width * 2^(levels-1), D ends there
    assert G.fc.out_features == 4 * 2 ** (levels - 1) * 16
    assert D.out.in_features == 4 * 2 ** (levels - 1) * 16


@torch.no_grad()
def test_generator_output_in_range():
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=16, width=8, resolution=16, channels=3)
    for p in G.parameters():
        p.mul_(30)  # push tanh into saturation
    x = G(torch.randn(16, 16) * 10)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.abs().max()) > 0.99  # it really reaches the ends


def test_discriminator_scores_are_unbounded_logits():
    D = DCGANDiscriminator(width=8, resolution=8, channels=1, norm="none")
    with torch.no_grad():
        D.out.bias.fill_(7.0)
    assert torch.allclose(D(torch.zeros(2, 1, 8, 8)), torch.full((2,), 7.0))


@pytest.mark.parametrize("res", [4, 12, 24, 128, 256])
def test_unsupported_resolution(res):
    with pytest.raises(ValueError, match="8, 16, 32 and 64"):
        DCGANGenerator(resolution=res)
    with pytest.raises(ValueError, match="8, 16, 32 and 64"):
        DCGANDiscriminator(resolution=res)


def test_unknown_norm():
    with pytest.raises(ValueError, match="batch, layer, none"):
        DCGANDiscriminator(width=4, resolution=16, norm="instance")


def test_norm_choices():
    D_layer = DCGANDiscriminator(width=8, resolution=32, norm="layer")
    assert not any(isinstance(m, _BatchNorm) for m in D_layer.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in D_layer.modules()) == 2
    D_none = DCGANDiscriminator(width=8, resolution=32, norm="none")
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in D_none.modules())
    D_batch = DCGANDiscriminator(width=8, resolution=32, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D_batch.modules()) == 2  # none on the first layer
    G_none = DCGANGenerator(z_dim=4, width=8, resolution=32, norm="none")
    assert not any(isinstance(m, _BatchNorm) for m in G_none.modules())


@torch.no_grad()
def test_layer_norm_critic_is_per_sample():
    """With norm=layer each sample's score does not depend on the rest of the batch (needed by GP)."""
    torch.manual_seed(0)
    D = DCGANDiscriminator(width=8, resolution=16, norm="layer").train()
    x = torch.randn(4, 1, 16, 16)
    together = D(x)
    alone = torch.cat([D(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=100, width=64, resolution=32, channels=3).requires_grad_(False)
    D = DCGANDiscriminator(width=64, resolution=32, channels=3).requires_grad_(False)
    for net in (G, D):
        ws = torch.cat([m.weight.flatten() for m in net.modules()
                        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))])
        assert ws.numel() > 100_000
        assert abs(float(ws.std()) - 0.02) < 0.001
        assert abs(float(ws.mean())) < 0.001
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                assert bool((m.bias == 0).all())
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                assert abs(float(m.weight.mean()) - 1.0) < 0.01
                assert float(m.weight.std()) < 0.04 and bool((m.bias == 0).all())
        # no layer keeps PyTorch's default (kaiming-uniform) init
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() >= 1000:
                assert abs(float(m.weight.std()) - 0.02) < 0.003


def test_batchnorm_layers_have_no_conv_bias():
    G = DCGANGenerator(z_dim=4, width=8, resolution=32, norm="batch")
    D = DCGANDiscriminator(width=8, resolution=32, norm="batch")
    assert G.fc.bias is None
    convs_g = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(m.bias is None for m in convs_g[:-1]) and convs_g[-1].bias is not None
    convs_d = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert convs_d[0].bias is not None and all(m.bias is None for m in convs_d[1:])


def test_registry_builds_dcgan():
    assert "dcgan" in MODELS
    G, D = build_gan("dcgan", z_dim=8, g_width=8, d_width=8, resolution=16, channels=3,
                     g_norm="none", d_norm="layer", num_classes=10)
    assert isinstance(G, DCGANGenerator) and isinstance(D, DCGANDiscriminator)
    assert G(torch.randn(2, 8)).shape == (2, 3, 16, 16)
    assert not any(isinstance(m, _BatchNorm) for m in list(G.modules()) + list(D.modules()))
