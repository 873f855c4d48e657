"""Evaluation helpers against hand-computed expectations: the generator's mode is restored, standing
statistics average distinct batches, --class labels, and a raw-G evaluation is logged as eval_raw/."""
from __future__ import annotations

import csv
import types

import torch

from tests.unit.test_gan_module import module


def test_evaluator_restores_the_generators_training_mode(tmp_path):
    from trainer.evaluate import GeneratorEvaluator

    m = module("gan_digits", "ema.enabled=false", "eval.kid_subsets=2", "eval.kid_subset_size=8")
    ev = GeneratorEvaluator(m.cfg, features_dir=tmp_path)
    m.G.train()
    ev(m.G, 16)
    assert m.G.training  # the periodic eval of G (no EMA) must not leave it training with running statistics


def test_standing_stats_average_distinct_batches():
    from trainer.evaluate import standing_stats

    m = module("gan_digits", "model.g_norm=batch")
    one = standing_stats(m.G, 8, 1, 0, torch.device("cpu"))
    two = standing_stats(m.G, 8, 2, 0, torch.device("cpu"))
    bn1 = [b for b in one.modules() if isinstance(b, torch.nn.BatchNorm2d)][0]
    bn2 = [b for b in two.modules() if isinstance(b, torch.nn.BatchNorm2d)][0]
    assert not torch.allclose(bn1.running_mean, bn2.running_mean)  # batch 2 has latents of its own


def test_class_labels_of_a_requested_class():
    from trainer.evaluate import class_labels

    G = types.SimpleNamespace(conditional=True, num_classes=10)
    assert class_labels(G, 4, 3).tolist() == [3, 3, 3, 3]
    assert class_labels(G, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_an_evaluation_without_ema_is_logged_as_eval_raw(tmp_path):
    from trainer.evaluate import _append_log

    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    res = {"protocol": {"ema": False}, "iteration": 5, "fid": 1.5, "kid_mean": 0.25, "kid_std": 0.5}
    _append_log(tmp_path / "checkpoints" / "iter-0000005.ckpt", res)
    with open(tmp_path / "metrics.csv") as fh:
        row = list(csv.DictReader(fh))[-1]
    assert row.get("eval_raw/fid") == "1.5" and not row.get("eval/fid")
