"""BigGAN networks: shapes at every resolution, spectral norm against torch.linalg, conditional BN,
the projection discriminator, orthogonal regularisation against its closed form, truncation, and
the 128 px parameter counts of the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.biggan import (D_ARCH, G_ARCH, BigGANDiscriminator, BigGANGenerator, build_biggan,
                           truncated_normal)
from models.layers import ConditionalBatchNorm2d, SNConv2d, SpectralNormMixin, spectral_layers
from models.registry import build_gan
from trainer.losses import ortho_params, ortho_reg


def tiny(res: int, num_classes: int, channels: int = 3, ch: int = 8):
    """A narrow G and D at `res` with attention at 16 px (every network has one; cheap at any size)."""
    slots = len(G_ARCH[res][0]) + 1
    G = BigGANGenerator(z_dim=2 * slots, ch=ch, resolution=res, channels=channels, num_classes=num_classes,
                        shared_dim=8, attention_res=16)
    D = BigGANDiscriminator(ch=ch, resolution=res, channels=channels, num_classes=num_classes,
                            attention_res=16)
    return G, D


@torch.no_grad()
@pytest.mark.parametrize("res", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("num_classes", [0, 7])
def test_shapes(res, num_classes):
    torch.manual_seed(0)
    G, D = tiny(res, num_classes, channels=1 if res == 32 else 3)
    assert len(G.attn) == 1 and len(D.attn) == 1
    y = torch.tensor([0, 6]) if num_classes else None
    x = G(torch.randn(2, G.z_dim), y)
    assert x.shape == (2, G.channels, res, res)
    assert float(x.abs().max()) <= 1.0  # tanh output
    assert D(x, y).shape == (2,)
    assert D(torch.randn(3, G.channels, res, res), torch.tensor([1, 2, 3]) if num_classes else None).shape == (3,)


def test_block_structure_follows_the_reference_arch():
    G, D = tiny(128, 3)
    cin, cout = G_ARCH[128]
    assert [b.conv1.in_channels for b in G.blocks] == [8 * m for m in cin]
    assert [b.conv2.out_channels for b in G.blocks] == [8 * m for m in cout]
    mult, down = D_ARCH[128]
    assert [b.conv2.out_channels for b in D.blocks] == [8 * m for m in mult]
    assert [b.downsample for b in D.blocks] == down
    # the first D block sees the image without pre-activation, all others with
    assert [b.preactivation for b in D.blocks] == [False] + [True] * (len(mult) - 1)
    # hierarchical z: one chunk for the input layer and one per block
    assert G.linear.in_features == G.chunk == G.z_dim // (len(cin) + 1)
    assert G.blocks[0].bn1.gain.in_features == G.chunk + 8  # [shared embedding, z chunk]


@pytest.mark.parametrize("res", [16, 48, 100, 1024])
def test_unsupported_resolution_lists_valid_ones(res):
    for make in (lambda: BigGANGenerator(resolution=res), lambda: BigGANDiscriminator(resolution=res)):
        with pytest.raises(ValueError, match="32, 64, 128, 256, 512"):
            make()


def test_z_dim_must_split_into_equal_chunks():
    with pytest.raises(ValueError, match="divisible by 6"):
        BigGANGenerator(z_dim=100, ch=8, resolution=128, num_classes=0)


def test_parameter_counts_of_the_128px_config():
    """ch 96, z 120, shared dim 128, attention at 64, 1000 classes: 70,433,988 G parameters, exactly as
    BigGAN-PyTorch; D 87,982,370 with the projection embedding (figures of 87,983,370 quoted elsewhere
    come from a variant with a 1000-way linear class head: 1000 more biases). Buffers (SN u-vectors,
    BN statistics) are not parameters."""
    with torch.device("meta"):  # shapes only: no 150M-parameter allocation or orthogonal init
        G = BigGANGenerator(120, 96, 128, 3, 1000, 128, 64, init=False)
        D = BigGANDiscriminator(96, 128, 3, 1000, 64, init=False)
    n_g = sum(p.numel() for p in G.parameters())
    n_d = sum(p.numel() for p in D.parameters())
    assert n_g == 70_433_988 and round(n_g / 1e6, 1) == 70.4
    assert n_d == 87_982_370 and round(n_d / 1e6, 1) == 88.0
    assert sum(b.numel() for n, b in G.named_buffers() if n.endswith(".u")) > 0


def test_every_conv_and_linear_is_spectrally_normalised_but_not_the_shared_embedding():
    G, D = tiny(64, 5)
    for net in (G, D):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                assert isinstance(m, SpectralNormMixin), m
    assert isinstance(D.embed, SpectralNormMixin)
    assert type(G.shared) is nn.Embedding
    # u-vectors are buffers, so they are saved in state_dict (and checkpoints)
    for net in (G, D):
        assert sum(k.endswith(".u") for k in net.state_dict()) == len(spectral_layers(net)) > 10


def test_spectral_norm_is_one_after_enough_power_iterations():
    torch.manual_seed(0)
    G, D = tiny(32, 4)
    layers = spectral_layers(G) + spectral_layers(D)
    with torch.no_grad():
        for m in layers:  # orthogonal init has all singular values 1: use a weight with a spread
            m.weight.normal_()
    first = [float(torch.linalg.matrix_norm(m.sn_weight().detach().flatten(1), ord=2)) for m in layers]
    assert max(abs(s - 1) for s in first) > 0.05  # one iteration from a random u is not yet there
    for _ in range(300):  # one power iteration per call in training mode, as in training
        for m in layers:
            m.sn_weight()
    for m in layers:
        w = m.sn_weight().detach().flatten(1)
        assert float(torch.linalg.matrix_norm(w, ord=2)) == pytest.approx(1.0, abs=2e-3), m


def test_spectral_norm_under_cpu_bf16_autocast_matches_fp32():
    """CPU autocast runs W @ v in bf16 and, unlike CUDA, does not promote torch.dot: sigma must be
    taken in u's precision (this raised 'expected both vectors to have same dtype' before)."""
    torch.manual_seed(0)
    layer = SNConv2d(8, 16).eval()
    with torch.no_grad():
        layer.weight.normal_()
    ref = layer.sn_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.sn_weight()
    assert w.dtype == torch.float32  # weight / sigma stays in the weight's precision
    torch.testing.assert_close(w, ref, rtol=2e-2, atol=1e-3)


