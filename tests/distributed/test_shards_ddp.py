"""Shards under real 2-process DDP (gloo, gan_ddp): deliberately uneven shards (1500 and 117 train
samples), several resampled epochs and one DataLoader worker per rank: every rank yields the same
number of batches, so the run neither hangs nor desynchronises (a rank short of batches would leave
the other waiting in a collective until the timeout)."""
import json

import pytest

from data_pipelines.shards import write_shards
from tests.conftest import tiny
from tests.distributed.helpers import finish_all, start_ranks
from trainer.checkpointing import load_checkpoint


@pytest.mark.slow
def test_ddp_on_uneven_shards_resampled(tmp_path):
    index = write_shards("digits", tmp_path / "shards", resolution=16, encoding="raw", maxcount=1500)
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [1500, 117]
    common = tiny(tmp_path, "trainer.accelerator=cpu", "data.name=shards", f"data.path={tmp_path / 'shards'}",
                  "data.batch_size=16", "data.num_workers=1", "data.epoch_batches=3", "data.shuffle_buffer=50",
                  "trainer.max_iters=7", "trainer.checkpoint.every_n_iters=7", "trainer.sample_every=0",
                  "logging.run_id=ddp")
    finish_all(start_ranks(tmp_path / "out", "gan_digits", *common), timeout=300)
    meta = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in meta] == [2, 2] and [m["iteration"] for m in meta] == [7, 7]
    state = load_checkpoint(tmp_path / "runs" / "gan_digits" / "ddp")["ShardDataModule"]
    assert (state["epoch"], state["batches_in_epoch"]) == (2, 1)  # 7 batches of 3-batch epochs, per rank
