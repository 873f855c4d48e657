"""Experiment 2's driver: per-variant mean ± sample standard deviation over seeds, and merging the
results of per-seed processes (refused when they ran different settings)."""
import json

import pytest

from trainer.knowledge.cond_gen import merge, summarise


def _row(variant, seed, fid, cc):
    return {"variant": variant, "seed": seed, "fid": fid, "class_consistency": cc, "train_cpu_s": 100.0}


def test_summary_is_mean_and_sample_std_per_variant():
    rows = [_row("base", 0, 10.0, 0.2), _row("base", 1, 20.0, 0.4), _row("fixed", 0, 5.0, 0.9)]
    s = summarise(rows)
    assert s["base"]["fid"] == "15.000 ± 7.071" and s["base"]["class_consistency"] == "0.300 ± 0.141"
    assert s["fixed"]["fid"] == "5.000" and s["fixed"]["seeds"] == 1 and "learned" not in s


def test_merge_orders_rows_and_refuses_different_settings(tmp_path):
    a = {"per_run": [_row("fixed", 1, 5.0, 0.9), _row("base", 1, 9.0, 0.3)], "iters": 1000, "overrides": []}
    b = {"per_run": [_row("base", 0, 7.0, 0.2)], "iters": 1000, "overrides": []}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path / "all.json"))
    assert [(r["seed"], r["variant"]) for r in out["per_run"]] == [(0, "base"), (1, "base"), (1, "fixed")]
    assert json.loads((tmp_path / "all.json").read_text())["summary"]["base"]["seeds"] == 2
    b["iters"] = 600
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="different --iters"):
        merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")], "")


def test_mlp_judge_reads_real_digits_and_not_shuffled_labels():
    """The judge of another family really classifies: high held-out accuracy on real digits, chance
    level when the labels it is scored against are permuted."""
    import torch

    from trainer.evaluate import _run_data
    from trainer.knowledge.cond_gen import _accuracy, train_mlp_judge

    cfg = {"data": {"name": "digits", "resolution": 32, "val_fraction": 0.1, "path": ""}}
    judge, acc = train_mlp_judge(cfg, epochs=3)
    val = _run_data(cfg, "val")
    assert acc > 0.85 and acc == _accuracy(judge, val.images, val.labels)
    shuffled = val.labels[torch.randperm(len(val.labels), generator=torch.Generator().manual_seed(0))]
    assert _accuracy(judge, val.images, shuffled) < 0.3