def test_u_updates_only_in_training_mode():
    layer = SNConv2d(4, 6, eps=1e-6)
    u0 = layer.u.clone()
    layer.eval()
    layer(torch.randn(1, 4, 5, 5))
    assert torch.equal(layer.u, u0)
    layer.train()
    layer(torch.randn(1, 4, 5, 5))
    assert not torch.equal(layer.u, u0)


def test_conditional_bn_same_class_same_output_and_classes_differ():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(6, cond_dim=5)
    emb = nn.Embedding(3, 5)
    x = torch.randn(1, 6, 4, 4).expand(6, -1, -1, -1)  # six copies of one input
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    out = cbn(x + 0.1 * torch.randn(1, 6, 4, 4).repeat(6, 1, 1, 1), emb(y))
    # (not bitwise: vectorised and scalar tails of CPU kernels may round differently)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], out[3], rtol=0, atol=1e-6)
    assert (out[0] - out[2]).abs().max() > 1e-3 and (out[2] - out[4]).abs().max() > 1e-3
    # a zero conditioning vector gives plain (affine-free) BatchNorm: the "1 +" in the gain
    xs = torch.randn(8, 6, 4, 4)
    torch.testing.assert_close(cbn(xs, torch.zeros(8, 5)), nn.functional.batch_norm(xs, None, None, training=True))


@torch.no_grad()
def test_generator_class_conditioning_end_to_end():
    torch.manual_seed(0)
    G, _ = tiny(32, 3)
    G.eval()
    z = torch.randn(1, G.z_dim).expand(4, -1)
    out = G(z, torch.tensor([0, 0, 1, 2]))
    assert torch.equal(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-4 and (out[2] - out[3]).abs().max() > 1e-4
    # a float input is taken as an embedding: class interpolation endpoints match the classes
    e = G.shared(torch.tensor([0, 2]))
    torch.testing.assert_close(G(z[:2], e), G(z[:2], torch.tensor([0, 2])))


@torch.no_grad()
def test_projection_discriminator_closed_form():
    """D(x, y) - D(x, y') = <embed(y) - embed(y'), sum-pooled features>: the projection term."""
    torch.manual_seed(0)
    _, D = tiny(32, 4)
    D.eval()
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    s = D(x, torch.tensor([1, 3]))
    h = x[:1]
    for i, block in enumerate(D.blocks):
        h = block(h)
        if str(i) in D.attn:
            h = D.attn[str(i)](h)
    phi = torch.relu(h).sum(dim=(2, 3))[0]
    e = D.embed.sn_weight()
    assert float(s[0] - s[1]) == pytest.approx(float(phi @ (e[1] - e[3])), rel=1e-4, abs=1e-5)


def test_unconditional_mode_has_no_class_parameters():
    G, D = tiny(32, 0)
    assert G.shared is None and D.embed is None and not G.conditional and not D.conditional
    assert G.blocks[0].bn1.gain.in_features == G.chunk


def test_registry_builder_and_its_errors():
    G, D = build_gan("biggan", z_dim=8, g_width=8, d_width=8, resolution=32, channels=1, g_norm="batch",
                     d_norm="none", num_classes=10, attention_res=16, shared_dim=8)
    assert G.num_classes == D.num_classes == 10 and G.channels == 1
    G, D = build_biggan(8, 8, 8, 32, 1, num_classes=10, attention_res=0, class_conditional=False)
    assert G.num_classes == D.num_classes == 0 and not G.attn and not D.attn
    with pytest.raises(ValueError, match="model.d_norm=none"):
        build_gan("biggan", z_dim=8, g_width=8, d_width=8, resolution=32, channels=1, d_norm="batch")
    # the DCGAN builder ignores the BigGAN-only keys it does not take
    G, _ = build_gan("dcgan", z_dim=8, g_width=8, d_width=8, resolution=16, channels=1, attention_res=8)
    assert G(torch.randn(2, 8)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 2, 2), (5, 3)])
