"""Multi-scale Glow (Kingma & Dhariwal 2018): an invertible x <-> z with an exact log-density.

Every flow layer maps ``forward(x) -> (y, logdet)`` (logdet per example, in nats) and
``inverse(y) -> x``. The model squeezes, runs L levels of K steps (ActNorm -> 1x1 conv -> coupling)
and after each level but the last factors out half the channels with a learned conditional Gaussian
prior; the top latent has a learned prior, optionally shifted by the class.

Precision: the flow runs with autocast disabled (log-dets, priors, slogdet/inverse and ActNorm stay
in the input dtype, fp32 or fp64); only the coupling networks run under the caller's autocast dtype
(bf16/fp16), and their output is cast back before it scales or shifts anything.

ActNorm's data-dependent init is explicit (``Glow.initialize_actnorm``), never a lazy side effect of
a forward pass: a lazy init inside DDP leaves ranks different, and an uninitialised ActNorm is the
identity (so a fresh model is a well-defined density). Its "initialised" flag is a persistent buffer.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
LOG_2PI = math.log(2 * math.pi)


# ---- helpers ------------------------------------------------------------------------------------


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth: (N, C, H, W) -> (N, 4C, H/2, W/2); each 2x2 patch becomes 4 channels."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logs)^2) summed over all but the batch dimension."""
    lp = -0.5 * (LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))
    return lp.flatten(1).sum(1)


def _amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype the caller is running under on this device, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _spatial(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3]


# ---- ActNorm ------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """y = (x + bias) * exp(logs) per channel; logdet = H*W*sum(logs).

    Identity until initialised. ``_init_reduce`` is set only during ``Glow.initialize_actnorm``; then
    the next forward computes the batch moments (averaged across ranks by the reduce function) and
    sets bias/logs so that the batch has zero mean and unit variance per channel. The forward hot
    path only tests that Python attribute: no device-to-host sync.
    """

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # Persistent so that a loaded checkpoint is never re-initialised.
        self.register_buffer("initialized", torch.tensor(False))
        self._init_reduce: Optional[ReduceFn] = None

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor, reduce_fn: ReduceFn) -> None:
        xd = x.double()
        # First and second moments (not the variance) are averaged across ranks: their mean over
        # equal-sized rank batches is the moment of the union batch.
        moments = torch.stack([xd.mean(dim=(0, 2, 3)), (xd ** 2).mean(dim=(0, 2, 3))])
        mean, sq = reduce_fn(moments)
        std = (sq - mean ** 2).clamp_min(0).sqrt()
        self.bias.copy_((-mean).view_as(self.bias))
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)).view_as(self.logs))
        self.initialized.fill_(True)

    @property
    def initializing(self) -> bool:
        """True inside ``Glow.initialize_actnorm``: the next forward needs this layer's own input."""
        return self._init_reduce is not None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._init_reduce is not None:
            self._data_init(x, self._init_reduce)
            self._init_reduce = None
        logs = self.logs.to(x.dtype)
        y = (x + self.bias.to(x.dtype)) * torch.exp(logs)
        logdet = (_spatial(x) * logs.sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs.to(y.dtype)) - self.bias.to(y.dtype)


# ---- invertible 1x1 convolutions ----------------------------------------------------------------


