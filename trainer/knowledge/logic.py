"""Soft logic over truth values in [0, 1] (Hu et al. 2016, "Harnessing DNNs with Logic Rules").

Lukasiewicz-style connectives, so a rule's value is 1 when satisfied and decreases with the degree of
violation; the teacher penalises C * lambda * (1 - value).
"""
from __future__ import annotations

import torch


def soft_and(*xs: torch.Tensor) -> torch.Tensor:
    """A and B = max(A + B - 1, 0), extended to many: max(sum - (n - 1), 0)."""
    return (sum(xs) - (len(xs) - 1)).clamp(min=0.0)


def soft_or(*xs: torch.Tensor) -> torch.Tensor:
    """A or B = min(A + B, 1)."""
    return sum(xs).clamp(max=1.0)


def soft_not(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def soft_implies(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A => B = min(1, 1 - A + B)."""
    return (1.0 - a + b).clamp(max=1.0)


def soft_mean_and(*xs: torch.Tensor) -> torch.Tensor:
    """The paper's many-way 'and' for long conjunctions: the average (never collapses to 0)."""
    return sum(xs) / len(xs)
