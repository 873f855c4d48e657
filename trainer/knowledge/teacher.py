"""Teacher construction as pure functions (posterior regularisation's E-step and the student losses).

Categorical (enumerable y):  log q = log p + score, renormalised; score = lambda f, or for rules
    -C sum_l lambda_l (1 - r_l); hard rules mask classes to -inf.
Samples (Glow, GAN generators): self-normalised importance weights w = softmax(lambda f(x_i)) over
    samples x_i ~ p_theta, in fp32 and over all ranks' samples.
Learned constraints: the max-ent IRL loss whose autograd gradient is lambda (E_data grad f - E_q grad f).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---- categorical teacher ------------------------------------------------------------------------


@dataclass
class CategoricalTeacher:
    log_q: torch.Tensor    # (B, K) log teacher probabilities (detached)
    fallback: torch.Tensor  # (B,) bool: every class was masked, so the row fell back to p

    @property
    def q(self) -> torch.Tensor:
        return self.log_q.exp()


def rule_score(rules: torch.Tensor, lambdas: torch.Tensor, C: float) -> torch.Tensor:
    """-C sum_l lambda_l (1 - r_l(x, y)): rules (B, K, L) soft values in [0, 1], lambdas (L,)."""
    return -C * ((1.0 - rules) * lambdas).sum(-1)


def categorical_teacher(logits: torch.Tensor, score: Optional[torch.Tensor] = None,
                        allowed: Optional[torch.Tensor] = None) -> CategoricalTeacher:
    """q(y|x) proportional to p(y|x) exp(score(x, y)) with classes where ``allowed`` is False at 0 (hard
    rules). A row with no allowed class falls back to p (and is flagged, so callers can count it).
    In fp32 log space so large scores (C = 6, many rules) never overflow."""
    log_p = F.log_softmax(logits.detach().float(), dim=-1)
    log_q = log_p if score is None else log_p + score.detach().float()
    changed = torch.zeros(log_p.shape[0], dtype=torch.bool, device=log_p.device)
    if score is not None:
        changed = (score != 0).any(-1)
    fallback = torch.zeros_like(changed)
    if allowed is not None:
        fallback = ~allowed.any(-1)
        use_mask = allowed | fallback[:, None]  # a fully-masked row keeps every class: q = p
        log_q = log_q.masked_fill(~use_mask, float("-inf"))
        changed = changed | (~allowed).any(-1)
    log_q = torch.where(fallback[:, None], log_p, log_q)
    # Rows the score and mask leave alone keep log p bit for bit (lambda = 0 reproduces p exactly).
    changed = changed & ~fallback
    normed = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    return CategoricalTeacher(torch.where(changed[:, None], normed, log_p), fallback)


def pi_schedule(images_seen: int, images_per_epoch: int, pi0: float = 0.9, decay: float = 0.95) -> float:
    """Imitation weight pi_t = min(pi0, 1 - decay^t), t = epochs of images seen (fractional): starts at
    0 (trust the labels while p is poor) and grows to the cap (Hu et al. 2016's code)."""
    t = images_seen / max(1, images_per_epoch)
    return min(pi0, 1.0 - decay ** t)


def distill_loss(logits: torch.Tensor, y: Optional[torch.Tensor], log_q: torch.Tensor, pi: float,
                 labelled: Optional[torch.Tensor] = None, taught: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1 - pi) CE(y, p) averaged over the labelled rows + pi KL(q || p) averaged over the ``taught`` rows
    (default all; q detached). KL and soft cross-entropy differ by the teacher's entropy, a constant:
    same gradient, and KL is 0 when q = p. pi = 0 gives exactly the plain cross-entropy."""
    logits = logits.float()
    every = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    labelled = every if labelled is None else labelled
    taught = every if taught is None else taught
    ce = F.cross_entropy(logits[labelled], y[labelled]) if bool(labelled.any()) else logits.sum() * 0.0
    if pi == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(logits[taught], -1), log_q[taught].detach(), log_target=True,
                  reduction="batchmean")
    return (1.0 - pi) * ce + pi * kl


# ---- importance-weighted teacher over samples ----------------------------------------------------


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_cat(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """All ranks' ``t`` concatenated along dim 0 (equal sizes per rank), detached, and where this
    rank's rows start. The teacher's normaliser runs over every rank's samples."""
    rank, size = world()
    t = t.detach()
    if size == 1:
        return t, 0
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts), rank * t.shape[0]


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size exp(2 LSE(s) - LSE(2 s)) of unnormalised log-weights s (fp32)."""
    s = log_w.float()
    return torch.exp(2 * torch.logsumexp(s, 0) - torch.logsumexp(2 * s, 0))


@dataclass
class SampleTeacher:
    w: torch.Tensor       # (N,) normalised weights over all ranks' samples (per group when grouped)
    ess_frac: torch.Tensor  # ESS / N (the mean over groups when grouped)
    log_z: torch.Tensor   # log mean exp(s): the estimate of log Z = log E_p exp(lambda f)


def _per_group(s: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, classes: int):
    """Per group: log sum exp(s) and sum softmax(s) v, by scatters (no host read, whatever the classes
    present); -inf and 0 for a group without samples or without a finite s."""
    neg = torch.full((classes,), float("-inf"), device=s.device)
    m = neg.scatter_reduce(0, groups, s, reduce="amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m[groups])
    tot = torch.zeros(classes, device=s.device).index_add(0, groups, e)
    ev = torch.zeros(classes, device=s.device).index_add(0, groups, e * v)
    return torch.log(tot) + m, torch.where(tot > 0, ev / tot.clamp_min(1e-30), torch.zeros_like(tot))


def p_diagnostics(lam_f: torch.Tensor, f: torch.Tensor, log_ratio: Optional[torch.Tensor] = None,
                  groups: Optional[torch.Tensor] = None, per_class: bool = False, classes: int = 0) -> dict:
    """What the knowledge callback logs, all under the student p, from samples of p or of a tempered
    p_T with log p/p_T = log_ratio (self-normalised importance weights):
    log_z = log E_p exp(lambda f), pooled over all samples, or (per_class) sum_c pi_c log E_p[. | c] with
    pi_c the model samples' class shares (the IRL loss's knowledge.irl_log_z=per_class weighs by the real
    batch's shares; both estimate the same class mix); f_student = E_p f; f_teacher = E_q f, q proportional
    to p exp(lambda f) within each class, classes weighed by their shares. Samples whose f is not finite
    count in none of them. ``classes``: the number of classes ``groups`` indexes (0: ungrouped)."""
    lam_f, f = lam_f.detach().float(), f.detach().float()
    r = torch.zeros_like(lam_f) if log_ratio is None else log_ratio.detach().float()
    ok = torch.isfinite(f) & torch.isfinite(lam_f)
    lr = r.masked_fill(~ok, float("-inf"))
    s = (lam_f + r).masked_fill(~ok, float("-inf"))
    f0 = f.masked_fill(~ok, 0.0)
    out = {"f_student": (torch.softmax(lr, 0) * f0).sum()}
    if groups is None or not classes:
        out["log_z"] = torch.logsumexp(s, 0) - torch.logsumexp(lr, 0)
        out["f_teacher"] = (torch.softmax(s, 0) * f0).sum()
        return out
    groups = groups.long()
    share = torch.bincount(groups, minlength=classes).float() / groups.numel()
    lse_s, f_q = _per_group(s, f0, groups, classes)
    lse_r, _ = _per_group(lr, f0, groups, classes)
    present = share > 0
    out["f_teacher"] = torch.where(present, share * f_q, torch.zeros_like(share)).sum()
    if per_class:
        out["log_z"] = torch.where(present, share * (lse_s - lse_r), torch.zeros_like(share)).sum()
    else:
        out["log_z"] = torch.logsumexp(s, 0) - torch.logsumexp(lr, 0)
    return out


def importance_teacher(s: torch.Tensor, groups: Optional[torch.Tensor] = None) -> SampleTeacher:
    """Self-normalised importance weights w_i proportional to exp(s_i), s = lambda f(x_i), x_i ~ p.
    ``groups`` (e.g. the requested class of a conditional model) normalises within each group, so
    q is built per condition."""
    s = s.detach().float()
    if groups is None:
        lse = torch.logsumexp(s, 0)
        return SampleTeacher(torch.exp(s - lse), ess(s) / s.numel(), lse - math.log(s.numel()))
    w = torch.zeros_like(s)
    fracs, log_zs = [], []
    for g in torch.unique(groups):
        idx = groups == g
        t = importance_teacher(s[idx])
        w[idx] = t.w
        fracs.append(t.ess_frac)
        log_zs.append(t.log_z)
    return SampleTeacher(w, torch.stack(fracs).mean(), torch.stack(log_zs).mean())


def weighted_nll_term(nll_local: torch.Tensor, s_local: torch.Tensor, alpha: float,
                      groups_local: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, SampleTeacher]:
    """The flow student's extra term alpha sum_i (w_i - 1/N) nll(x_i) over all ranks' samples x_i ~ p.
    The M-step term alpha E_q nll is estimated with the self-normalised weights; subtracting the
    uniform-weighted mean (expectation of grad nll under p is 0: an unbiased control variate) makes
    the term exactly 0 at lambda = 0. Scaled by the world size because DDP averages gradients."""
    s_all, start = gather_cat(s_local)
    g_all = gather_cat(groups_local)[0] if groups_local is not None else None
    teacher = importance_teacher(s_all, g_all)
    n, size = nll_local.shape[0], world()[1]
    w = teacher.w[start:start + n]
    # Samples with log-weight -inf (a non-finite constraint value) count in neither average.
    flat = torch.zeros_like(s_all).masked_fill(torch.isneginf(s_all), float("-inf"))
    uniform = importance_teacher(flat, g_all).w[start:start + n]
    return alpha * size * ((w - uniform) * nll_local).sum(), teacher


def reverse_kl_loss(f_fake: torch.Tensor, lam: float, alpha: float = 1.0) -> torch.Tensor:
    """Implicit models' extra generator loss -alpha lambda mean f(G(z)): the gradient of
    alpha (KL(p || q) up to terms without theta), q proportional to p exp(lambda f)."""
    return -alpha * lam * f_fake.float().mean()


def irl_loss(f_data: torch.Tensor, f_model: torch.Tensor, lam: float, y_data: Optional[torch.Tensor] = None,
             y_model: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Max-ent IRL loss of a learned constraint: -lambda mean f(x_data) + log Z, with log Z the log mean
    exp(lambda f(x_model)) over all ranks' model samples. Its value is exact; its gradient is
    lambda (E_q grad f - E_data grad f) with E_q by self-normalised importance weights (a per-rank
    surrogate, scaled by the world size so that averaging phi's gradients over ranks gives the
    full-batch gradient).

    With class labels (``y_model``, the requested classes, and ``y_data``) the teacher is built per
    class, q(x | c) proportional to p(x | c) exp(lambda f(x, c)), so log Z is sum_c pi_c log Z_c with pi_c
    the data's class shares: pooling all samples in one log-mean-exp would fit the joint over (x, c)
    with the model's class mix instead, and bias phi. Classes without model samples drop out of pi."""
    s = lam * f_model.float()
    s_all, start = gather_cat(s)
    size = world()[1]
    if y_model is None:
        lse = torch.logsumexp(s_all, 0)
        w_all, value = torch.exp(s_all - lse), lse - math.log(s_all.numel())
    else:
        g_all = gather_cat(y_model)[0]
        present = torch.unique(g_all)
        ref = gather_cat(y_data)[0] if y_data is not None else g_all
        share = (ref[:, None] == present[None]).float().mean(0)
        share = share / share.sum() if float(share.sum()) > 0 else torch.full_like(share, 1.0 / len(present))
        w_all, value = torch.zeros_like(s_all), s_all.new_zeros(())
        for k, c in enumerate(present):
            idx = g_all == c
            lse = torch.logsumexp(s_all[idx], 0)
            w_all[idx] = share[k] * torch.exp(s_all[idx] - lse)
            value = value + share[k] * (lse - math.log(int(idx.sum())))
    w = w_all.detach()[start:start + s.shape[0]]
    data_term = -lam * f_data.float().mean()
    surrogate = size * (w * s).sum()  # gradient sum_i w_i lambda grad f_i
    return data_term + surrogate + (value - surrogate).detach()