def _random_rotation(c: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    return q.float()


class InvConv1x1(nn.Module):
    """Plain invertible 1x1 conv: slogdet and the inverse are computed in float64 (the float32
    inverse visibly degrades reconstructions)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(channels))

    def log_abs_det(self, dtype: torch.dtype) -> torch.Tensor:
        """log|det W| (per pixel), from slogdet in float64."""
        return torch.linalg.slogdet(self.weight.double())[1].to(dtype)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.to(x.dtype) if weight is None else weight
        y = F.conv2d(x, w[:, :, None, None])
        return y, (_spatial(x) * self.log_abs_det(x.dtype)).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight.double())
        return F.conv2d(y, w_inv.to(y.dtype)[:, :, None, None])


class InvConv1x1LU(nn.Module):
    """W = P L (U + diag(sign_s * exp(log_s))): P fixed, L unit lower, U strictly upper;
    logdet = H*W*sum(log_s) costs O(C) instead of O(C^3)."""

    def __init__(self, channels: int):
        super().__init__()
        p, lower, upper = torch.linalg.lu(_random_rotation(channels).double())
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mask, eye = self.lower_mask.to(dtype), self.eye.to(dtype)
        lower = self.lower.to(dtype) * mask + eye
        upper = self.upper.to(dtype) * mask.T + torch.diag(self.sign_s.to(dtype) * torch.exp(self.log_s.to(dtype)))
        return self.p.to(dtype) @ lower @ upper

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``weight``: this layer's W already assembled (``lu_weights``), else assembled here."""
        w = self.weight(x.dtype) if weight is None else weight
        y = F.conv2d(x, w[:, :, None, None])
        return y, (_spatial(x) * self.log_abs_det(x.dtype)).expand(x.shape[0])

    def log_abs_det(self, dtype: torch.dtype) -> torch.Tensor:
        """log|det W| = sum(log_s): O(C)."""
        return self.log_s.to(dtype).sum()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight(torch.float64))
        return F.conv2d(y, w_inv.to(y.dtype)[:, :, None, None])


def lu_weights(convs: List[InvConv1x1LU], dtype: torch.dtype) -> torch.Tensor:
    """W = P L U of every layer in ``convs`` (one level: same channel count), stacked (K, C, C) and
    assembled with batched ops: about a dozen kernels per level and direction instead of about ten per
    layer, once per forward pass (with gradient checkpointing too: the steps receive W instead of
    rebuilding it when they are recomputed). Same arithmetic as ``InvConv1x1LU.weight``, so the same
    values up to the summation order of the batched matmul."""
    first = convs[0]
    mask, eye = first.lower_mask.to(dtype), first.eye.to(dtype)
    lower = torch.stack([c.lower for c in convs]).to(dtype) * mask + eye
    diag = torch.stack([c.sign_s for c in convs]).to(dtype) * torch.exp(torch.stack([c.log_s for c in convs]).to(dtype))
    upper = torch.stack([c.upper for c in convs]).to(dtype) * mask.T + torch.diag_embed(diag)
    return torch.stack([c.p for c in convs]).to(dtype) @ lower @ upper


# ---- couplings ----------------------------------------------------------------------------------


def fold_output_scales(layers: List[nn.Module], dtype: Optional[torch.dtype] = None
                       ) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Weights and biases of same-shaped convolutions whose output is shifted and scaled per channel
    (``_ConvActNorm``, ``ZeroConv2d``), with the scale folded in:
        (conv(x, W) + b) * s = conv(x, W * s, b * s),  s = exp(f * logs),
    for all the layers at once in batched ops. A level folds its K steps' layers together, a few ops
    per level instead of a few per layer (glow_cifar10's forward and backward: 4,138 ops folded per
    level, 7,054 folded layer by layer, 7,675 as separate layers, before the log-dets were batched too). ``dtype``: the autocast dtype the convs
    will run in (cast here once for all the layers rather than by each conv)."""
    terms = [m.scaled_conv() for m in layers]  # (W, b, logs, f): views of the parameters
    w, b, logs = (torch.stack(t) for t in list(zip(*terms))[:3])
    factor = terms[0][3]
    scale = torch.exp(logs if factor == 1.0 else logs * factor)
    w, b = w * scale[:, :, None, None, None], b * scale
    if dtype is not None:
        w, b = w.to(dtype), b.to(dtype)
    return w.unbind(0), b.unbind(0)


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 conv whose output is scaled by exp(3 * logs): the step starts as the
    identity and the log-scale factor 3 lets the output scale grow fast (the paper's Zero-conv).

    ``fused`` (Glow.set_fused): the output scale is folded into the weights and bias, one conv instead
    of a conv and an activation-sized multiply (whose backward also kept the conv's output); the
    level passes the fold of all its steps' layers (``weight``, ``bias``), else the layer folds."""

    fused = True

    def __init__(self, in_ch: int, out_ch: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_ch, 1, 1))
        self.logscale_factor = logscale_factor

    def scaled_conv(self):
        return self.conv.weight, self.conv.bias, self.logs.view(-1), self.logscale_factor

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.fused:
            return self.conv(x) * torch.exp(self.logs * self.logscale_factor).to(x.dtype)
        if weight is None:
            (weight,), (bias,) = fold_output_scales([self])
        return F.conv2d(x, weight, bias, padding=1)


