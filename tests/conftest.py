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
