"""trainer.strategy=deepspeed: real DeepSpeed engines (one per network) on 2 CPU processes with gloo.

(a) A WGAN-GP update with ZeRO 1 and ZeRO 2 (2 ranks x batch 8; ZeRO 2 also with 2 micro-batches of
    4) equals the single-process gan_ddp update with batch 16 (both draw one global set of latents).
(b) Glow with one engine under ZeRO 2 makes the same updates as Lightning's DDP on the same data.
(c) Save, kill, resume: a run resumed from its iteration-2 DeepSpeed checkpoint (partitioned Adam
    state included) ends where the uninterrupted run ended; the plain export beside it loads for
    sampling; a NaN on one rank skips the step on both; the D loss falls; bf16 autocast runs.
(d) A learned knowledge constraint trains G, D and phi the same under ZeRO-1 as under gan_ddp.
"""
import csv
import json
import shutil

import pytest
import torch

from tests.conftest import tiny
from tests.distributed.helpers import finish, finish_all, start_ranks, start_worker
from trainer.checkpointing import load_checkpoint

pytestmark = pytest.mark.slow


def _close(a, b, where, rtol=1e-4, atol=1e-6):
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{where}: max abs diff {(a - b).abs().max():.3g}"


def _ckpt(tmp_path, exp, run_id, it):
    return load_checkpoint(tmp_path / "runs" / exp / run_id / "checkpoints" / f"iter-{it:07d}.ckpt")


def test_zero1_and_zero2_updates_equal_single_process_double_batch(tmp_path):
    common = tiny(tmp_path, "loss.name=wgan_gp", "model.d_norm=layer", "model.g_norm=none", "data.batch_size=16",
                  "trainer.accelerator=cpu", "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=1",
                  "trainer.sample_every=0", "optim.n_critic=1")
    flags = ["--global-latents"]
    single = start_worker(tmp_path / "single", "gan_digits", *common, "trainer.devices=1", "logging.run_id=single",
                          flags=flags)
    finish(single)
    # ZeRO 1 and 2 against one process; ZeRO 2 with 2 micro-batches against gan_ddp with the same split
    runs = {"z1": ("single", ["trainer.strategy=deepspeed", "trainer.zero_stage=1"]),
            "z2": ("single", ["trainer.strategy=deepspeed", "trainer.zero_stage=2"]),
            "ddpacc": (None, ["trainer.strategy=gan_ddp", "optim.accumulate=2"]),
            "z2acc": ("ddpacc", ["trainer.strategy=deepspeed", "trainer.zero_stage=2", "optim.accumulate=2"])}
    for name, (_, extra) in runs.items():
        finish_all(start_ranks(tmp_path / name, "gan_digits", *common, *extra, f"logging.run_id={name}", flags=flags))
    for name, (ref, _) in runs.items():
        if ref is None:
            continue
        meta = json.loads((tmp_path / name / "rank0.json").read_text())
        assert meta["strategy"] == "MultiEngineDeepSpeedStrategy" and meta["world_size"] == 2
        for it in (1, 2):
            one, two = _ckpt(tmp_path, "gan_digits", ref, it), _ckpt(tmp_path, "gan_digits", name, it)
            assert two["genscale"]["deepspeed"]["engines"] == ["G", "D"]
            first = _ckpt(tmp_path, "gan_digits", ref, 1)["state_dict"]
            moved = 0
            for k, v in one["state_dict"].items():
                if v.is_floating_point():
                    _close(two["state_dict"][k], v, f"{name} vs {ref} iter {it} {k}")
                    moved += int(it == 2 and not torch.equal(v, first[k]))
            assert it == 1 or moved > 10  # the second step really changed the weights
    # the ZeRO-2 partitions: one optimiser-state file per rank and engine
    ds = tmp_path / "runs" / "gan_digits" / "z2acc" / "checkpoints" / "iter-0000002.ckpt.ds"
    assert sorted(p.name for p in (ds / "D").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_glow_single_engine_matches_ddp(tmp_path):
    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=3", "trainer.checkpoint.every_n_iters=3",
                  "trainer.sample_every=0", "trainer.log_every=1")
    finish_all(start_ranks(tmp_path / "ddp", "glow_digits", *common, "logging.run_id=ddp"))
    finish_all(start_ranks(tmp_path / "ds", "glow_digits", *common, "trainer.strategy=deepspeed",
                           "trainer.zero_stage=2", "logging.run_id=ds"))
    assert json.loads((tmp_path / "ds" / "rank0.json").read_text())["strategy"] == "MultiEngineDeepSpeedStrategy"
    ref, got = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ds" / "rank0.pt")
    for k, v in ref.items():
        if v.is_floating_point():
            _close(got[k], v, k, rtol=1e-4, atol=1e-5)
    bpd = []
    with open(tmp_path / "runs" / "glow_digits" / "ds" / "metrics.csv") as fh:
        bpd = [float(r["train/bpd"]) for r in csv.DictReader(fh) if r.get("train/bpd")]
    assert len(bpd) == 3 and bpd[-1] < bpd[0]


