"""Progressive GAN on 2 gloo ranks (gan_ddp): blocks not yet grown have no gradients (the per-phase
all-reduce keeps them None on both ranks), the optimisers reset together when G and D grow, and every
parameter and buffer, G_ema included, stays identical across ranks through the 4 -> 8 px fade-in."""
import json

import torch

from tests.conftest import tiny
from tests.distributed.helpers import finish_all, start_ranks
from tests.integration.test_pgan_train import TINY


def test_pgan_grows_identically_on_two_ranks(tmp_path):
    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=5", "trainer.checkpoint.every_n_iters=5",
                  "logging.run_id=pg", *TINY)
    finish_all(start_ranks(tmp_path / "out", "pgan_mnist5k", *common))
    meta = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [m["strategy"] for m in meta] == ["GANDDPStrategy"] * 2 and meta[0]["iteration"] == 5
    s0, s1 = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2))
    assert int(s0["pgan_level"]) == 1  # it grew to 8 px
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
