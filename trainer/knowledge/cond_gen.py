"""Experiment 2 of docs/knowledge_constraints.md: class-conditional BigGAN on mnist5k, three variants.

* base: the plain hinge GAN;
* fixed: plus the class-consistency constraint f(x, y) = log p_clf(y | x) of a frozen classifier
  (seed ``knowledge.classifier_seed`` = 1), the generator trained on the teacher's reverse KL;
* learned: the same constraint, its classifier updated by the max-ent IRL step on real vs generated.

Each (variant, seed) is a real `genscale train` run of ``biggan_mnist5k`` (all overrides shared), then
`evaluate_checkpoint` on its last checkpoint: domain FID of G_ema against the held-out digits and class
consistency judged by the evaluation classifier (seed 0, never used as a constraint). CPU seconds of
each training run (user + system of this process) are recorded, so the budget is stated honestly.

    python -m trainer.knowledge.cond_gen --seeds 0 1 2 --iters 1000 --root runs/kc --out docs/knowledge_cond_gen.json
    (or one process per seed with its own --out, then --merge A.json B.json ... --out ALL.json)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

VARIANTS: Dict[str, List[str]] = {
    "base": [],
    "fixed": ["knowledge.enabled=true", "knowledge.learned=false"],
    "learned": ["knowledge.enabled=true", "knowledge.learned=true"],
}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(variant: str, seed: int, iters: int, root: str, extra: List[str], num_eval: int) -> dict:
    from trainer.build import train
    from trainer.evaluate import evaluate_checkpoint

    overrides = [f"trainer.seed={seed}", f"trainer.max_iters={iters}", f"logging.root={root}",
                 f"logging.run_id={variant}-s{seed}", "trainer.progress_bar=false", "logging.wandb=false",
                 f"trainer.checkpoint.every_n_iters={iters}", *VARIANTS[variant], *extra]
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    run = train("biggan_mnist5k", overrides)
    if run.module.it < iters:  # a SIGTERM (preemption, a killed sweep) stops a run early and cleanly
        raise SystemExit(f"{run.run_dir} stopped at iteration {run.module.it} of {iters}: not recorded.")
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    ev = evaluate_checkpoint(run.run_dir / "checkpoints" / "last.ckpt", num_samples=num_eval)
    row = {"variant": variant, "seed": seed, "iters": iters, "fid": ev["fid"], "kid_mean": ev["kid_mean"],
           "class_consistency": ev["class_accuracy"], "per_class": ev["class_accuracy_per_class"],
           "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1), "run_dir": str(run.run_dir)}
    print(json.dumps(row), flush=True)
    return row


def train_mlp_judge(cfg: dict, seed: int = 7, epochs: int = 20) -> Tuple[torch.nn.Module, float]:
    """A judge of another family than the constraint and the evaluation classifier (both the domain CNN):
    an MLP on raw pixels (1024 -> 256 -> 256 -> 10), trained on the train split. Returns it and its
    accuracy on the held-out split."""
    from trainer.evaluate import _run_data, _to_float

    torch.manual_seed(seed)
    train, val = _run_data(cfg, "train"), _run_data(cfg, "val")
    x, y = _to_float(train.images).flatten(1), train.labels.long()
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, int(y.max()) + 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    return net, _accuracy(net, val.images, val.labels)


@torch.no_grad()
def _accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    from trainer.evaluate import _to_float

    return float((net(_to_float(images).flatten(1)).argmax(1) == labels.long()).float().mean())


def judge_row(row: dict, judge: nn.Module, num: int, seed: int = 0) -> float:
    """Class consistency of a run's G_ema under the judge: `num` samples cycling through the classes,
    latents from `seed` (the protocol of evaluate_checkpoint)."""
    from trainer.checkpointing import load_checkpoint
    from trainer.evaluate import _build_generator, _run_data, class_labels, generate_uint8

    ckpt = load_checkpoint(Path(row["run_dir"]) / "checkpoints" / "last.ckpt")
    cfg = ckpt["genscale"]["config"]
    G, _ = _build_generator(cfg, ckpt["state_dict"], _run_data(cfg, "val"), use_ema=True)
    labels = class_labels(G, num)
    images = generate_uint8(G, cfg["model"]["z_dim"], num, seed, torch.device("cpu"), 0.0, labels)
    return _accuracy(judge, images, labels)


def add_mlp_judge(path: str, num: int) -> dict:
    """Scores every run in a results file with the MLP judge (no training of the GANs) and rewrites it."""
    from trainer.checkpointing import load_checkpoint

    result = json.loads(Path(path).read_text())
    first = load_checkpoint(Path(result["per_run"][0]["run_dir"]) / "checkpoints" / "last.ckpt")
    judge, acc = train_mlp_judge(first["genscale"]["config"])
    for row in result["per_run"]:
        row["class_consistency_mlp"] = judge_row(row, judge, num)
    result["mlp_judge_val_accuracy"] = acc
    result["summary"] = summarise(result["per_run"])
    Path(path).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result["summary"], indent=1, ensure_ascii=False), f"(MLP judge held-out accuracy {acc:.3f})")
    return result


def _spread(values, digits: int = 3) -> str:
    """Mean ± sample standard deviation over seeds (the value alone for one seed)."""
    values = list(values)
    if len(values) > 1:
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{values[0]:.{digits}f}"


def summarise(rows: List[dict]) -> Dict[str, dict]:
    out = {}
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            keys = ["fid", "class_consistency", "train_cpu_s"] + (
                ["class_consistency_mlp"] if all("class_consistency_mlp" in r for r in rs) else [])
            out[v] = {k: _spread([r[k] for r in rs]) for k in keys}
            out[v]["seeds"] = len(rs)
    return out


def merge(paths: List[str], out: str) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if len({p["iters"] for p in parts}) > 1 or len({tuple(p["overrides"]) for p in parts}) > 1:
        raise SystemExit("cond_gen --merge: the files were run with different --iters or overrides.")
    rows = sorted((r for p in parts for r in p["per_run"]), key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
    result = {"per_run": rows, "summary": summarise(rows), "iters": parts[0]["iters"], "overrides": parts[0]["overrides"]}
    if out:
        Path(out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result["summary"], indent=1, ensure_ascii=False))
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--num-eval", type=int, default=2000)
    ap.add_argument("--root", default="runs/knowledge_cond_gen")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="combine the results files of sweeps run in parallel (other seeds) into --out; no training")
    ap.add_argument("--judge-mlp", action="store_true",
                    help="score the runs in --out with an MLP judge on pixels (another model family); no training")
    ap.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    a = ap.parse_args(argv)
    if a.judge_mlp:
        return add_mlp_judge(a.out, a.num_eval)
    if a.merge:
        return merge(a.merge, a.out)
    rows = []
    if a.out and Path(a.out).exists():  # resumable: keep finished (variant, seed) rows
        rows = json.loads(Path(a.out).read_text())["per_run"]
    for seed in a.seeds:  # seed-major, so a stopped sweep still has complete seeds
        for v in a.variants:
            if any(r["variant"] == v and r["seed"] == seed for r in rows):
                continue
            rows.append(run_one(v, seed, a.iters, a.root, a.overrides, a.num_eval))
            result = {"per_run": rows, "summary": summarise(rows), "iters": a.iters, "overrides": a.overrides}
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    result = {"per_run": rows, "summary": summarise(rows), "iters": a.iters, "overrides": a.overrides}
    print(json.dumps(result["summary"], indent=1, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