# ---- chain-structured teacher (sequence labels) -------------------------------------------------


def chain_teacher_marginals(logits: torch.Tensor, pair_score: torch.Tensor,
                            unary_score: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher over label sequences y_1..T whose rules couple neighbours (Hu et al. 2016, NER/BIO):

        log q(y) = sum_t [log p(y_t | x) + u_t(y_t)] + sum_t s_t(y_t, y_t+1) - log Z

    with the student factorised per position. logits (B, T, K), pair_score (T-1, K, K) or (B, T-1, K, K)
    (e.g. -C lambda (1 - r(y_t, y_t+1)), -inf for a hard rule), unary_score (B, T, K). Returns the
    per-position marginals q(y_t) (B, T, K), the student's per-token target, and log Z (B,), by
    forward-backward in fp32 log space: O(T K^2) instead of the K^T of enumeration.
    A sequence every path of which is forbidden falls back to p (log Z = -inf is reported)."""
    log_p = F.log_softmax(logits.detach().float(), -1)
    node = log_p if unary_score is None else log_p + unary_score.detach().float()
    B, T, K = node.shape
    pair = pair_score.detach().float().expand(B, T - 1, K, K) if T > 1 else None
    alpha = [node[:, 0]]
    for t in range(1, T):  # alpha_t(j) = node_t(j) + LSE_i(alpha_t-1(i) + pair_t-1(i, j))
        alpha.append(node[:, t] + torch.logsumexp(alpha[-1][:, :, None] + pair[:, t - 1], 1))
    beta = [torch.zeros_like(node[:, -1])]
    for t in range(T - 2, -1, -1):  # beta_t(i) = LSE_j(pair_t(i, j) + node_t+1(j) + beta_t+1(j))
        beta.insert(0, torch.logsumexp(pair[:, t] + (node[:, t + 1] + beta[0])[:, None, :], 2))
    log_z = torch.logsumexp(alpha[-1], -1)
    log_marg = torch.stack(alpha, 1) + torch.stack(beta, 1) - log_z[:, None, None]
    dead = ~torch.isfinite(log_z)
    q = torch.where(dead[:, None, None], log_p.exp(), log_marg.exp())
    return q, log_z
