"""2-process CPU DDP (gloo) FlowModule run with different data per rank: the ActNorm init from
all-reduced moments leaves the ranks' parameters identical, and they stay identical after steps."""
from pathlib import Path

import torch

from models.glow import squeeze2d

from tests.distributed.helpers import ForkedWorker, clean_env, finish_all, free_port

WORKER = Path(__file__).with_name("flow_worker.py")


def test_flow_ddp_ranks_identical_after_init_and_steps(tmp_path):
    port = str(free_port())
    procs = []
    for r in range(2):
        env = clean_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(r))
        procs.append(ForkedWorker(WORKER, [tmp_path, "3"], env))
    finish_all(procs, timeout=240)
    for stage in ("init", "final"):
        p0, p1 = (torch.load(tmp_path / f"{stage}_rank{r}.pt") for r in range(2))
        assert p0.keys() == p1.keys()
        for k in p0:
            assert torch.equal(p0[k], p1[k]), (stage, k)
    init, final = torch.load(tmp_path / "init_rank0.pt"), torch.load(tmp_path / "final_rank0.pt")
    assert any(not torch.equal(init[k], final[k]) for k in init)  # the steps did change the weights
    # The first ActNorm sees squeeze(x): its bias is minus the per-channel mean of the union batch.
    x0, x1 = (torch.load(tmp_path / f"init_batch_rank{r}.pt") for r in range(2))
    bias = init["levels.0.steps.0.actnorm.bias"].flatten()
    union = -squeeze2d(torch.cat([x0, x1])).double().mean(dim=(0, 2, 3))
    local = -squeeze2d(x0).double().mean(dim=(0, 2, 3))
    assert torch.allclose(bias.double(), union, atol=1e-6)
    assert (bias.double() - local).abs().max() > 0.05  # a per-rank init would have given this


def test_glow_digits_through_build_on_two_processes(tmp_path):
    """`train("glow_digits", devices=2)`: strategy auto picks Lightning's DDP for a flow, both ranks
    end with identical parameters (ActNorm init and EMA included), and one run directory is written."""
    import json

    from tests.conftest import tiny
    from tests.distributed.helpers import start_ranks

    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=4", "trainer.log_every=1",
                  "trainer.checkpoint.every_n_iters=2", "trainer.sample_every=2", "ema.enabled=true",
                  "logging.run_id=ddp")
    out = tmp_path / "out"
    finish_all(start_ranks(out, "glow_digits", *common))
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["strategy"] for i in info] == ["DDPStrategy"] * 2 and info[0]["world_size"] == 2
    assert info[0]["iteration"] == info[1]["iteration"] == 4
    s0, s1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    run_dir = tmp_path / "runs" / "glow_digits" / "ddp"
    assert (run_dir / "checkpoints" / "iter-0000004.ckpt").exists()
    import csv
    with open(run_dir / "metrics.csv") as fh:
        its = [int(float(r["iteration"])) for r in csv.DictReader(fh) if r.get("train/bpd")]
    assert its == [1, 2, 3, 4]
