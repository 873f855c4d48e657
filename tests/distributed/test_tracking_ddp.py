"""Only rank 0 of a 2-process job creates the W&B run; its history holds the rank-averaged rows."""
from pathlib import Path

import pytest

from tests.conftest import tiny
from tests.distributed import helpers
from trainer.tracking import offline_runs, read_history, run_file


@pytest.mark.slow
def test_only_rank0_creates_a_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers, "WORKER", Path(helpers.__file__).with_name("tracking_worker.py"))
    overrides = [o for o in tiny(tmp_path, "trainer.accelerator=cpu", "data.batch_size=16", "trainer.max_iters=2",
                                 "trainer.log_every=1", "trainer.sample_every=2", "logging.run_id=ddp")
                 if o != "logging.wandb=false"]
    helpers.finish_all(helpers.start_ranks(tmp_path / "out", "gan_digits", *overrides))
    inits = (tmp_path / "out" / "wandb_inits.log").read_text().split()
    assert inits[0::2] == ["0"], f"wandb.init calls by rank: {inits[0::2]}"
    run_dir = tmp_path / "runs" / "gan_digits" / "ddp"
    (offline,) = offline_runs(run_dir)
    rows = read_history(run_file(offline))
    assert [r["iteration"] for r in rows if "g/loss" in r] == [1, 2]
    assert any("samples/filenames" in r for r in rows)
