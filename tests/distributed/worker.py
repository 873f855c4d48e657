"""Runs `trainer.build.train` in a child process for the distributed tests.

    python worker.py [--global-latents] [--nan-d-step K] OUT EXPERIMENT [override ...]

Lightning re-runs this same command for rank 1 (devices=2), so every patch below applies on all
ranks. At the end each rank saves its module state to OUT/rank<r>.pt and appends every file write
it made (checkpoints, sample grids, metric rows) to OUT/writes.log as "rank kind path".
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("experiment")
    ap.add_argument("--global-latents", action="store_true",
                    help="each rank uses its slice of one global set of latents and penalty weights")
    ap.add_argument("--nan-d-step", type=int, default=-1, help="rank 1's D loss is NaN at this D step")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from trainer import gan_module
    from trainer.callbacks import samples
    from trainer.checkpointing import AtomicCheckpointIO
    from trainer.csv_log import _AppendingWriter

    def record(kind, path):
        with open(out / "writes.log", "a") as fh:
            fh.write(f"{_rank()} {kind} {path}\n")

    save_ckpt = AtomicCheckpointIO.save_checkpoint
    AtomicCheckpointIO.save_checkpoint = lambda self, ckpt, path, *a, **k: (record("ckpt", path), save_ckpt(self, ckpt, path, *a, **k))[1]
    save_grid = samples.save_grid
    samples.save_grid = lambda images, path: (record("samples", path), save_grid(images, path))[1]
    save_rows = _AppendingWriter.save
    _AppendingWriter.save = lambda self: (record("metrics", self.metrics_file_path), save_rows(self))[1]

    if args.global_latents:
        def global_slice(kind, shape_fn):
            def sample(self, n, gen):
                counter = f"_calls_{kind}"
                setattr(self, counter, getattr(self, counter, 0) + 1)
                world, rank = self.trainer.world_size, self.global_rank
                g = torch.Generator().manual_seed(1000 * getattr(self, counter) + (kind == "mix"))
                full = shape_fn(self, n * world, g)
                return full[rank * n:(rank + 1) * n].to(self.device)
            return sample

        gan_module.GANModule.sample_latents = global_slice("z", lambda self, n, g: torch.randn(n, self.z_dim, generator=g))
        gan_module.GANModule.sample_mix = global_slice("mix", lambda self, n, g: torch.rand(n, generator=g))

    if args.nan_d_step >= 0:
        d_step = gan_module.GANModule.d_step

        def poisoned(self, real, gen, opt, *rest):
            if int(self.d_steps) == args.nan_d_step and self.global_rank == 1:
                real = real * float("nan")
            return d_step(self, real, gen, opt, *rest)
        gan_module.GANModule.d_step = poisoned

    from trainer.build import train

    run = train(args.experiment, args.overrides)
    rank = run.trainer.global_rank
    torch.save({k: v.detach().cpu().clone() for k, v in run.module.state_dict().items()}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "run_dir": str(run.run_dir), "world_size": run.trainer.world_size, "iteration": int(run.module.iteration),
        "strategy": type(run.trainer.strategy).__name__, "nonfinite": int(run.module.nonfinite_total),
        "compiled": sorted(getattr(run.module, "_compiled", None) or {})}))


if __name__ == "__main__":
    sys.exit(main())
