"""Constraints f(x) (higher = agrees better with the knowledge) as nn.Modules, and rule confidences.

Images are in [-1, 1], (N, C, H, W). A learned constraint's parameters are phi; a fixed one is frozen.
Values are bounded by bound * tanh(f / bound) when ``bound`` > 0: an unbounded learned f lets the
importance weights degenerate onto one sample.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Constraint(nn.Module):
    def __init__(self, bound: float = 0.0, learned: bool = False):
        super().__init__()
        self.bound, self.learned = float(bound), bool(learned)

    def raw(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = self.raw(x, y).float()
        return self.bound * torch.tanh(f / self.bound) if self.bound > 0 else f

    def freeze(self) -> "Constraint":
        for p in self.parameters():
            p.requires_grad_(False)
        self.learned = False
        return self.eval()


class LinearConstraint(Constraint):
    """f(x) = phi^T x on flattened x (the closed-form Gaussian cases)."""

    def __init__(self, dim: int, bound: float = 0.0, learned: bool = True):
        super().__init__(bound, learned)
        self.phi = nn.Parameter(torch.zeros(dim))

    def raw(self, x, y=None):
        return x.flatten(1).float() @ self.phi


class ClassConsistency(Constraint):
    """log p_clf(y | x): how recognisably x shows the requested class y under a classifier. Fixed: a
    frozen pre-trained classifier (kept in eval mode: no BN or dropout noise); learned: the same net,
    updated by the IRL step (train mode would make f random, so it also stays in eval mode)."""

    def __init__(self, classifier: nn.Module, bound: float = 0.0, learned: bool = False):
        super().__init__(bound, learned)
        self.classifier = classifier.eval()
        if not learned:
            self.freeze()

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    def raw(self, x, y):
        if y is None:
            raise ValueError("ClassConsistency needs the requested class y (a class-conditional model).")
        logp = F.log_softmax(self.classifier(x).float(), -1)
        return logp.gather(1, y.view(-1, 1).long()).squeeze(1)


class Symmetry(Constraint):
    """Left-right symmetry: -mean squared difference between x and its mirror image (0 when symmetric)."""

    def raw(self, x, y=None):
        return -(x.float() - x.float().flip(-1)).pow(2).flatten(1).mean(1)


class RuleConfidences(nn.Module):
    """Learnable confidences lambda_l >= 0 of L rules (Hu et al. 2016b). Trained by maximising
    log q_lambda(y_n | x_n) on labelled data; autograd gives C (r_l(x, y_n) - E_q r_l) per rule."""

    def __init__(self, n_rules: int, init: float = 1.0, C: float = 6.0):
        super().__init__()
        self.lam = nn.Parameter(torch.full((n_rules,), float(init)))
        self.C = float(C)

    def lambdas(self) -> torch.Tensor:
        return self.lam.clamp(min=0.0)

    def score(self, rules: torch.Tensor) -> torch.Tensor:
        """(B, K, L) rule values -> (B, K) additive log-potential -C sum_l lambda_l (1 - r_l)."""
        return -self.C * ((1.0 - rules.float()) * self.lambdas()).sum(-1)

    def loss(self, logits: torch.Tensor, rules: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """-mean log q_lambda(y_n | x_n); p (the logits) is held fixed."""
        log_q = F.log_softmax(F.log_softmax(logits.detach().float(), -1) + self.score(rules), -1)
        return F.nll_loss(log_q, y)
