"""Experiment 1: digits-sum rule distillation on scikit-learn's digits.

A few labelled digits plus unlabelled pairs (a, b) whose sum s is known; the rule y_a + y_b = s
(soft, confidence lambda, C = 6) builds a joint teacher over the 10 x 10 label pairs from the student's
own predictions, whose marginals the student imitates. Softmax regression on the 64 pixels.
    python -m trainer.knowledge.digits_sum --seeds 5 --out docs/knowledge_digits_sum.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.classifier_module import ClassifierModule
from trainer.knowledge.teacher import categorical_teacher

K = 10


def pair_sum_teacher(logits: torch.Tensor, s: torch.Tensor, C: float = 6.0, lam: float = 1.0,
                     hard: bool = False) -> torch.Tensor:
    """Marginal teacher log-probabilities (B, 2, K) of a pair from q(y1, y2) proportional to
    p(y1) p(y2) exp(-C lam (1 - [y1 + y2 = s])) (hard: zero mass off the rule; a pair no label pair
    satisfies falls back to p)."""
    lp = torch.log_softmax(logits.float(), -1)
    joint = (lp[:, 0, :, None] + lp[:, 1, None, :]).flatten(1)  # (B, K*K), normalised
    ok = (torch.arange(K)[:, None] + torch.arange(K)[None, :]).flatten().to(s.device)[None] == s[:, None]
    t = categorical_teacher(joint, None if hard else -C * lam * (~ok).float(), ok if hard else None)
    q = t.q.view(-1, K, K)
    return torch.stack([q.sum(2), q.sum(1)], 1).clamp_min(1e-30).log()


def split(seed: int, n_lab: int = 50, n_test: int = 500) -> Dict[str, torch.Tensor]:
    """Labelled digits, unlabelled pairs with sums, and test pairs with sums (a seeded partition)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    lab, test, unl = perm[:n_lab], perm[n_lab:n_lab + n_test], perm[n_lab + n_test:]
    unl = unl[: len(unl) // 2 * 2].view(-1, 2)
    test = test.view(-1, 2)
    return {"x_lab": x[lab], "y_lab": y[lab], "x_unl": x[unl], "s_unl": y[unl].sum(1),
            "x_test": x[test], "y_test": y[test], "s_test": y[test].sum(1)}


def run(seed: int, use_rule: bool, epochs: int = 60, batch: int = 64, C: float = 6.0, lam: float = 1.0,
        pi0: float = 0.9) -> Dict[str, float]:
    data = split(seed)
    L.seed_everything(seed, verbose=False)
    teacher = lambda logits, s: pair_sum_teacher(logits, s, C, lam)  # noqa: E731
    module = ClassifierModule(nn.Linear(64, K), teacher, data["x_lab"], data["y_lab"],
                              groups_per_epoch=len(data["s_unl"]), pi0=pi0, use_rule=use_rule)
    loader = DataLoader(TensorDataset(data["x_unl"], data["s_unl"]), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module.accuracy(data["x_test"], data["s_test"], data["y_test"])


def _spread(values) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = {name: [run(s, rule, a.epochs) for s in range(a.seeds)] for name, rule in (("baseline", False),
                                                                                     ("rule", True))}
    summary = {f"{name}/{k}": _spread([r[k] for r in rs]) for name, rs in rows.items() for k in ("acc_p", "acc_q")}
    result = {"per_seed": rows, "summary": summary, "seeds": a.seeds, "epochs": a.epochs,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=1, ensure_ascii=False), f"({result['seconds']} s)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1, ensure_ascii=False)
    return result


if __name__ == "__main__":
    main()