class ZeroLinear(nn.Module):
    """Zero-initialised linear with the same exp(3 * logs) output scale (class embeddings, classifier)."""

    def __init__(self, in_f: int, out_f: int, logscale_factor: float = 3.0):
        super().__init__()
        self.linear = nn.Linear(in_f, out_f)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logs = nn.Parameter(torch.zeros(out_f))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.exp(self.logs * self.logscale_factor).to(x.dtype)


class _ConvActNorm(nn.Module):
    """Bias-free conv followed by ActNorm (the coupling network's hidden layers; logdet unused).

    ``fused`` (Glow.set_fused), except while ActNorm initialises (it needs the conv's output): ActNorm
    folded into the conv, (conv(x, W) + b) * s = conv(x, W * s, b * s), by the level for all its steps
    (``weight``, ``bias``) or here. One conv with a bias instead of a conv and two activation-sized
    passes, whose backward also kept the conv's output for ActNorm's gradients; under autocast the
    output stays in the low precision (the next conv casts to it anyway)."""

    fused = True

    def __init__(self, in_ch: int, out_ch: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.norm = ActNorm(out_ch)

    def scaled_conv(self):
        return self.conv.weight, self.norm.bias.view(-1), self.norm.logs.view(-1), 1.0

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm.initializing or not self.fused:
            h = self.conv(x)
            # ActNorm in fp32 even under autocast: its data-dependent init needs accurate moments.
            return self.norm(h.float() if h.dtype in (torch.float16, torch.bfloat16) else h)[0]
        if weight is None:
            (weight,), (bias,) = fold_output_scales([self])
        return F.conv2d(x, weight, bias, padding=self.conv.padding)


FOLDABLE = (_ConvActNorm, ZeroConv2d)  # the coupling network's layers with a foldable output scale


def coupling_net(in_ch: int, out_ch: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(_ConvActNorm(in_ch, hidden, 3), nn.ReLU(),
                         _ConvActNorm(hidden, hidden, 1), nn.ReLU(),
                         ZeroConv2d(hidden, out_ch))


class _Coupling(nn.Module):
    """Base: z1 (first half of the channels) conditions the transform of z2 (second half)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"Coupling layers need an even channel count, got {channels}.")

    def _nn(self, z1: torch.Tensor, amp: Optional[torch.dtype], folded: Optional[list] = None) -> torch.Tensor:
        """The only part of the flow that runs in low precision; output back in z1's dtype. ``folded``:
        (weight, bias) for each FOLDABLE layer in order, from the level (GlowLevel.net_weights)."""
        with torch.autocast(z1.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if folded is None:
                h = self.net(z1)
            else:
                params, h = iter(folded), z1
                for layer in self.net:
                    h = layer(h, *next(params)) if isinstance(layer, FOLDABLE) else layer(h)
        return h.to(z1.dtype)


class AffineCoupling(_Coupling):
    """z2 -> (z2 + shift) * sigmoid(raw + 2) with (shift, raw) = NN(z1) interleaved; sigmoid bounds
    the scale in (0, 1) (exp diverged for users), +2 starts it near 0.88. The log-det is
    logsigmoid(raw + 2): one op like log(sigmoid), and accurate where sigmoid underflows."""

    def __init__(self, channels: int, hidden: int):
        super().__init__(channels)
        self.net = coupling_net(channels // 2, channels, hidden)

    def _shift_logit(self, z1: torch.Tensor, amp, folded=None):
        h = self._nn(z1, amp, folded)
        return h[:, 0::2], h[:, 1::2] + 2.0

    def forward(self, x: torch.Tensor, amp: Optional[torch.dtype] = None, folded: Optional[list] = None):
        z1, z2 = x.chunk(2, dim=1)
        shift, logit = self._shift_logit(z1, amp, folded)
        y2 = (z2 + shift) * torch.sigmoid(logit)
        return torch.cat([z1, y2], dim=1), F.logsigmoid(logit).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, amp: Optional[torch.dtype] = None) -> torch.Tensor:
        z1, y2 = y.chunk(2, dim=1)
        shift, logit = self._shift_logit(z1, amp)
        return torch.cat([z1, y2 / torch.sigmoid(logit) - shift], dim=1)


class AdditiveCoupling(_Coupling):
    """z2 -> z2 + NN(z1): volume preserving (logdet 0)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__(channels)
        self.net = coupling_net(channels // 2, channels // 2, hidden)

    def forward(self, x: torch.Tensor, amp: Optional[torch.dtype] = None, folded: Optional[list] = None):
        z1, z2 = x.chunk(2, dim=1)
        return torch.cat([z1, z2 + self._nn(z1, amp, folded)], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, amp: Optional[torch.dtype] = None) -> torch.Tensor:
        z1, y2 = y.chunk(2, dim=1)
        return torch.cat([z1, y2 - self._nn(z1, amp)], dim=1)


COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling}


class FlowStep(nn.Module):
    """ActNorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, channels: int, hidden: int, coupling: str = "affine", lu: bool = True):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"Unknown coupling '{coupling}'. Valid: {', '.join(COUPLINGS)}.")
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1LU(channels) if lu else InvConv1x1(channels)
        self.coupling = COUPLINGS[coupling](channels, hidden)

    def forward(self, x: torch.Tensor, amp: Optional[torch.dtype] = None, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, logdet: Optional[torch.Tensor] = None, net: Optional[list] = None):
        """``weight``: the 1x1 conv's W assembled by the level (``GlowLevel.conv_weights``), or None
        (the layer assembles it). With ``bias`` and ``logdet`` too, ActNorm is folded in: one conv,
        W diag(s) x + W diag(s) b, replaces ActNorm -> conv, and ``logdet`` is the two layers' log-det
        (data-independent: a 0-dim tensor). ``net``: the coupling network's folded weights
        (``GlowLevel.net_weights``), or None."""
        if bias is None:
            x, ld1 = self.actnorm(x)
            x, ld2 = self.invconv(x, weight)
            logdet = ld1 + ld2
        else:
            x = F.conv2d(x, weight[:, :, None, None], bias)
        x, ld3 = self.coupling(x, amp, net)
        return x, ld3 + logdet

    def inverse(self, y: torch.Tensor, amp: Optional[torch.dtype] = None) -> torch.Tensor:
        y = self.coupling.inverse(y, amp)
        y = self.invconv.inverse(y)
        return self.actnorm.inverse(y)


# ---- the multi-scale model ----------------------------------------------------------------------


class GlowLevel(nn.Module):
    """squeeze -> K steps -> (split with a learned conditional prior, unless last)."""

    fused = True

    def __init__(self, channels: int, steps: int, hidden: int, coupling: str, lu: bool, split: bool):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(channels, hidden, coupling, lu) for _ in range(steps))
        # Zero conv on the kept half -> (mean, logs) of the factored-out half, interleaved.
        self.prior = ZeroConv2d(channels // 2, channels) if split else None

    def conv_weights(self, h: torch.Tensor) -> List[Tuple[Optional[torch.Tensor], ...]]:
        """Each step's (weight, bias, logdet) for ``FlowStep.forward`` on the level's input ``h``, made
        for the whole level at once in batched ops. ``fused`` (Glow.set_fused) once the ActNorms are
        initialised: ActNorm folded into the 1x1 conv, W diag(s) and W diag(s) b, and the two layers'
        log-det, H*W*(sum(log s) + log|det W|). Otherwise (W, None, None), W assembled here for LU
        convs and None for plain ones (the layer uses its own); ActNorm's data-dependent init needs
        its input."""
        dtype, convs = h.dtype, [step.invconv for step in self.steps]
        lu = all(isinstance(c, InvConv1x1LU) for c in convs)
        if not self.fused or any(step.actnorm.initializing for step in self.steps):
            return [(w, None, None) for w in (lu_weights(convs, dtype).unbind(0) if lu else [None] * len(convs))]
        if lu:
            w = lu_weights(convs, dtype)
            log_abs_det = torch.stack([c.log_s for c in convs]).to(dtype).sum(-1)
        else:
            w = torch.stack([c.weight for c in convs])
            log_abs_det = torch.linalg.slogdet(w.double())[1].to(dtype)  # float64, as the layer does
            w = w.to(dtype)
        k, c = w.shape[:2]
        logs = torch.stack([step.actnorm.logs for step in self.steps]).to(dtype).view(k, c)
        w = w * torch.exp(logs).view(k, 1, c)  # scales W's columns: W diag(s)
        bias = (w @ torch.stack([step.actnorm.bias for step in self.steps]).to(dtype).view(k, c, 1)).squeeze(-1)
        logdet = _spatial(h) * (logs.sum(-1) + log_abs_det)
        return list(zip(w.unbind(0), bias.unbind(0), logdet.unbind(0)))

    def net_weights(self, amp: Optional[torch.dtype] = None) -> List[Optional[List[Tuple[torch.Tensor, torch.Tensor]]]]:
        """Each step's coupling network as (weight, bias) per FOLDABLE layer, the output scales folded
        in for the whole level at once (``fold_output_scales``), in the autocast dtype ``amp`` when
        given; None per step with fused off."""
        if not self.fused:
            return [None] * len(self.steps)
        nets = [step.coupling.net for step in self.steps]
        layers = [zip(*fold_output_scales([net[i] for net in nets], amp))
                  for i, layer in enumerate(nets[0]) if isinstance(layer, FOLDABLE)]
        return [list(per_step) for per_step in zip(*layers)]

    def split_params(self, z1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(z1)
        return h[:, 0::2], h[:, 1::2]


class Glow(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 32, levels: int = 3, steps: int = 32,
                 hidden: int = 512, coupling: str = "affine", lu: bool = True, learn_top: bool = True,
                 num_classes: int = 0, classifier: bool = True):
        super().__init__()
        if levels < 1 or steps < 1:
            raise ValueError(f"Glow needs levels >= 1 and steps >= 1, got levels={levels}, steps={steps}.")
        if image_size % (2 ** levels):
            raise ValueError(f"Glow with L={levels} levels needs the image size divisible by 2^L = "
                             f"{2 ** levels}; got {image_size}. Change data.resolution or the level count.")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.n_dims = in_channels * image_size * image_size
        self.checkpointing = False  # gradient checkpointing per flow step (set by the trainer)
        self.levels = nn.ModuleList()
        c, s = in_channels, image_size
        self.latent_shapes: List[Tuple[int, int, int]] = []
        for i in range(levels):
            c, s = c * 4, s // 2
            last = i == levels - 1
            self.levels.append(GlowLevel(c, steps, hidden, coupling, lu, split=not last))
            if not last:
                self.latent_shapes.append((c - c // 2, s, s))
                c = c // 2
        self.latent_shapes.append((c, s, s))
        self.top_shape = (c, s, s)
        self.learn_top = learn_top
        # openai/glow learntop: a zero conv applied to zeros, i.e. learned per-channel (mean, logs).
        self.top_prior = ZeroConv2d(2 * c, 2 * c) if learn_top else None
        self.class_prior = ZeroLinear(num_classes, 2 * c) if num_classes else None
        # Optional so that a run with weight_y = 0 has no parameters without gradients (DDP rejects those).
        self.classifier = ZeroLinear(c, num_classes) if num_classes and classifier else None

    # ---- priors ---------------------------------------------------------------------------------
    def _check_y(self, y: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        if self.num_classes and y is None:
            raise ValueError("This Glow is class-conditional: pass y (int64 labels).")
        if not self.num_classes:
            return None
        return y.to(torch.long).expand(n) if y.dim() == 0 else y.to(torch.long)

    def top_params(self, n: int, y: Optional[torch.Tensor], dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
        c, s, _ = self.top_shape
        h = torch.zeros(n, 2 * c, s, s, dtype=dtype, device=device)
        if self.top_prior is not None:
            h = self.top_prior(h)
        if self.class_prior is not None:
            onehot = F.one_hot(y, self.num_classes).to(dtype)
            h = h + self.class_prior(onehot)[:, :, None, None]
        return h[:, :c], h[:, c:]

    def class_logits(self, z_top: torch.Tensor) -> Optional[torch.Tensor]:
        """Classifier head on the spatial mean of the top latent (openai/glow's ycond classifier)."""
        return self.classifier(z_top.mean(dim=(2, 3))) if self.classifier is not None else None

    # ---- forward / inverse ----------------------------------------------------------------------
    def _run_step(self, step: Callable, h: torch.Tensor, amp, conv: tuple, net=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``step``: a FlowStep, or a callable that runs one (a compiled wrapper); ``conv``: the step's
        (weight, bias, logdet) from ``GlowLevel.conv_weights``."""
        if self.checkpointing and torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(step, h, amp, *conv, net, use_reentrant=False)
        return step(h, amp, *conv, net)

    def _check_x(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"Glow was built for inputs of shape (N, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(x.shape)}.")

    def _encode(self, x: torch.Tensor, y: Optional[torch.Tensor],
                step_fns: Optional[Sequence[Sequence[Callable]]] = None):
        """-> latents, priors [(mean, logs)] per latent, log p(x) per example. ``step_fns``: per level,
        per step, a callable that runs that step in its place (the trainer's compiled wrappers with
        trainer.compile_scope=block); the steps themselves when None."""
        self._check_x(x)
        amp = _amp_dtype(x.device)
        y = self._check_y(y, x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            logp = x.new_zeros(x.shape[0])
            latents, priors = [], []
            h = x
            for i, level in enumerate(self.levels):
                h = squeeze2d(h)
                logdets = []
                steps = level.steps if step_fns is None else step_fns[i]
                for step, conv, net in zip(steps, level.conv_weights(h), level.net_weights(amp)):
                    h, ld = self._run_step(step, h, amp, conv, net)
                    logdets.append(ld)
                logp = logp + torch.stack(logdets).sum(0)  # one sum per level, not an add per step
                if level.prior is not None:
                    h, z2 = h.chunk(2, dim=1)
                    mean, logs = level.split_params(h)
                    logp = logp + gaussian_log_prob(z2, mean, logs)
                    latents.append(z2)
                    priors.append((mean, logs))
            mean, logs = self.top_params(x.shape[0], y, h.dtype, h.device)
            logp = logp + gaussian_log_prob(h, mean, logs)
            latents.append(h)
            priors.append((mean, logs))
        return latents, priors, logp

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                step_fns: Optional[Sequence[Sequence[Callable]]] = None):
        """-> (log p(x) in nats per example, class logits or None). ``step_fns``: see ``_encode``."""
        latents, _, logp = self._encode(x, y, step_fns)
        with torch.autocast(x.device.type, enabled=False):
            return logp, self.class_logits(latents[-1])

    def log_prob(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x | y) in nats per example, for continuous x (all log-dets and prior terms)."""
        return self._encode(x, y)[2]

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, return_priors: bool = False):
        """Latents: the factored-out half of every level (finest first), then the top latent.
        With return_priors, also the (mean, logs) of each latent's prior."""
        latents, priors, _ = self._encode(x, y)
        return (latents, priors) if return_priors else latents

    def split_eps(self, eps: torch.Tensor) -> List[torch.Tensor]:
        """(N, D) standard-normal noise -> one tensor per latent, shaped like ``latent_shapes``."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        return [e.reshape(-1, *s) for e, s in zip(eps.split(sizes, dim=1), self.latent_shapes)]

    def _reverse(self, latents: Optional[List[torch.Tensor]], y, n: int, temperature: float,
                 generator: Optional[torch.Generator], dtype, device,
                 eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Top-down inverse. A given latent is used as is; a missing one (sampling) is drawn from its
        prior with the std scaled by the temperature, from ``eps`` (N, D) when given."""
        amp = _amp_dtype(torch.device(device))
        y = self._check_y(y, n) if latents is None else None  # given latents: the class plays no part
        noise = self.split_eps(eps.to(device=device, dtype=dtype)) if eps is not None else None

        def draw(mean, logs, index):
            if noise is not None:
                e = noise[index]
            else:
                e = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            return mean + temperature * torch.exp(logs) * e

        with torch.autocast(torch.device(device).type, enabled=False):
            if latents is not None:
                h = latents[-1]
            else:
                h = draw(*self.top_params(n, y, dtype, device), len(self.levels) - 1)
            for i in reversed(range(len(self.levels))):
                level = self.levels[i]
                if level.prior is not None:
                    z2 = latents[i] if latents is not None else draw(*level.split_params(h), i)
                    h = torch.cat([h, z2], dim=1)
                for step in reversed(level.steps):
                    h = step.inverse(h, amp)
                h = unsqueeze2d(h)
        return h

    def decode(self, latents: List[torch.Tensor], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x from the latents of ``encode``. y is accepted for symmetry; the bijection ignores it."""
        if len(latents) != len(self.latent_shapes):
            raise ValueError(f"decode needs {len(self.latent_shapes)} latents, got {len(latents)}.")
        z = latents[-1]
        return self._reverse(latents, y, z.shape[0], 1.0, None, z.dtype, z.device)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x = f(z) with every prior's std scaled by ``temperature`` (0: the prior means). ``eps``:
        optional fixed (n, D) standard-normal noise (fixed sample grids across training)."""
        p = next(self.parameters())
        if y is not None:
            y = torch.as_tensor(y, device=p.device)
        return self._reverse(None, y, n, temperature, generator, p.dtype, p.device, eps)

    @torch.no_grad()
    def interpolate(self, xa: torch.Tensor, xb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decodes (1 - w) z(xa) + w z(xb) for each weight w, interpolating every level's latent (a
        resampled factored-out latent would not reproduce the endpoints). xa, xb: (1, C, H, W)."""
        # The class only enters the top prior, not the bijection: any label gives the same latents.
        y = torch.zeros(1, dtype=torch.long, device=xa.device) if self.num_classes else None
        za, zb = self.encode(xa, y), self.encode(xb, y)
        w = weights.to(device=xa.device, dtype=xa.dtype).view(-1, 1, 1, 1)
        return self.decode([(1 - w) * a + w * b for a, b in zip(za, zb)])

    def set_fused(self, on: bool) -> None:
        """Fold ActNorm into the adjacent convolutions and the zero convs' output scales into their
        weights (on, the default), or run them as separate layers (the arithmetic of the paper's
        code, kept to measure against: flow.fused). Same function and parameters either way."""
        for m in self.modules():
            if isinstance(m, (GlowLevel, _ConvActNorm, ZeroConv2d)):
                m.fused = on

    # ---- ActNorm init ---------------------------------------------------------------------------
    def actnorms(self) -> List[ActNorm]:
        return [m for m in self.modules() if isinstance(m, ActNorm)]

    def actnorm_initialized(self) -> bool:
        return all(bool(m.initialized) for m in self.actnorms())

    @torch.no_grad()
    def initialize_actnorm(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                           reduce_fn: Optional[ReduceFn] = None) -> None:
        """Data-dependent init of every not-yet-initialised ActNorm, in flow order, on batch x.

        ``reduce_fn(t)`` must return the mean of t over ranks (e.g. all_reduce(SUM) / world size);
        every rank then computes identical parameters. Call it on every rank before DDP wraps the
        model (DDP broadcasts parameters only at construction)."""
        reduce_fn = reduce_fn or (lambda t: t)
        pending = [m for m in self.actnorms() if not bool(m.initialized)]
        for m in pending:
            m._init_reduce = reduce_fn
        try:
            self._encode(x, y if self.num_classes else None)
        finally:
            for m in pending:
                m._init_reduce = None


FLOWS: Dict[str, Callable[..., nn.Module]] = {}
FLOW_DESCRIPTIONS: Dict[str, str] = {}


def register_flow(name: str, description: str):
    def deco(fn):
        FLOWS[name] = fn
        FLOW_DESCRIPTIONS[name] = description
        return fn
    return deco


def build_flow(name: str, **kwargs) -> nn.Module:
    if name not in FLOWS:
        raise KeyError(f"Unknown flow model '{name}'. Valid flow models: {', '.join(sorted(FLOWS))}.")
    return FLOWS[name](**kwargs)


@register_flow("glow", "Multi-scale Glow (affine or additive coupling, LU or plain 1x1 conv).")
def build_glow(channels: int, resolution: int, levels: int = 3, steps: int = 32, hidden: int = 512,
               coupling: str = "affine", lu: bool = True, learn_top: bool = True, num_classes: int = 0,
               classifier: bool = True) -> Glow:
    return Glow(channels, resolution, levels, steps, hidden, coupling, lu, learn_top, num_classes, classifier)
