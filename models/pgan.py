"""Progressive GAN (Karras et al. 2018): G and D that grow from 4x4 by doubling the resolution.

Both networks hold every block up to the final resolution from the start; ``forward(.., level, alpha)``
runs the blocks up to ``level`` (0: the start resolution). While a new block fades in (alpha < 1) its
output is blended with the old path: G's previous to-RGB output upsampled (nearest), D's previous
from-RGB of the input downsampled (2x2 average). With alpha = 0 the networks therefore compute
exactly what the previous level computed, so growing never jolts training.

Layers use the equalised learning rate: weights are stored N(0, 1) and multiplied at run time by
He's constant gain / sqrt(fan_in), so Adam's per-parameter step sizes act on a uniform scale.
Feature maps at stage s (resolution 2^(s+1)) are min(fmap_base / 2^s, fmap_max), as the reference.

``fused_scale`` (the official code's default, True) folds the resampling into the convolution next to it,
as the reference's `upscale2d_conv2d` / `conv2d_downscale2d`: G's nearest 2x upsampling followed by a 3x3
conv is one stride-2 transposed conv with a 4x4 kernel (the same function, 4 instead of 9 multiply-adds
per output pixel, and no upsampled tensor), and D's 3x3 conv followed by 2x2 average pooling is one
stride-2 4x4 conv (16 multiply-adds per output pixel instead of 36 at twice the resolution). In D the
leaky ReLU then follows the pooling, as in the official code; False keeps the separate ops and D's
activation before the pooling (pytorch_GAN_zoo's order).
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register

SQRT2 = math.sqrt(2.0)


class EqualizedLinear(nn.Module):
    def __init__(self, fin: int, fout: int, gain: float = SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin))
        self.bias = nn.Parameter(torch.zeros(fout))
        self.scale = gain / math.sqrt(fin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, gain: float = SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """forward(nearest 2x upsampling of x) in one transposed convolution."""
        w = _shift_sum(self.weight * self.scale).flip(2, 3).transpose(0, 1)  # conv_transpose: (cin, cout, kh, kw)
        return F.conv_transpose2d(x, w, self.bias, stride=2, padding=1)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """2x2 average pooling of forward(x) in one strided convolution."""
        return F.conv2d(x, _shift_sum(self.weight * self.scale) * 0.25, self.bias, stride=2, padding=1)


def _shift_sum(w: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel summed over the four 2x2 shifts, (..., 3, 3) -> (..., 4, 4). Output pixel (2i+a, 2j+b)
    of conv(upsampled x) reads x only at rows i-1..i+1 with kernel rows merged pairwise by the upsampling,
    and a pooled conv output sums the kernel at four shifts; both are this 4x4 kernel (flipped for the
    transposed conv)."""
    assert w.shape[-2:] == (3, 3), "fused resampling needs 3x3 kernels"
    w = F.pad(w, (1, 1, 1, 1))
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each pixel's feature vector scaled to unit mean square (dim 1: channels or latent entries)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def mbstd_group(n: int, group: int) -> int:
    """The group size used for a batch of n: ``group`` when it divides n, else the largest divisor of n
    below it (the reference needs n divisible by the group; accumulation can make odd micro-batches)."""
    g = min(group, n)
    while n % g:
        g -= 1
    return g


