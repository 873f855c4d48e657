import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


def tiny(tmp_path, *extra):
    """Overrides for seconds-long CPU runs that write everything under tmp_path."""
    return [f"logging.root={tmp_path}/runs", "trainer.progress_bar=false", "logging.wandb=false",
            f"eval.features_dir={tmp_path}/features", *extra]


@pytest.fixture
def tiny_overrides(tmp_path):
    return lambda *extra: tiny(tmp_path, *extra)
