"""DCGAN-style generator and discriminator (Radford et al. 2016) for 8-64 px images.

G: z -> linear -> 4x4 feature map -> stride-2 transposed convs (norm + ReLU) -> tanh.
D: stride-2 convs with LeakyReLU(0.2), no norm on the first layer -> linear score (a logit for the
non-saturating loss, an unbounded critic value for WGAN). The critic's norm is selectable because
WGAN-GP's per-sample gradient penalty is invalid with BatchNorm (the paper uses layer norm).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.registry import register


def _levels(resolution: int) -> int:
    n = int(round(math.log2(resolution))) - 2
    if resolution not in (8, 16, 32, 64):
        raise ValueError(f"DCGAN supports resolutions 8, 16, 32 and 64, got {resolution}.")
    return n


class LayerNorm2d(nn.GroupNorm):
    """Layer norm over (C, H, W) per sample, as in the WGAN-GP critic, computed in fp32 whatever the
    input's dtype (as fairseq's Fp32GroupNorm). With 16-bit weights (DeepSpeed's fp16 engines) the
    gradient penalty differentiates D twice, and group norm's double-backward formula then runs in
    fp16: rstd^3 overflows once activations have std below about 0.025 (0.009 at DCGAN's init), and
    every penalty is NaN. In fp32 the result is cast back, so the next conv keeps its dtype. Same
    parameters and state_dict keys as nn.GroupNorm(1, ch)."""

    def __init__(self, ch: int):
        super().__init__(1, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.group_norm(x.float(), 1, w, b, self.eps).to(x.dtype)


def _norm2d(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "layer":
        return LayerNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown norm '{kind}'. Valid: batch, layer, none.")


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's init: conv weights N(0, 0.02), norm gains N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim: int = 100, width: int = 64, resolution: int = 32, channels: int = 1,
                 norm: str = "batch"):
        super().__init__()
        n = _levels(resolution)
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        ch = [width * 2 ** (n - 1 - i) for i in range(n)] + [channels]
        self.fc = nn.Linear(z_dim, ch[0] * 16, bias=norm != "batch")
        self.fc_act = nn.Sequential(_norm2d(norm, ch[0]), nn.ReLU(True))
        blocks = []
        for i in range(n - 1):
            blocks += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=norm != "batch"),
                       _norm2d(norm, ch[i + 1]), nn.ReLU(True)]
        blocks += [nn.ConvTranspose2d(ch[n - 1], channels, 4, 2, 1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, 4, 4)
        return self.blocks(self.fc_act(h))


class DCGANDiscriminator(nn.Module):
    def __init__(self, width: int = 64, resolution: int = 32, channels: int = 1, norm: str = "batch"):
        super().__init__()
        n = _levels(resolution)
        ch = [channels] + [width * 2 ** i for i in range(n)]
        layers = [nn.Conv2d(ch[0], ch[1], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for i in range(1, n):
            layers += [nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1, bias=norm != "batch"),
                       _norm2d(norm, ch[i + 1]), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(ch[n] * 16, 1)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x).flatten(1)).squeeze(1)


@register("dcgan", "DCGAN-style conv G and D for 8-64 px (vanilla GAN, WGAN, WGAN-GP).")
def build_dcgan(z_dim: int, g_width: int, d_width: int, resolution: int, channels: int,
                g_norm: str = "batch", d_norm: str = "batch", num_classes: int = 0):
    G = DCGANGenerator(z_dim, g_width, resolution, channels, g_norm)
    D = DCGANDiscriminator(d_width, resolution, channels, d_norm)
    return G, D
