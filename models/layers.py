"""Building blocks shared by GAN architectures: spectral norm, conditional BatchNorm, self-attention.

Spectral norm is our own (as in BigGAN-PyTorch) rather than torch.nn.utils.parametrizations: the
weight stays a plain parameter named ``weight`` (so orthogonal regularisation and EMA see the raw
weight), and the power-iteration vector ``u`` is a buffer, so it is checkpointed, copied into
G_ema and broadcast by the gan_ddp strategy like BatchNorm statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpectralNormMixin:
    """W / sigma(W) with sigma from one power iteration per forward pass in training mode.

    W is viewed as (out, in * k * k). ``u`` (out,) is updated in training mode only; in eval mode the
    stored ``u`` gives sigma without changing state, so evaluation never moves the estimate.
    """

    weight: torch.Tensor

    def _init_sn(self, n_rows: int, eps: float, power_iters: int = 1) -> None:
        self.sn_eps, self.sn_iters = eps, power_iters
        self.register_buffer("u", F.normalize(torch.randn(n_rows), dim=0, eps=eps))

    def sn_weight(self) -> torch.Tensor:
        W = self.weight.flatten(1)
        with torch.no_grad():  # u and v are constants for the gradient, as in Miyato et al.
            u = self.u
            for _ in range(self.sn_iters):
                v = F.normalize(u @ W.to(u.dtype), dim=0, eps=self.sn_eps)
                u = F.normalize(W.to(u.dtype) @ v, dim=0, eps=self.sn_eps)
            if self.training:
                self.u.copy_(u)
        # W @ v runs in autocast's low precision; the dot is taken in u's precision, as CUDA autocast
        # promotes it (CPU autocast does not promote, and torch.dot refuses mixed dtypes).
        sigma = torch.dot(u, (W @ v.to(W.dtype)).to(u.dtype))
        return self.weight / sigma


class SNConv2d(nn.Conv2d, SpectralNormMixin):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1, bias: bool = True,
                 eps: float = 1e-6):
        super().__init__(cin, cout, kernel_size, padding=padding, bias=bias)
        self._init_sn(cout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.sn_weight(), self.bias)


class SNLinear(nn.Linear, SpectralNormMixin):
    def __init__(self, fin: int, fout: int, bias: bool = True, eps: float = 1e-6):
        super().__init__(fin, fout, bias=bias)
        self._init_sn(fout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNormMixin):
    """The projection discriminator's class embedding (spectrally normalised in BigGAN's D)."""

    def __init__(self, num: int, dim: int, eps: float = 1e-6):
        super().__init__(num, dim)
        self._init_sn(num, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.embedding(y, self.sn_weight())


def spectral_layers(module: nn.Module):
    """Every spectrally normalised layer in ``module``."""
    return [m for m in module.modules() if isinstance(m, SpectralNormMixin)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then per-sample gain (1 + W_g c) and bias W_b c, where c is
    the conditioning vector ([shared class embedding, z chunk] in BigGAN) and W_g, W_b are bias-free
    spectrally normalised linear layers. The "1 +" keeps an untrained layer close to plain BN."""

    def __init__(self, channels: int, cond_dim: int, sn_eps: float = 1e-6, bn_eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=bn_eps)
        self.gain = SNLinear(cond_dim, channels, bias=False, eps=sn_eps)
        self.bias = SNLinear(cond_dim, channels, bias=False, eps=sn_eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gain = 1.0 + self.gain(c)
        return self.bn(x) * gain[:, :, None, None] + self.bias(c)[:, :, None, None]


ATTENTION_IMPLS = ("matmul", "sdpa")


def attend_sdpa(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g weighted by softmax(theta^T phi) over phi's positions, with F.scaled_dot_product_attention (one
    head, scale 1 as SAGAN): a fused kernel that never writes the (hw x hw/4) map, which the matmul form
    materialises (and autocast keeps in fp32 for its softmax). (n, c8, hw), (n, c8, hw4), (n, c2, hw4)
    -> (n, c2, hw)."""
    q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (theta, phi, g))
    # Memory-efficient kernels want head sizes in multiples of 8; zero columns change neither q.k nor
    # the output's first c2 columns.
    pad_qk, pad_v = -q.shape[-1] % 8, -v.shape[-1] % 8
    if pad_qk:
        q, k = F.pad(q, (0, pad_qk)), F.pad(k, (0, pad_qk))
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad_v)) if pad_v else v, scale=1.0)
    return out[..., : g.shape[1]].squeeze(1).transpose(1, 2)


class SelfAttention(nn.Module):
    """SAGAN's non-local block: theta/phi (C/8) and g (C/2) 1x1 convs, phi and g max-pooled 2x2,
    softmax attention over positions, a 1x1 conv back to C, scaled by a learned gamma starting at 0
    (so a new block is the identity). ``impl``: matmul (explicit, as the reference) or sdpa (the same
    attention by a fused kernel; same parameters, so checkpoints are interchangeable)."""

    def __init__(self, ch: int, sn_eps: float = 1e-6, impl: str = "matmul"):
        super().__init__()
        if ch < 8:
            raise ValueError(f"Self-attention needs at least 8 channels (it projects to C/8), got {ch}: "
                             "widen the network or move or disable the attention (model.attention_res).")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown model.attention_impl '{impl}'. Valid: {', '.join(ATTENTION_IMPLS)}.")
        self.impl = impl
        conv = lambda cin, cout: SNConv2d(cin, cout, 1, padding=0, bias=False, eps=sn_eps)  # noqa: E731
        self.theta, self.phi, self.g = conv(ch, ch // 8), conv(ch, ch // 8), conv(ch, ch // 2)
        self.o = conv(ch // 2, ch)
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, impossible for 0-dim
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)                      # (n, c/8, hw)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)         # (n, c/8, hw/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)             # (n, c/2, hw/4)
        if self.impl == "sdpa":
            o = attend_sdpa(theta, phi, g)
        else:
            attn = torch.softmax(theta.transpose(1, 2) @ phi, -1)  # (n, hw, hw/4)
            o = g @ attn.transpose(1, 2)
        return x + self.gamma * self.o(o.reshape(n, c // 2, h, w))
