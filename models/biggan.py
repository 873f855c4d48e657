"""BigGAN (Brock et al. 2018): class-conditional residual G and projection D, 32 to 512 px.

G: a shared class embedding (not spectrally normalised) and a hierarchical latent: z is split into
(number of blocks + 1) equal chunks; the first feeds the linear layer to the 4x4 input, and each
residual up-block's conditional BatchNorms get [shared embedding, its own chunk]. Output:
BN -> ReLU -> conv -> tanh. D: residual down-blocks (the first without pre-activation), ReLU, global
sum pooling, a linear output plus the projection <embed(y), features>. Self-attention follows the
block whose output has the configured resolution. Every conv, linear and D's embedding is
spectrally normalised (one power iteration per forward pass); weights are orthogonally initialised.

Channel multipliers are the reference's (BigGAN-PyTorch G_arch / D_arch), times ``ch``
(96 at 128 px on ImageNet, 64 on CIFAR). With num_classes=0 both networks are unconditional.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ConditionalBatchNorm2d, SelfAttention, SNConv2d, SNEmbedding, SNLinear
from models.registry import register

# resolution -> (G block input multipliers, G block output multipliers)
G_ARCH: Dict[int, Tuple[List[int], List[int]]] = {
    32: ([4, 4, 4], [4, 4, 4]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
    512: ([16, 16, 8, 8, 4, 2, 1], [16, 8, 8, 4, 2, 1, 1]),
}
# resolution -> (D block output multipliers, which blocks downsample); inputs chain from the image
D_ARCH: Dict[int, Tuple[List[int], List[bool]]] = {
    32: ([4, 4, 4, 4], [True, True, False, False]),
    64: ([1, 2, 4, 8, 16], [True] * 4 + [False]),
    128: ([1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
    512: ([1, 1, 2, 4, 8, 8, 16, 16], [True] * 7 + [False]),
}
BOTTOM = 4  # G starts from 4x4


def check_resolution(resolution: int) -> None:
    if resolution not in G_ARCH:
        raise ValueError(f"BigGAN supports resolutions {', '.join(map(str, sorted(G_ARCH)))}, got {resolution}.")


def ortho_init(module: nn.Module) -> None:
    """BigGAN's init: orthogonal weights for every conv, linear and embedding (biases keep torch's)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.orthogonal_(m.weight)