@pytest.fixture(scope="module")
def gan_ds_runs(tmp_path_factory):
    """ZeRO 2, BatchNorm G and D, EMA: 6 iterations straight, and the same run resumed from iteration 2
    after its later checkpoints were deleted (as if killed); rank 1's D loss is NaN at D step 3."""
    tmp = tmp_path_factory.mktemp("ds_gan")
    common = tiny(tmp, "trainer.accelerator=cpu", "data.batch_size=16", "trainer.log_every=1", "optim.n_critic=1",
                  "trainer.sample_every=0", "trainer.checkpoint.every_n_iters=2", "trainer.checkpoint.save_top_k=-1",
                  "trainer.strategy=deepspeed", "trainer.zero_stage=2", "optim.d.lr=0.001")
    flags = ["--nan-d-step", "3"]
    finish_all(start_ranks(tmp / "straight", "gan_digits", *common, "trainer.max_iters=6", "logging.run_id=a",
                           flags=flags))
    # the same run again, "killed" after iteration 2: its later checkpoints are gone
    finish_all(start_ranks(tmp / "first", "gan_digits", *common, "trainer.max_iters=6", "logging.run_id=b",
                           flags=flags))
    ckdir = tmp / "runs" / "gan_digits" / "b" / "checkpoints"
    for it in (4, 6):
        (ckdir / f"iter-{it:07d}.ckpt").unlink()
        shutil.rmtree(ckdir / f"iter-{it:07d}.ckpt.ds")
    (ckdir / "last.ckpt").unlink()
    finish_all(start_ranks(tmp / "resumed", "gan_digits", f"resume={ckdir / 'iter-0000002.ckpt'}",
                           "trainer.max_iters=6", flags=flags))
    return tmp


def test_resume_from_deepspeed_checkpoint_equals_uninterrupted_run(gan_ds_runs):
    straight = torch.load(gan_ds_runs / "straight" / "rank0.pt")
    resumed = torch.load(gan_ds_runs / "resumed" / "rank0.pt")
    for r in (0, 1):
        meta = json.loads((gan_ds_runs / "resumed" / f"rank{r}.json").read_text())
        assert meta["iteration"] == 6 and meta["nonfinite"] == 1  # the NaN step, skipped once
    assert int(resumed["images_seen"]) == 6 * 16
    for k, v in straight.items():
        if v.is_floating_point():
            _close(resumed[k], v, k, rtol=1e-5, atol=1e-6)
            assert torch.isfinite(v).all(), k


def test_ranks_identical_and_nan_step_skipped_everywhere(gan_ds_runs):
    s0, s1 = (torch.load(gan_ds_runs / "straight" / f"rank{r}.pt") for r in range(2))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    rows = list(csv.DictReader(open(gan_ds_runs / "runs" / "gan_digits" / "a" / "metrics.csv")))
    d = [float(r["d/loss"]) for r in rows if r.get("d/loss") not in (None, "")]
    assert len(d) == 6 and int(float(rows[-1]["train/nonfinite_skipped"])) == 1
    assert d[-1] < d[0]  # D learns to tell digits from noise


def test_plain_export_beside_deepspeed_state_samples(gan_ds_runs, tmp_path):
    from launch.cli import main

    ckpt = gan_ds_runs / "runs" / "gan_digits" / "a" / "checkpoints" / "iter-0000006.ckpt"
    info = load_checkpoint(ckpt)
    assert info["genscale"]["deepspeed"]["dir"] == "iter-0000006.ckpt.ds" and info["optimizer_states"] == []
    assert all(v.dtype == torch.float32 for v in info["state_dict"].values() if v.is_floating_point())
    out = tmp_path / "grid.png"
    assert main(["sample", str(ckpt), "--num", "16", "--out", str(out)]) in (0, None)
    assert out.stat().st_size > 0


