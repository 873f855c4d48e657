"""KnowledgeCallback: the per-step teacher of knowledge-constraint training for GANs and flows.

GANs (implicit density): a hook in GANModule's G step adds -alpha lambda mean f(G(z)) (reverse KL to
    q proportional to p exp(lambda f)); phi is frozen there. The importance-weighted sample set
    (w = softmax(lambda f) per requested class, over all ranks) is kept as the teacher for diagnostics.
Flows (explicit density): a hook in FlowModule's step draws samples x_i ~ p, weights them and adds
    alpha sum_i (w_i - 1/N) bits/dim(x_i); when ESS/N < ess_min the term is skipped (and counted).
Learned constraints: after each (phi_every-th) step, one AdamW step of phi on the max-ent IRL loss with
    the step's real batch as data and the step's model samples, gradients averaged over ranks.
The callback runs before the checkpoint callback, and its state (phi, its optimiser, lambda, counters)
goes into every checkpoint, so a resume continues the constraint where it stopped.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist

from trainer.knowledge.constraints import ClassConsistency, Constraint, Symmetry
from trainer.knowledge.teacher import (gather_cat, importance_teacher, irl_loss, p_diagnostics, reverse_kl_loss,
                                      weighted_nll_term, world)
from trainer.config import ConfigError
from trainer.counters import images_of, iteration_of


def tempered_samples(glow, n: int, temperature: float, y: Optional[torch.Tensor], gen: torch.Generator):
    """n samples of the flow, with every prior std scaled by ``temperature``, and log p(x) - log p_T(x)
    per sample (0 at T = 1), the importance-weight correction that makes the teacher p exp(lambda f),
    not p_T exp(lambda f). The log-dets of the bijection cancel in the ratio; with z = mean + T std e,
    each latent element contributes log T + (1 - T^2) e^2 / 2, and the constant cancels in the
    self-normalised weights. Its spread grows like (1 - T^2) sqrt(D / 2) in D dimensions, so away from
    T = 1 the ESS gate (knowledge.ess_min) skips most steps."""
    if temperature == 1.0:  # the draw as the flow makes it (same random stream as before the option)
        return glow.sample(n, 1.0, y, gen).detach(), torch.zeros((), device=next(glow.parameters()).device)
    p = next(glow.parameters())
    eps = torch.randn(n, glow.n_dims, generator=gen, device=p.device, dtype=p.dtype)
    xs = glow.sample(n, temperature, y, eps=eps).detach()
    return xs, (1.0 - temperature ** 2) / 2.0 * eps.float().pow(2).sum(1)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """phi receives no gradient from the student's loss (the E-step and M-step are separate)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _conditional_classes(pl_module) -> int:
    glow = getattr(pl_module, "glow", None)
    return int(glow.num_classes) if glow is not None else int(getattr(pl_module, "num_classes", 0))


def check_constraint_fits(constraint: str, pl_module) -> None:
    """class_consistency scores the class G (or the flow) was asked for: it needs a class-conditional model.
    Checked before the run directory is made and before its classifier is trained."""
    if constraint == "class_consistency" and not _conditional_classes(pl_module):
        raise ConfigError("knowledge.constraint=class_consistency needs a class-conditional model (it scores "
                          "the requested class), and this one has no classes: use a class-conditional model "
                          "(biggan on labelled data, or glow with flow.class_conditional=true) or "
                          "knowledge.constraint=symmetry.")