class GBlock(nn.Module):
    """CBN -> ReLU -> 2x nearest upsample -> conv3 -> CBN -> ReLU -> conv3, plus a 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, cond_dim: int, sn_eps: float):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim, sn_eps)
        self.conv1 = SNConv2d(cin, cout, eps=sn_eps)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim, sn_eps)
        self.conv2 = SNConv2d(cout, cout, eps=sn_eps)
        self.conv_sc = SNConv2d(cin, cout, 1, padding=0, eps=sn_eps)  # upsampling: always learnable

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """[ReLU] -> conv3 -> ReLU -> conv3 [-> avgpool 2], plus a shortcut. Without pre-activation (the
    first block, which sees the image) the shortcut pools before its 1x1 conv, else after (cheaper)."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool, sn_eps: float):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = SNConv2d(cin, cout, eps=sn_eps)
        self.conv2 = SNConv2d(cout, cout, eps=sn_eps)
        self.conv_sc = SNConv2d(cin, cout, 1, padding=0, eps=sn_eps) if (cin != cout or downsample) else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_sc is None:
            return x
        return self._pool(self.conv_sc(x)) if self.preactivation else self.conv_sc(self._pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        return h + self._shortcut(x)


class BigGANGenerator(nn.Module):
    def __init__(self, z_dim: int = 120, ch: int = 96, resolution: int = 128, channels: int = 3,
                 num_classes: int = 1000, shared_dim: int = 128, attention_res: int = 64,
                 sn_eps: float = 1e-6, init: bool = True, attention_impl: str = "matmul"):
        super().__init__()
        check_resolution(resolution)
        cin, cout = G_ARCH[resolution]
        n_blocks = len(cin)
        slots = n_blocks + 1
        if z_dim % slots:
            raise ValueError(f"BigGAN at {resolution} px splits z into {slots} chunks ({n_blocks} blocks + the input "
                             f"layer): z_dim must be divisible by {slots}, got {z_dim} (e.g. {slots * 20}).")
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.num_classes, self.chunk = num_classes, z_dim // slots
        # Not spectrally normalised: the reference found SN on it cripples G.
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes > 0 else None
        cond_dim = self.chunk + (shared_dim if num_classes > 0 else 0)
        self.linear = SNLinear(self.chunk, cin[0] * ch * BOTTOM ** 2, eps=sn_eps)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()  # block index -> attention after it
        for i in range(n_blocks):
            self.blocks.append(GBlock(cin[i] * ch, cout[i] * ch, cond_dim, sn_eps))
            if BOTTOM * 2 ** (i + 1) == attention_res:
                self.attn[str(i)] = SelfAttention(cout[i] * ch, sn_eps, attention_impl)
        self.out_bn = nn.BatchNorm2d(cout[-1] * ch)
        self.out_conv = SNConv2d(cout[-1] * ch, channels, eps=sn_eps)
        if init:
            ortho_init(self)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        """Class indices (N,) -> shared embeddings (N, shared_dim); float (N, shared_dim) passes through
        (mixtures of embeddings give class-interpolation grids)."""
        return y if y.is_floating_point() else self.shared(y)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        zs = z.split(self.chunk, 1)
        if self.conditional:
            if y is None:
                raise ValueError("This BigGAN generator is class-conditional: pass class labels y.")
            e = self.embed(y)
            conds = [torch.cat([e.to(zc.dtype), zc], 1) for zc in zs[1:]]
        else:
            conds = list(zs[1:])
        h = self.linear(zs[0]).view(z.shape[0], -1, BOTTOM, BOTTOM)
        for i, block in enumerate(self.blocks):
            h = block(h, conds[i])
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class BigGANDiscriminator(nn.Module):
    def __init__(self, ch: int = 96, resolution: int = 128, channels: int = 3, num_classes: int = 1000,
                 attention_res: int = 64, sn_eps: float = 1e-6, init: bool = True, attention_impl: str = "matmul"):
        super().__init__()
        check_resolution(resolution)
        mult, down = D_ARCH[resolution]
        self.resolution, self.num_classes = resolution, num_classes
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin, res = channels, resolution
        for i, (m, d) in enumerate(zip(mult, down)):
            self.blocks.append(DBlock(cin, m * ch, d, preactivation=i > 0, sn_eps=sn_eps))
            cin, res = m * ch, res // 2 if d else res
            if res == attention_res and not self.attn:  # once, after the first block reaching it
                self.attn[str(i)] = SelfAttention(cin, sn_eps, attention_impl)
        self.linear = SNLinear(cin, 1, eps=sn_eps)
        self.embed = SNEmbedding(num_classes, cin, eps=sn_eps) if num_classes > 0 else None
        if init:
            ortho_init(self)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))  # global sum pooling, as in SN-GAN
        out = self.linear(h).squeeze(1)
        if self.conditional:
            if y is None:
                raise ValueError("This BigGAN discriminator is class-conditional: pass class labels y.")
            out = out + (self.embed(y) * h).sum(1)  # projection term <embed(y), phi(x)>
        return out


@register("biggan", "BigGAN (Brock 2018): class-conditional residual G/D, 32-512 px, SN, CBN, "
                    "self-attention, projection D; widths are the channel multiplier ch.")
def build_biggan(z_dim: int, g_width: int, d_width: int, resolution: int, channels: int,
                 g_norm: str = "batch", d_norm: str = "none", num_classes: int = 0, attention_res: int = 64,
                 shared_dim: int = 128, sn_eps: float = 1e-6, class_conditional: bool = True,
                 attention_impl: str = "matmul"):
    if g_norm != "batch" or d_norm != "none":
        raise ValueError(f"BigGAN has conditional BatchNorm in G and no normalisation in D (spectral norm "
                         f"only): set model.g_norm=batch and model.d_norm=none (got {g_norm}, {d_norm}).")
    n = num_classes if class_conditional else 0
    G = BigGANGenerator(z_dim, g_width, resolution, channels, n, shared_dim, attention_res, sn_eps,
                        attention_impl=attention_impl)
    D = BigGANDiscriminator(d_width, resolution, channels, n, attention_res, sn_eps, attention_impl=attention_impl)
    return G, D


def truncated_normal(n: int, dim: int, threshold: float = 0.0, generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
    """Standard normal latents; with threshold T > 0, entries with |z| > T are redrawn until none is
    left (the paper's truncation trick: resampling, not clipping, so no mass piles up at +-T)."""
    z = torch.randn(n, dim, generator=generator, device=device)
    if threshold <= 0:
        return z
    bad = z.abs() > threshold
    while bool(bad.any()):
        z[bad] = torch.randn(int(bad.sum()), generator=generator, device=device)
        bad = z.abs() > threshold
    return z