def test_bf16_autocast_engines_train(tmp_path):
    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=2", "trainer.sample_every=0",
                  "trainer.strategy=deepspeed", "trainer.zero_stage=1", "trainer.precision=bf16-mixed",
                  "loss.name=wgan_gp", "model.d_norm=layer", "trainer.checkpoint.every_n_iters=2", "logging.run_id=bf")
    finish_all(start_ranks(tmp_path / "bf", "gan_digits", *common))
    state = torch.load(tmp_path / "bf" / "rank0.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert state["G.fc.weight"].dtype == torch.float32  # fp32 weights in the engines, bf16 compute


@pytest.mark.parametrize("strategy", ["gan_ddp", "deepspeed"])
def test_class_conditional_biggan_on_two_ranks(tmp_path, strategy):
    """BigGAN (labels to G and D, spectral norm u-vectors, conditional BatchNorm, attention, ortho
    regulariser) on 2 ranks: all parameters and buffers, SN u-vectors and G_ema included, stay
    identical across ranks; the run's checkpoint records the data's 10 classes."""
    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=3", "trainer.sample_every=0",
                  "trainer.checkpoint.every_n_iters=3", "data.batch_size=8", "model.g_width=4", "model.d_width=4", "model.shared_dim=8",
                  f"trainer.strategy={strategy}", "trainer.zero_stage=2", "logging.run_id=bg")
    finish_all(start_ranks(tmp_path / "out", "biggan_mnist5k", *common))
    s0, s1 = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2))
    assert any(k.endswith(".u") or "_u" in k for k in s0), "spectral-norm u-vectors are in the state"
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    ckpt = _ckpt(tmp_path, "biggan_mnist5k", "bg", 3)
    assert ckpt["genscale"]["config"]["model"]["num_classes"] == 10
    assert ("deepspeed" in ckpt["genscale"]) == (strategy == "deepspeed")


def test_knowledge_constraint_under_deepspeed_matches_gan_ddp(tmp_path):
    """A learned class-consistency constraint on a tiny conditional BigGAN: 2 ranks under ZeRO-1 make
    the same G, D and phi updates as 2 ranks under gan_ddp (the reverse-KL term goes through the G
    engine's backward; phi's IRL gradients are averaged over ranks by the callback in both)."""
    common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=1",
                  "trainer.sample_every=0", "trainer.log_every=1", "data.name=digits", "data.resolution=32",
                  "model.g_width=4", "model.d_width=4", "model.shared_dim=8", "data.batch_size=8",
                  "knowledge.enabled=true", "knowledge.learned=true", "knowledge.classifier_epochs=1",
                  "knowledge.phi_lr=0.01", "knowledge.keep_samples=8",
                  # Adam with eps >> |grad| is ~SGD: float noise in tiny gradients (another summation order
                  # across engines) stays noise instead of becoming +-lr steps, so the comparison is tight
                  "optim.g.eps=1.0", "optim.d.eps=1.0", "optim.g.lr=0.05", "optim.d.lr=0.05")
    runs = {"ddp": ["trainer.strategy=gan_ddp"], "ds": ["trainer.strategy=deepspeed", "trainer.zero_stage=1"]}
    for name, extra in runs.items():
        finish_all(start_ranks(tmp_path / name, "biggan_mnist5k", *common, *extra, f"logging.run_id={name}"))
    first = _ckpt(tmp_path, "biggan_mnist5k", "ddp", 1)
    for it in (1, 2):
        ref, got = (_ckpt(tmp_path, "biggan_mnist5k", n, it) for n in ("ddp", "ds"))
        assert got["genscale"]["deepspeed"]["engines"] == ["G", "D"]
        for k, v in ref["state_dict"].items():
            if v.is_floating_point():
                _close(got["state_dict"][k], v, f"iter {it} {k}")
        k_ref, k_got = ref["callbacks"]["KnowledgeCallback"], got["callbacks"]["KnowledgeCallback"]
        assert k_ref["counters"] == k_got["counters"] and k_got["counters"]["phi_steps"] == it
        for k, v in k_ref["phi"].items():
            if v.is_floating_point():
                _close(k_got["phi"][k], v, f"phi iter {it} {k}")
    phi_moved = [k for k, v in first["callbacks"]["KnowledgeCallback"]["phi"].items()
                 if v.is_floating_point() and not torch.equal(v, ref["callbacks"]["KnowledgeCallback"]["phi"][k])]
    assert phi_moved, "phi did not change between iterations 1 and 2"
