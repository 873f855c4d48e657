"""GAN objectives as pure functions of discriminator outputs (logits / critic scores).

Each loss has a D side (real, fake scores -> scalar) and a G side (fake scores -> scalar).
Means over the batch everywhere, so changing the batch size never rescales a coefficient.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, NamedTuple

import torch
import torch.nn.functional as F


class GANLoss(NamedTuple):
    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]
    uses_gp: bool = False
    clips_weights: bool = False


def ns_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), in the stable softplus form."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def ns_g(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(D(G(z)))."""
    return F.softplus(-fake).mean()


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def wgan_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Critic minimises E[D(G(z))] - E[D(x)] (the negative Wasserstein estimate)."""
    return fake.mean() - real.mean()


def wgan_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


LOSSES: Dict[str, GANLoss] = {
    "nonsaturating": GANLoss(ns_d, ns_g),
    "hinge": GANLoss(hinge_d, hinge_g),
    "wgan": GANLoss(wgan_d, wgan_g, clips_weights=True),
    "wgan_gp": GANLoss(wgan_d, wgan_g, uses_gp=True),
}


def get_loss(name: str) -> GANLoss:
    if name not in LOSSES:
        raise KeyError(f"Unknown loss '{name}'. Valid: {', '.join(sorted(LOSSES))}.")
    return LOSSES[name]


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, eps: torch.Tensor, dtype: torch.dtype = torch.float32,
                     autocast: bool = False) -> torch.Tensor:
    """mean over samples of (||grad_x D(x_hat)||_2 - 1)^2, x_hat = eps * real + (1 - eps) * fake.

    Computed with autocast off, in ``dtype``: fp32 unless the critic's weights themselves are
    16-bit (DeepSpeed's fp16 engines), where x_hat must match them. The squared norm of
    low-precision gradients is the usual source of NaNs in WGAN-GP under AMP, so the norm is
    always taken in fp32. ``autocast``: leave the caller's autocast on for the critic (bf16 only,
    faster, as in a step wrapped whole in autocast; the config refuses it with fp16). ``eps`` has
    shape (N,) and is drawn by the caller so that its random stream is owned (and checkpointed) by the
    training module.

    The input gradient comes from torch.func.vjp rather than autograd.grad(create_graph=True): the
    same operations (equal results, tests/unit/test_losses.py), but traceable, so torch.compile takes
    the critic's forward, its input gradient and the norm into one graph whose backward is the
    penalty's double backward (autograd.grad breaks the graph, and a compiled graph's backward cannot
    be differentiated again).
    """
    with contextlib.nullcontext() if autocast else torch.autocast(device_type=real.device.type, enabled=False):
        e = eps.float().view(-1, *([1] * (real.dim() - 1)))
        x_hat = (e * real.float() + (1 - e) * fake.detach().float()).to(dtype)
        out, vjp = torch.func.vjp(lambda x: critic(x).float(), x_hat)
        (grad,) = vjp(torch.ones_like(out))  # d sum(out) / d x_hat, as autograd.grad(out.sum(), x_hat)
        norm = grad.float().flatten(1).norm(2, dim=1)
        return ((norm - 1.0) ** 2).mean()


def drift_penalty(real: torch.Tensor) -> torch.Tensor:
    """Progressive GAN's drift term mean(D(x)^2), keeping critic scores near zero."""
    return real.float().pow(2).mean()


@torch.no_grad()
def clip_weights(module: torch.nn.Module, bound: float) -> None:
    """WGAN's crude Lipschitz constraint: every parameter clamped to [-bound, bound]."""
    for p in module.parameters():
        p.clamp_(-bound, bound)


def ortho_params(module: torch.nn.Module) -> list:
    """The weights BigGAN's orthogonal regularisation covers: every parameter with >= 2 dimensions
    except embeddings (the shared class embedding is excluded in the paper)."""
    skip = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return [p for p in module.parameters() if p.ndim >= 2 and id(p) not in skip]


def ortho_reg(params, beta: float) -> torch.Tensor:
    """BigGAN's modified orthogonal regularisation beta * sum_W ||W W^T * (1 - I)||_F^2, W a weight
    viewed as (out, in * k * k): it pushes filters towards mutual orthogonality without constraining
    their norms. Its gradient is 4 * beta * (W W^T * (1 - I)) W (BigGAN-PyTorch adds 2 * beta * ... to
    the gradient directly, i.e. half of this; we follow the paper's definition)."""
    total = None
    # 16-bit weights (DeepSpeed's fp16 engines) are read in fp32. Under autocast the Gram matmul still runs
    # in autocast's dtype, like every matmul of the step (BigGAN-128's G: 0.6 of 88 TFLOP per iteration).
    for p in params:
        w = p.flatten(1).to(torch.promote_types(p.dtype, torch.float32))
        gram = w @ w.t()
        off = gram - torch.diag_embed(torch.diagonal(gram))
        term = off.pow(2).sum()
        total = term if total is None else total + term
    return beta * total if total is not None else torch.zeros(())
