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
from typing import Dict, List

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


def _spread(values) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    return f"{values[0]:.3f}"


def summarise(rows: List[dict]) -> Dict[str, dict]:
    out = {}
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            out[v] = {k: _spread([r[k] for r in rs]) for k in ("fid", "class_consistency", "train_cpu_s")}
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
    ap.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    a = ap.parse_args(argv)
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