class KnowledgeCallback(L.Callback):
    def __init__(self, k: dict, constraint: Constraint, log_every: int = 10, seed: int = 0):
        self.k, self.constraint, self.log_every, self.seed = k, constraint, log_every, seed
        self._classes = 0  # set at setup from the module
        self.lam = float(k["lam"])
        self.opt: Optional[torch.optim.Optimizer] = None
        self.counters = {"phi_steps": 0, "ess_skipped": 0, "teacher_steps": 0}
        self._pending: Optional[dict] = None
        self._model_samples: list = []  # (x in [-1, 1], y) of the current step
        # Diagnostics stay on the device until logged (last_stats, teacher_samples read them): a host
        # read per step would make the GPU drain its queue every step.
        self._stats: dict = {}
        self._device_stats: dict = {}
        self._teacher: Optional[tuple] = None  # (resampled teacher set, whether any set was usable yet)

    @property
    def last_stats(self) -> dict:
        """The latest diagnostics as floats (read from the device here: on logging steps, not every step)."""
        if self._device_stats:
            self._stats.update({k: float(v) for k, v in self._device_stats.items()})
            self._device_stats = {}
        return self._stats

    @property
    def teacher_samples(self) -> Optional[torch.Tensor]:
        """The latest teacher set resampled from usable weights (on the CPU); None before the first."""
        if self._teacher is None or not bool(self._teacher[1]):
            return None
        return self._teacher[0].cpu()

    @property
    def state_key(self) -> str:
        return "KnowledgeCallback"

    # ---- wiring -----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None):
        self._classes = _conditional_classes(pl_module)  # the diagnostics' per-class sums, without host reads
        if isinstance(self.constraint, ClassConsistency):
            check_constraint_fits("class_consistency", pl_module)
        self.constraint.to(pl_module.device)
        if self.constraint.learned and self.opt is None:
            self.opt = torch.optim.AdamW(self.constraint.parameters(), lr=self.k["phi_lr"],
                                         weight_decay=self.k["phi_weight_decay"])
        hooks = getattr(pl_module, "g_loss_hooks", None)
        if hooks is not None and self._gan_term not in hooks:
            hooks.append(self._gan_term)
        hooks = getattr(pl_module, "loss_hooks", None)
        if hooks is not None and self._flow_term not in hooks:
            hooks.append(self._flow_term)
        self._apply_pending()

    # ---- teacher terms ----------------------------------------------------------------------
    def _gan_term(self, fake: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        with frozen(self.constraint):
            f = self.constraint(fake.float(), y)  # fp32: fp16 engines' fakes meet an fp32 constraint
        self._model_samples.append((fake.detach(), y))
        self._diagnose(fake.detach(), y, f.detach())
        return reverse_kl_loss(f, self.lam, self.k["alpha"])

    def _flow_term(self, module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        n = int(self.k["samples"]) or x.shape[0]
        gen = module.noise_generator(salt=0x4B4E)  # seeded by (seed, rank, step): exact resume
        classes = _conditional_classes(module)
        y_s = torch.randint(classes, (n,), generator=gen, device=module.device) if classes else None
        xs, log_ratio = tempered_samples(module.glow, n, float(self.k["temperature"]), y_s, gen)
        images = 2.0 * xs.float()  # flow space [-0.5, 0.5) -> images in [-1, 1)
        with torch.no_grad():
            f = self.constraint(images, y_s)
            # An early flow's wild samples can overflow f: weight 0 for them, not a NaN teacher.
            s = (self.lam * f + log_ratio).masked_fill(~torch.isfinite(f), float("-inf"))
        nll = module.losses(xs, y_s)["bpd"]
        term, teacher = weighted_nll_term(nll, s, self.k["alpha"], y_s)
        self._model_samples.append((images, y_s))
        self._diagnose(images, y_s, f, teacher, log_ratio)
        # A host read, kept: the term and the skip counter depend on it (the same on every rank: the
        # weights are gathered).
        ess_frac = float(teacher.ess_frac)
        if not ess_frac >= self.k["ess_min"]:  # also when it is NaN (every sample overflowed)
            self.counters["ess_skipped"] += 1
            return nll.sum() * 0.0  # keeps the graph, so DDP sees every parameter used
        return term

    @torch.no_grad()
    def _diagnose(self, x: torch.Tensor, y: Optional[torch.Tensor], f: torch.Tensor, teacher=None,
                  log_ratio: Optional[torch.Tensor] = None) -> None:
        """ESS, log Z and the constraint under the student p and under the teacher q (over every rank's
        samples; tempered flow samples weighted back to p by ``log_ratio``), and the resampled teacher set."""
        # log_ratio is a 0-dim zero at temperature 1: made per sample, so every rank gathers equal shapes
        lr = torch.zeros_like(f, dtype=torch.float32) if log_ratio is None else log_ratio.float().expand(f.shape)
        s = (self.lam * f.float() + lr).masked_fill(~torch.isfinite(f), float("-inf"))
        y_all = gather_cat(y)[0] if y is not None else None
        if teacher is None:
            teacher = importance_teacher(gather_cat(s)[0], y_all)
        local = importance_teacher(s, y).w
        if y is not None:  # weights sum to 1 within each class: weigh the classes by their share of samples
            local = local * torch.bincount(y)[y].to(local.dtype) / y.shape[0]
        self.counters["teacher_steps"] += 1
        per_class = self.k.get("irl_log_z", "pooled") == "per_class"
        f_all = gather_cat(f.float())[0]
        d = p_diagnostics(self.lam * f_all, f_all, gather_cat(lr)[0], y_all, per_class, self._classes)
        self._device_stats = {"knowledge/ess_frac": teacher.ess_frac, "knowledge/log_z": d["log_z"],
                              "knowledge/f_student": d["f_student"], "knowledge/f_teacher": d["f_teacher"]}
        self._stats = {"knowledge/lambda": self.lam}  # a new step's diagnostics replace the last one's
        self._resample(x, local)

    def _resample(self, x: torch.Tensor, local: torch.Tensor) -> None:
        """The teacher set drawn from the weights; when they are unusable (not finite, zero sum) the
        previous set stays. Decided on the device (no host read): unusable weights draw uniformly and
        the draw is discarded by a select."""
        gen = torch.Generator(device=x.device).manual_seed(self.seed + self.counters["teacher_steps"])
        usable = torch.isfinite(local).all() & (local.sum() > 0)
        probs = torch.where(usable, local / local.sum(), torch.ones_like(local))
        drawn = x[torch.multinomial(probs, int(self.k["keep_samples"]), replacement=True, generator=gen)]
        if self._teacher is None or self._teacher[0].shape != drawn.shape:  # first step, or a new resolution
            self._teacher = (drawn, usable)
        else:
            old, had = self._teacher
            self._teacher = (torch.where(usable, drawn, old), had | usable)

    # ---- learned constraint -------------------------------------------------------------------
    def irl_step(self, x_data: torch.Tensor, y_data: Optional[torch.Tensor]) -> torch.Tensor:
        """One AdamW step of phi on the IRL loss: real images versus this step's model samples."""
        x_model = torch.cat([m[0] for m in self._model_samples])
        ys = [m[1] for m in self._model_samples]
        y_model = torch.cat(ys) if ys[0] is not None else None
        self.opt.zero_grad(set_to_none=True)
        per_class = y_model is not None and self.k.get("irl_log_z", "pooled") == "per_class"
        loss = irl_loss(self.constraint(x_data, y_data), self.constraint(x_model.float(), y_model), self.lam,
                        y_data if per_class else None, y_model if per_class else None)
        loss.backward()
        size = world()[1]
        for p in self.constraint.parameters():
            if size > 1 and p.grad is not None:  # phi is not wrapped by DDP: average it here
                dist.all_reduce(p.grad)
                p.grad /= size
        self.opt.step()
        self.counters["phi_steps"] += 1
        return loss.detach()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._model_samples or not getattr(pl_module, "g_stepped", True):
            return
        it = iteration_of(pl_module)
        if self.constraint.learned and it % int(self.k["phi_every"]) == 0:
            images, labels = batch
            x_data = images.to(pl_module.device).float().div(127.5).sub(1.0)
            y_data = labels.to(pl_module.device).long() if _conditional_classes(pl_module) else None
            self._device_stats["knowledge/irl_loss"] = self.irl_step(x_data, y_data)
        self._model_samples = []
        self._stats.update({f"knowledge/{k}": float(v) for k, v in self.counters.items()})
        if (it % self.log_every == 0 or it == 1) and trainer.is_global_zero:
            row = {**self.last_stats, "iteration": float(it), "progress/kimg": images_of(pl_module) / 1000.0}
            for lg in trainer.loggers:  # keyed like the modules' rows (metrics.csv, the report)
                lg.log_metrics(row, step=it)

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lam": self.lam, "counters": dict(self.counters),
                "phi": self.constraint.state_dict() if self.constraint.learned else None,
                "opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state
        self._apply_pending()

    def _apply_pending(self) -> None:
        """Restores once phi's optimiser exists (Lightning may restore callbacks before or after setup)."""
        state = self._pending
        if state is None or (state["opt"] is not None and self.opt is None):
            return
        self.lam = float(state["lam"])
        self.counters.update(state["counters"])
        if state["phi"] is not None:
            self.constraint.load_state_dict(state["phi"])
        if state["opt"] is not None:
            self.opt.load_state_dict(state["opt"])
        self._pending = None


def build_knowledge_callback(cfg) -> KnowledgeCallback:
    """The callback of the config's knowledge section; class_consistency trains (once) its own classifier
    with knowledge.classifier_seed, independent of the evaluation classifier."""
    from trainer.evaluate import load_feature_net, train_feature_net

    k, d = cfg.knowledge, cfg.data
    if k.constraint == "symmetry":
        constraint: Constraint = Symmetry(bound=k.bound)
    else:
        where = Path(cfg.eval.features_dir) / f"knowledge-seed{k.classifier_seed}"
        path = train_feature_net(d.name, d.resolution, d.path, features_dir=where, epochs=k.classifier_epochs,
                                 seed=k.classifier_seed, val_fraction=d.val_fraction)
        constraint = ClassConsistency(load_feature_net(path)[0], bound=k.bound, learned=k.learned)
    plain = {key: getattr(k, key) for key in k.keys()}
    return KnowledgeCallback(plain, constraint, int(cfg.trainer.log_every), int(cfg.trainer.seed))