def test_ortho_reg_gradient_matches_closed_form(shape):
    """L = beta * ||W W^T * (1 - I)||_F^2 with W = weight viewed as (out, rest). With M the masked Gram
    matrix (symmetric), dL/dW_kl = 2 beta sum_ij M_ij d(W W^T)_ij/dW_kl = 2 beta (M W + M^T W)_kl
    = 4 beta (M W)_kl."""
    torch.manual_seed(0)
    beta = 1e-4
    p = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    loss = ortho_reg([p], beta)
    loss.backward()
    W = p.detach().flatten(1)
    M = (W @ W.t()) * (1 - torch.eye(W.shape[0], dtype=W.dtype))
    torch.testing.assert_close(loss.detach(), beta * M.pow(2).sum())
    torch.testing.assert_close(p.grad, (4 * beta * M @ W).view(shape))
    # an orthogonal matrix is a minimum: zero penalty and gradient
    q = nn.Parameter(torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0][:4])
    ortho_reg([q], beta).backward()
    assert float(q.grad.abs().max()) < 1e-15 and float(p.grad.abs().max()) > 1e-5


def test_ortho_params_exclude_embeddings_and_vectors():
    G, _ = tiny(32, 4)
    params = ortho_params(G)
    ids = {id(p) for p in params}
    assert id(G.shared.weight) not in ids
    assert id(G.linear.weight) in ids and id(G.blocks[0].bn1.gain.weight) in ids
    assert all(p.ndim >= 2 for p in params)
    expected = [p for n, p in G.named_parameters() if p.ndim >= 2 and not n.startswith("shared.")]
    assert len(params) == len(expected)


