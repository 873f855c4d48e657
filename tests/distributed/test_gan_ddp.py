"""gan_ddp: 2 CPU processes with gloo, launched by Lightning from a worker script (tests/distributed/worker.py).

(a) one process with global batch 2b and two with b each make the same update (WGAN-GP, layer-norm
    critic, both runs drawing their latents / penalty weights from one global set);
(b) after several steps (BatchNorm in G and D, EMA, a NaN injected on rank 1 only) every parameter
    and buffer is identical on both ranks;
(c) only rank 0 writes checkpoints, sample grids and metric rows; resume continues the same run.
"""
import csv
import json

import pytest
import torch

from tests.conftest import tiny
from tests.distributed.helpers import finish, finish_all, run_worker, start_ranks, start_worker
from trainer.checkpointing import load_checkpoint


def _close(a, b, where, rtol=1e-4, atol=1e-6):
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{where}: max abs diff {(a - b).abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode", ["off", "default"])
def test_ddp_update_equals_single_process_update_with_double_batch(tmp_path, compile_mode):
    """Also with torch.compile (G, D and the gradient penalty compiled), which the GPU experiments ship
    with: compiled networks must not bypass gan_ddp's gradient averaging."""
    common = tiny(tmp_path, "loss.name=wgan_gp", "model.d_norm=layer", "model.g_norm=none", "data.batch_size=16",
                  "trainer.accelerator=cpu", "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=1",
                  "trainer.sample_every=0", "optim.n_critic=1", f"trainer.compile={compile_mode}")
    # one process, batch 16; two processes, batch 8 each (data.batch_size is the global batch)
    single = start_worker(tmp_path / "single", "gan_digits", *common, "trainer.devices=1", "logging.run_id=single",
                          flags=["--global-latents"])
    ddp = start_ranks(tmp_path / "ddp", "gan_digits", *common, "trainer.strategy=gan_ddp", "logging.run_id=ddp",
                      flags=["--global-latents"])
    finish(single)
    finish_all(ddp)
    rank0 = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    assert rank0["world_size"] == 2
    assert rank0["compiled"] == ([] if compile_mode == "off" else ["D", "G", "gradient_penalty"])
    ckpts = tmp_path / "runs" / "gan_digits"
    for it in (1, 2):
        one = load_checkpoint(ckpts / "single" / "checkpoints" / f"iter-{it:07d}.ckpt")
        two = load_checkpoint(ckpts / "ddp" / "checkpoints" / f"iter-{it:07d}.ckpt")
        for k, v in one["state_dict"].items():
            if v.is_floating_point():
                _close(two["state_dict"][k], v, f"iter {it} {k}")
        # Adam's first moments are scaled gradients: this is sensitive to their size, not just their sign
        for o, (s1, s2) in enumerate(zip(one["optimizer_states"], two["optimizer_states"])):
            for p, st in s1["state"].items():
                assert o == 1 or st["exp_avg"].abs().max() > 0  # (a WGAN critic's output bias gets none)
                for name in ("exp_avg", "exp_avg_sq"):
                    ref = st[name]
                    _close(s2["state"][p][name], ref, f"iter {it} optimizer {o} param {p} {name}",
                           rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-process run (strategy auto -> gan_ddp) with BatchNorm in G and D and EMA, launched by Lightning
    itself (rank 1 re-runs the worker script and joins rank 0's run directory); then a resume with
    both ranks started together, as torchrun starts them."""
    tmp = tmp_path_factory.mktemp("ddp_run")
    common = tiny(tmp, "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16",
                  "trainer.log_every=1", "ema.rampup_iters=2")
    out1, out2 = tmp / "first", tmp / "resumed"
    run_worker(out1, "gan_digits", *common, "trainer.max_iters=6", "trainer.checkpoint.every_n_iters=3",
               "trainer.sample_every=3", flags=["--nan-d-step", "2"])
    run_dir = json.loads((out1 / "rank0.json").read_text())["run_dir"]
    finish_all(start_ranks(out2, "gan_digits", f"resume={run_dir}", "trainer.max_iters=8"))
    return tmp, out1, out2


@pytest.mark.slow
@pytest.mark.parametrize("part", ["first", "resumed"])
def test_ddp_ranks_stay_identical(ddp_run, part):
    _, out1, out2 = ddp_run
    out = out1 if part == "first" else out2
    meta = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in meta] == [2, 2]
    assert meta[0]["strategy"] == "GANDDPStrategy"  # chosen by strategy=auto for 2 devices
    assert meta[0]["iteration"] == meta[1]["iteration"] == (6 if part == "first" else 8)
    # the NaN was injected on rank 1 only: both ranks skipped that D step
    assert meta[0]["nonfinite"] == meta[1]["nonfinite"] == 1
    s0, s1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert set(s0) == set(s1)
    assert any(k.startswith("G_ema.") for k in s0)
    assert any("running_mean" in k for k in s0 if k.startswith("D."))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
        if s0[k].is_floating_point():
            assert torch.isfinite(s0[k]).all(), k
    # BatchNorm statistics really moved (they are not trivially equal at their initial values)
    assert not torch.allclose(s0["D.features.3.running_var"], torch.ones(1))
    assert int(s0["D.features.3.num_batches_tracked"]) > 0


@pytest.mark.slow
def test_ddp_rank0_alone_writes_and_resume_continues_the_run(ddp_run):
    tmp, out1, out2 = ddp_run
    runs = list((tmp / "runs" / "gan_digits").iterdir())
    assert len(runs) == 1, runs  # rank 1 joined rank 0's run directory, the resume too
    run_dir = runs[0]
    for out in (out1, out2):
        writes = [line.split() for line in (out / "writes.log").read_text().splitlines()]
        assert writes and {w[0] for w in writes} == {"0"}, writes
    kinds = {(w.split()[1], w.split()[2].rsplit("/", 1)[-1]) for w in (out1 / "writes.log").read_text().splitlines()}
    assert {("ckpt", "iter-0000003.ckpt"), ("ckpt", "iter-0000006.ckpt"), ("samples", "iter_0000003.png"),
            ("samples", "iter_0000006.png")} <= kinds
    resumed = {w.split()[2].rsplit("/", 1)[-1] for w in (out2 / "writes.log").read_text().splitlines()}
    assert "iter-0000008.ckpt" in resumed and "iter-0000006.ckpt" not in resumed
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["genscale"]["iteration"] == 8
    assert ckpt["genscale"]["world_size"] == 2
    assert ckpt["genscale"]["images_seen"] == 8 * 16  # global batch 16 per D step, n_critic 1
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    its = [int(float(r["iteration"])) for r in rows]
    assert its == list(range(1, 9))  # one row per iteration: no rank wrote twice, resume appended
    # the global batch of an update, and its split: 2 ranks x 1 micro-batch of 8
    assert {(float(r["train/effective_batch"]), float(r["train/micro_batch_per_rank"])) for r in rows} == {(16.0, 8.0)}
    final = torch.load(out2 / "rank0.pt")
    for k in ("D.features.0.weight", "G_ema.fc.weight", "D.features.3.running_mean"):
        assert torch.equal(final[k], ckpt["state_dict"][k]), k
