import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# One intra-op thread: on 2-core machines with other processes (W&B's service, workers) two OpenMP
# threads were measured 20-40x slower on small ops than one.
torch.set_num_threads(int(os.environ.get("GENSCALE_TEST_THREADS", "1")))


def tiny(tmp_path, *extra):
    """Overrides for seconds-long CPU runs that write everything under tmp_path."""
    return [f"logging.root={tmp_path}/runs", "trainer.progress_bar=false", "logging.wandb=false",
            f"eval.features_dir={tmp_path}/features", *extra]


@pytest.fixture
def tiny_overrides(tmp_path):
    return lambda *extra: tiny(tmp_path, *extra)


# A 2x2 grid sweep in W&B's format over tiny gan_digits runs (used by the local and SLURM sweep tests).
SWEEP_SPEC = """
program: launch/cli.py
method: grid
parameters:
  optim.d.lr: {values: [0.0001, 0.0002]}
  model.g_width: {values: [8, 16]}
  trainer.max_iters: {value: 2}
command:
  - ${env}
  - ${interpreter}
  - -m
  - launch.cli
  - train
  - gan_digits
  - ${args_no_hyphens}
  - LOGROOT
  - logging.wandb=false
  - trainer.progress_bar=false
  - trainer.sample_every=0
  - trainer.cpu_threads=1
"""


@pytest.fixture
def sweep_file(tmp_path):
    """Writes a sweep YAML (the 2x2 grid unless `text` is given) whose runs go to tmp_path/runs."""
    def write(text: str = SWEEP_SPEC):
        p = tmp_path / "sweep.yaml"
        p.write_text(text.replace("LOGROOT", f"logging.root={tmp_path}/runs"))
        return p
    return write