@pytest.mark.parametrize("threshold", [0.25, 0.5, 1.0, 2.0])
def test_truncated_samples_never_exceed_threshold(threshold):
    g = torch.Generator().manual_seed(0)
    z = truncated_normal(2000, 16, threshold, generator=g)
    assert z.shape == (2000, 16)
    assert float(z.abs().max()) <= threshold
    # resampled, not clipped: no mass piles up at the bounds, and the spread is that of a truncated normal
    assert float((z.abs() == threshold).float().mean()) == 0.0
    assert float(z.abs().max()) > 0.95 * threshold
    again = truncated_normal(2000, 16, threshold, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    assert float(truncated_normal(500, 8, 0.0).abs().max()) > 2.0  # T=0: no truncation


def test_imagenet128_experiment_builds_the_reference_sizes():
    from trainer.build import gan_build_args
    from trainer.config import load_config, to_dict

    cfg = to_dict(load_config("biggan_imagenet128"))
    assert (cfg["data"]["batch_size"], cfg["optim"]["accumulate"], cfg["optim"]["n_critic"]) == (2048, 8, 1)
    with torch.device("meta"):
        G, D = build_gan(**gan_build_args(cfg, 3, 1000))
    assert sum(p.numel() for p in G.parameters()) == 70_433_988
    assert sum(p.numel() for p in D.parameters()) == 87_982_370
    assert len(G.attn) == 1 and G.attn[next(iter(G.attn))].theta.in_channels == 2 * 96  # 64 px block


def _attention_pair(ch: int):
    from models.layers import SelfAttention

    torch.manual_seed(0)
    ref = SelfAttention(ch, impl="matmul")
    fused = SelfAttention(ch, impl="sdpa")
    with torch.no_grad():
        ref.gamma.fill_(0.7)  # 0 at init would hide the attention branch entirely
    fused.load_state_dict(ref.state_dict())  # the same parameters: checkpoints are interchangeable
    return ref, fused


@pytest.mark.parametrize("ch, hw", [(32, 8), (96, 16), (40, 4)])  # head sizes 4/16 (padded) and 12/48
def test_sdpa_attention_equals_the_explicit_softmax(ch, hw):
    """Same output and gradients for every parameter and the input; head sizes that need padding
    to the fused kernels' multiple of 8 included."""
    ref, fused = _attention_pair(ch)
    x = torch.randn(3, ch, hw, hw)
    outs = []
    for net in (ref, fused):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert not torch.allclose(y0, x, atol=1e-2)  # the attention branch really contributes
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_attention_impl_reaches_every_attention_block_and_unknown_ones_are_refused():
    G, D = build_biggan(z_dim=20, g_width=4, d_width=4, resolution=32, channels=1, num_classes=10,
                        attention_res=16, attention_impl="sdpa")
    assert [m.impl for m in list(G.attn.values()) + list(D.attn.values())] == ["sdpa", "sdpa"]
    with pytest.raises(ValueError, match=r"Unknown model.attention_impl 'flash'. Valid: matmul, sdpa"):
        build_biggan(z_dim=20, g_width=4, d_width=4, resolution=32, channels=1, attention_res=16,
                     attention_impl="flash")


def test_spectral_norm_gradient_treats_u_and_v_as_constants():
    """Miyato et al.'s backward: sigma = u^T W v with u, v from the power iteration held constant, so
    d sum(G * W/sigma) / dW = G/sigma - (sum G*W)/sigma^2 * u v^T. A v that carried gradient would add
    terms through the power iteration."""
    import torch.nn.functional as F

    from models.layers import SNLinear

    torch.manual_seed(0)
    layer = SNLinear(5, 4).eval()  # eval: one power iteration from the stored u, u not updated
    with torch.no_grad():
        layer.weight.normal_()
    W = layer.weight.detach()
    v = F.normalize(layer.u.clone() @ W, dim=0, eps=1e-6)
    u = F.normalize(W @ v, dim=0, eps=1e-6)
    sigma = u @ W @ v
    G = torch.randn(4, 5)
    (layer.sn_weight() * G).sum().backward()
    expected = G / sigma - (G * W).sum() / sigma ** 2 * torch.outer(u, v)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_conditional_bn_closed_form():
    """BigGAN's conditional BN: BN(x) * (1 + gain(c)) + bias(c), gain and bias separate linear maps of
    the conditioning vector (eval mode: running statistics 0 and 1)."""
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(6, 5).eval()
    with torch.no_grad():
        cbn.gain.weight.normal_()
        cbn.bias.weight.normal_()
    x, c = torch.randn(3, 6, 2, 2), torch.randn(3, 5)
    expected = x / (1 + 1e-5) ** 0.5 * (1 + cbn.gain(c))[:, :, None, None] + cbn.bias(c)[:, :, None, None]
    assert (cbn.gain(c) - cbn.bias(c)).abs().max() > 1e-2  # gain and bias really differ
    torch.testing.assert_close(cbn(x, c), expected)


def test_biggan_hierarchical_latent_feeds_chunk_k_to_layer_k():
    from models.biggan import BigGANGenerator

    G = BigGANGenerator(z_dim=20, ch=4, resolution=32, channels=3, num_classes=5, shared_dim=6, attention_res=0).eval()
    seen = {}
    G.linear.register_forward_pre_hook(lambda mod, args: seen.__setitem__("linear", args[0].clone()))
    for i, b in enumerate(G.blocks):
        b.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[1].clone()))
    z, y = torch.randn(3, 20), torch.tensor([0, 2, 4])
    G(z, y)
    chunks = z.split(5, 1)  # 3 blocks + the input layer: 4 chunks of 5
    assert torch.equal(seen["linear"], chunks[0])
    for i in range(3):
        assert torch.equal(seen[i], torch.cat([G.shared(y), chunks[i + 1]], 1)), i


def test_first_dblock_has_no_preactivation_closed_form():
    from models.biggan import DBlock

    torch.manual_seed(0)
    blk = DBlock(3, 8, downsample=True, preactivation=False, sn_eps=1e-6).eval()  # eval: SN vectors fixed
    x = torch.rand(2, 3, 8, 8) * 2 - 1  # images in [-1, 1]: a ReLU first would drop the negative half
    expected = F.avg_pool2d(blk.conv2(F.relu(blk.conv1(x))), 2) + blk.conv_sc(F.avg_pool2d(x, 2))
    torch.testing.assert_close(blk(x), expected)


def test_gblock_closed_form():
    from models.biggan import GBlock

    torch.manual_seed(0)
    blk = GBlock(4, 6, cond_dim=5, sn_eps=1e-6).eval()  # eval: running BN stats, fixed SN vectors
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 5)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    h = blk.conv1(up(F.relu(blk.bn1(x, c))))
    expected = blk.conv2(F.relu(blk.bn2(h, c))) + blk.conv_sc(up(x))
    torch.testing.assert_close(blk(x, c), expected)


def test_d_attends_once_at_a_resolution_several_blocks_share():
    """The 32 px D keeps 8x8 for its last three blocks: attention comes once, after the first of them
    (block 1), as in the reference, not after each."""
    D = BigGANDiscriminator(ch=4, resolution=32, channels=3, attention_res=8)
    assert list(D.attn) == ["1"]