def minibatch_stddev(x: torch.Tensor, group: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Appends one channel: the std over each group of samples, per feature and pixel, averaged over
    features and pixels. Sample i belongs to group i mod (n / group), as in the reference."""
    n, c, h, w = x.shape
    g = mbstd_group(n, group)
    y = x.float().view(g, n // g, c, h, w)
    y = (y - y.mean(dim=0)).pow(2).mean(dim=0)               # variance over the group
    y = (y + eps).sqrt().mean(dim=(1, 2, 3))                 # (n/g,)
    y = y.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


def fmaps(stage: int, fmap_base: int, fmap_max: int) -> int:
    return min(int(fmap_base / 2.0 ** stage), fmap_max)


def num_levels(start_resolution: int, resolution: int) -> int:
    """Resolutions start, 2 start, ..., resolution; both powers of two, start >= 4."""
    ok = lambda r: r >= 4 and r & (r - 1) == 0  # noqa: E731
    if not (ok(start_resolution) and ok(resolution) and start_resolution <= resolution):
        raise ValueError(f"PGAN needs power-of-two resolutions with 4 <= start <= final, got start "
                         f"{start_resolution} and final {resolution}.")
    return int(math.log2(resolution // start_resolution)) + 1


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


Alpha = Union[float, torch.Tensor]


def fading(alpha: Alpha) -> bool:
    """Whether the new block is still blended in. A float alpha >= 1 means faded in (exactly the new
    path). A tensor alpha (0-dim, what training passes during a fade-in) always blends: torch.compile
    then keeps one graph per (level, fade) instead of specialising on each step's float value."""
    return torch.is_tensor(alpha) or alpha < 1.0


def _fade(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    # old + alpha * (new - old) is exactly old at alpha = 0; a faded-in block skips the blend (exactly new)
    return old + alpha * (new - old) if fading(alpha) else new


class PGANGenerator(nn.Module):
    def __init__(self, z_dim: int = 512, resolution: int = 32, channels: int = 3, start_resolution: int = 4,
                 fmap_base: int = 8192, fmap_max: int = 512, fused_scale: bool = True):
        super().__init__()
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.fused_scale = fused_scale
        self.levels = num_levels(start_resolution, resolution)
        stage0 = int(math.log2(start_resolution)) - 1
        nf = [fmaps(stage0 + i, fmap_base, fmap_max) for i in range(self.levels)]
        self.start = start_resolution
        # first dense gain sqrt(2)/4 (the reference): its output is reshaped to 4x4 = 16 positions
        self.dense = EqualizedLinear(z_dim, nf[0] * 16, gain=SQRT2 / 4)
        self.conv0 = EqualizedConv2d(nf[0], nf[0], 3)
        self.blocks = nn.ModuleList([nn.ModuleList() for _ in range(self.levels)])
        for i in range(1, self.levels):  # level 0 starting above 4 px: extra 3x3 pairs before it
            self.blocks[i].extend([EqualizedConv2d(nf[i - 1], nf[i], 3), EqualizedConv2d(nf[i], nf[i], 3)])
        self.pre = nn.ModuleList([EqualizedConv2d(nf[0], nf[0], 3) for _ in range(stage0 - 1) for _ in range(2)])
        self.to_rgb = nn.ModuleList([EqualizedConv2d(c, channels, 1, gain=1.0) for c in nf])

    def _base(self, z: torch.Tensor) -> torch.Tensor:
        h = _lrelu(self.dense(pixel_norm(z))).view(z.shape[0], -1, 4, 4)
        h = pixel_norm(_lrelu(self.conv0(pixel_norm(h))))
        for k in range(0, len(self.pre), 2):  # up to the start resolution
            h = self._up_pair(self.pre[k], self.pre[k + 1], h)
        return h

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self._up_pair(*self.blocks[i], h)

    def _up_pair(self, conv0: EqualizedConv2d, conv1: EqualizedConv2d, h: torch.Tensor) -> torch.Tensor:
        h = conv0.up(h) if self.fused_scale else conv0(F.interpolate(h, scale_factor=2, mode="nearest"))
        return pixel_norm(_lrelu(conv1(pixel_norm(_lrelu(h)))))

    def forward(self, z: torch.Tensor, level: Optional[int] = None, alpha: Alpha = 1.0) -> torch.Tensor:
        """Images at resolution start * 2^level (default: the final one, fully faded in); ``alpha`` a float
        or a 0-dim tensor (see ``fading``)."""
        level = self.levels - 1 if level is None else int(level)
        h = self._base(z)
        for i in range(1, level):
            h = self._block(i, h)
        if level == 0:
            return self.to_rgb[0](h)
        new = self.to_rgb[level](self._block(level, h))
        if not fading(alpha):
            return new
        return _fade(F.interpolate(self.to_rgb[level - 1](h), scale_factor=2, mode="nearest"), new, alpha)


class PGANDiscriminator(nn.Module):
    def __init__(self, resolution: int = 32, channels: int = 3, start_resolution: int = 4, fmap_base: int = 8192,
                 fmap_max: int = 512, mbstd_group: int = 4, fused_scale: bool = True):
        super().__init__()
        self.levels = num_levels(start_resolution, resolution)
        self.group, self.fused_scale = mbstd_group, fused_scale
        stage0 = int(math.log2(start_resolution)) - 1
        nf = [fmaps(stage0 + i, fmap_base, fmap_max) for i in range(self.levels)]
        self.from_rgb = nn.ModuleList([EqualizedConv2d(channels, c, 1) for c in nf])
        self.blocks = nn.ModuleList([nn.ModuleList() for _ in range(self.levels)])
        for i in range(1, self.levels):
            self.blocks[i].extend([EqualizedConv2d(nf[i], nf[i], 3), EqualizedConv2d(nf[i], nf[i - 1], 3)])
        self.post = nn.ModuleList([EqualizedConv2d(nf[0], nf[0], 3) for _ in range(stage0 - 1) for _ in range(2)])
        top = fmaps(1, fmap_base, fmap_max)  # the 4x4 block's width (stage 1)
        self.conv_top = EqualizedConv2d(nf[0] + 1, top, 3)
        self.dense1 = EqualizedLinear(top * 16, fmaps(0, fmap_base, fmap_max))
        self.dense2 = EqualizedLinear(fmaps(0, fmap_base, fmap_max), 1, gain=1.0)

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self._down_pair(*self.blocks[i], h)

    def _down_pair(self, conv0: EqualizedConv2d, conv1: EqualizedConv2d, h: torch.Tensor) -> torch.Tensor:
        h = _lrelu(conv0(h))
        return _lrelu(conv1.down(h)) if self.fused_scale else F.avg_pool2d(_lrelu(conv1(h)), 2)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        for k in range(0, len(self.post), 2):  # from the start resolution down to 4x4
            h = self._down_pair(self.post[k], self.post[k + 1], h)
        h = _lrelu(self.conv_top(minibatch_stddev(h, self.group)))
        return self.dense2(_lrelu(self.dense1(h.flatten(1)))).squeeze(1)

    def forward(self, x: torch.Tensor, level: Optional[int] = None, alpha: Alpha = 1.0) -> torch.Tensor:
        """Critic scores (N,) of images at resolution start * 2^level (default: the final one); ``alpha``
        a float or a 0-dim tensor (see ``fading``)."""
        level = self.levels - 1 if level is None else int(level)
        h = _lrelu(self.from_rgb[level](x))
        if level > 0:
            h = self._block(level, h)
            if fading(alpha):
                h = _fade(_lrelu(self.from_rgb[level - 1](F.avg_pool2d(x, 2))), h, alpha)
        for i in range(level - 1, 0, -1):
            h = self._block(i, h)
        return self._head(h)


def level_resolutions(start_resolution: int, resolution: int) -> List[int]:
    return [start_resolution * 2 ** i for i in range(num_levels(start_resolution, resolution))]


@register("pgan", "Progressive GAN: G and D grown from 4x4 with fade-in, equalised lr, pixel norm, mbstd.")
def build_pgan(z_dim: int, resolution: int, channels: int, start_resolution: int = 4, fmap_base: int = 8192,
               fmap_max: int = 512, mbstd_group: int = 4, fused_scale: bool = True):
    G = PGANGenerator(z_dim, resolution, channels, start_resolution, fmap_base, fmap_max, fused_scale)
    D = PGANDiscriminator(resolution, channels, start_resolution, fmap_base, fmap_max, mbstd_group, fused_scale)
    return G, D
