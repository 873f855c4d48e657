"""`-m gpu`: the speed work on CUDA. Device synchronisations per training step, as CUDA itself reports
them (torch.cuda.set_sync_debug_mode), equal what tests/integration/test_host_syncs.py counts on CPU;
and the switches on (fused Adam, channels_last, cuDNN autotuning) train like the plain path. Skipped
without a GPU; run with `python -m pytest -m gpu tests/gpu`."""
import warnings

import lightning as L
import pytest
import torch

from trainer.build import prepare_run, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "logging.wandb=false", "trainer.progress_bar=false"]
CASES = {  # experiment: (device syncs per step, overrides). On CUDA Adam is fused, so the finite check stays on
    # the device (trainer.finite_check=auto, trainer/finite.py): no sync at all (glow_digits trains with Adam).
    "gan_digits": (0, ["model.g_width=8", "model.d_width=8", "data.batch_size=16"]),
    "biggan_mnist5k": (0, ["data.name=digits", "model.g_width=4", "model.d_width=4", "model.shared_dim=8",
                           "data.batch_size=8", "trainer.sample_grid=10"]),
    "glow_digits": (0, ["data.batch_size=16", "ema.enabled=true"]),
}
CASES["biggan_mnist5k+host"] = (2, CASES["biggan_mnist5k"][1] + ["trainer.finite_check=host"])
CASES["glow_digits+host"] = (1, CASES["glow_digits"][1] + ["trainer.finite_check=host"])


class SyncWindow(L.Callback):
    """Counts CUDA's sync warnings between the first callback's batch start and the last one's batch end
    of steps 3..8 (no logging, checkpoint or sample step among them)."""

    def __init__(self, record: list):
        self.record, self.per_step, self.i, self.mark = record, {}, -1, None
        self.sources: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.i += 1
        if 3 <= self.i <= 8:
            torch.cuda.synchronize()
            self.mark = len(self.record)
            torch.cuda.set_sync_debug_mode("warn")

    def close(self):
        if self.mark is not None:
            torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in self.record[self.mark:] if "synchronizing" in str(w.message)]
            self.per_step[self.i] = len(syncs)
            self.sources += [f"step {self.i}: {w.filename}:{w.lineno}" for w in syncs]
            self.mark = None


class CloseWindow(L.Callback):
    def __init__(self, window: SyncWindow):
        self.window = window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.window.close()


@pytest.mark.parametrize("exp", list(CASES))
def test_device_syncs_per_step_on_cuda(exp, tmp_path):
    expected, extra = CASES[exp]
    run = prepare_run(exp.split("+")[0], GPU + extra + [f"logging.root={tmp_path}", "trainer.log_every=1000", "trainer.max_iters=10",
                                          "trainer.sample_every=0", "trainer.checkpoint.every_n_iters=0"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        window = SyncWindow(record)
        run.trainer.callbacks.insert(0, window)
        run.trainer.callbacks.append(CloseWindow(window))
        try:
            run.trainer.fit(run.module, datamodule=run.datamodule)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sorted(window.per_step) == list(range(3, 9))
    assert all(n == expected for n in window.per_step.values()), (window.per_step, window.sources)


def test_switches_on_cuda_train_like_the_plain_path(tmp_path):
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on both sides, so rounding is all that differs
    try:
        common = GPU + ["model.g_width=8", "model.d_width=8", "data.batch_size=16", "trainer.max_iters=4",
                        "trainer.sample_every=0", "trainer.checkpoint.every_n_iters=0", f"logging.root={tmp_path}"]
        plain = train("gan_digits", common + ["logging.run_id=plain", "trainer.cudnn_benchmark=false",
                                              "optim.g.impl=plain", "optim.d.impl=plain"])
        fast = train("gan_digits", common + ["logging.run_id=fast", "trainer.channels_last=true"])
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    assert fast.trainer.optimizers[0].defaults["fused"] is True  # impl auto on CUDA
    sa, sb = plain.module.state_dict(), fast.module.state_dict()
    for k, v in sa.items():
        if torch.is_floating_point(v) and k != "fixed_z":
            torch.testing.assert_close(sb[k], v, rtol=1e-3, atol=1e-3, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("ch, n", [(192, 64), (96, 128)])  # BigGAN-128's G and D attention at 64 px (ch 96)
def test_sdpa_attention_runs_the_memory_efficient_kernel_in_bf16(ch, n):
    """model.attention_impl=sdpa at BigGAN-128's sizes: the fused memory-efficient kernel takes it
    (sdpa_kernel allows no fallback to the materialising math path), and under bf16 autocast it agrees
    with the explicit softmax within bf16 rounding, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.layers import SelfAttention

    torch.manual_seed(0)
    ref, fused = SelfAttention(ch, impl="matmul").cuda(), SelfAttention(ch, impl="sdpa").cuda()
    with torch.no_grad():
        ref.gamma.fill_(1.0)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(n, ch, 64, 64, device="cuda")
    out = {}
    for name, net in (("ref", ref), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            y = net(xi).float()
        (y - x).square().mean().backward()
        out[name] = ((y - x).detach(), xi.grad, net.theta.weight.grad)
    (a0, gx0, gw0), (a1, gx1, gw1) = out["ref"], out["fused"]
    # on CPU bf16 autocast at 32 px the largest differences were 1.5% / 0.9% / 1.0% of the largest values
    assert (a1 - a0).abs().max() <= 0.03 * a0.abs().max()
    assert (gx1 - gx0).abs().max() <= 0.05 * gx0.abs().max()
    assert (gw1 - gw0).abs().max() <= 0.05 * gw0.abs().max()


@pytest.mark.parametrize("amp, grad_tol, at_most", [(None, 0.02, 0.7), (torch.bfloat16, 0.2, 0.5)])
def test_fused_glow_on_cuda_same_log_density_and_less_memory(amp, grad_tol, at_most):
    """flow.fused on CUDA: the same log-density and gradients as the separate layers, and the peak memory
    of a forward and backward above the weights falls as the CPU count of saved activations says (0.51
    fp32, 0.22 bf16 at glow_cifar10's width, for saved tensors alone; stated bounds for the peak, which also
    holds backward's transient buffers: 0.7 and 0.5, at width 128). Tolerances:
    fp32 convolutions run in TF32 on CUDA, and under bf16 autocast the two paths round at different
    points (on CPU, the same comparison: 0.56 nats of ~1,000 and gradients within 9% in norm in bf16,
    4e-4 in fp32); a wrong fold is off by far more."""
    from models.glow import Glow

    dev = torch.device("cuda")
    torch.manual_seed(0)
    glow = Glow(3, 32, levels=3, steps=4, hidden=128).to(dev)
    x = torch.rand(64, 3, 32, 32, device=dev) - 0.5
    glow.initialize_actnorm(x)
    with torch.no_grad():  # off the zero-initialised convs, so that every term and gradient is non-zero
        for p in glow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out, peak = {}, {}
    for fused in (False, True):
        glow.set_fused(fused)
        glow.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
            lp = glow.log_prob(x)
        lp.mean().backward()
        torch.cuda.synchronize()
        peak[fused] = torch.cuda.max_memory_allocated(dev) - base
        out[fused] = (lp.detach(), [p.grad.clone() for p in glow.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-3, atol=0.5)
    for (name, _), gf, gs in zip(glow.named_parameters(), out[True][1], out[False][1]):
        assert float((gf - gs).norm()) <= grad_tol * float(gs.norm()), name
    assert peak[True] < at_most * peak[False], peak


def test_fused_pgan_on_cuda_same_images_and_a_lighter_critic():
    """pgan.fused_scale on CUDA (cuDNN's stride-2 transposed and strided convolutions, NHWC, bf16 autocast):
    G's images as with the separate upsampling (the same function; bf16 rounds at other points), and D's
    forward and backward peak lower (on CPU its saved tensors drop from 243.7 to 137.6 MB at these sizes,
    0.56x; stated bound 0.8x for the peak, which also holds backward's transient buffers)."""
    from models.pgan import PGANDiscriminator, PGANGenerator

    dev = torch.device("cuda")
    torch.manual_seed(0)
    kw = dict(resolution=128, channels=3, fmap_base=1024, fmap_max=128)
    G = PGANGenerator(z_dim=64, **kw).to(dev, memory_format=torch.channels_last)
    D = PGANDiscriminator(**kw).to(dev, memory_format=torch.channels_last)
    z = torch.randn(16, 64, device=dev)
    x = torch.randn(16, 3, 128, 128, device=dev).contiguous(memory_format=torch.channels_last)
    images, peak = {}, {}
    for fused in (False, True):
        G.fused_scale = D.fused_scale = fused
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            images[fused] = G(z).float()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            score = D(x.requires_grad_())
        score.float().sum().backward()
        torch.cuda.synchronize()
        peak[fused] = torch.cuda.max_memory_allocated(dev) - base
        assert torch.isfinite(x.grad).all()
        x.grad = None
    # on CPU in bf16 each path is 2.1-2.4% off fp32 in relative norm at these sizes; a wrong kernel is O(1)
    err = float((images[True] - images[False]).norm() / images[False].norm())
    assert err <= 0.06, err
    assert peak[True] < 0.8 * peak[False], peak


def test_bench_profile_reads_the_gpu_kernels(tmp_path):
    """`bench train --profile` on CUDA: the records are the device's kernels (the convolutions among the
    costliest, cuDNN's by name), the device is busy for part of the unprofiled step, and each host
    launch has its kernel (eager: no CUDA graphs, so at least as many kernels as launches)."""
    from trainer.bench import run_train_bench

    row = run_train_bench("gan_digits", ["trainer.accelerator=gpu", "trainer.devices=1", f"logging.root={tmp_path}",
                                         "model.g_width=32", "model.d_width=32", "trainer.compile=off"],
                          batch=64, steps=3, warmup=2, profile=2, profile_top=50)
    p = row["profile"]
    assert p["device"] == "cuda" and p["iters"] == 2 and p["records_per_iter"] > 20
    assert 0 < p["busy"] < 1.5, p["busy"]
    assert p["kinds_ms_per_iter"].get("matmul/conv", 0) > 0, p["kinds_ms_per_iter"]
    assert p["host_per_iter"].get("launches", 0) > 10 and p["records_per_iter"] >= p["host_per_iter"]["launches"]
    assert not any(t["name"].startswith("aten::") for t in p["top"])  # device records, not CPU ops


def test_glow_compiled_per_step_with_cuda_graphs_gives_eager_log_density(tmp_path):
    """trainer.compile_scope=block under reduce-overhead: each flow step a CUDA graph of its own, replayed
    for every step of its level within one training step. After real training steps, the compiled flow's
    log p(x) and gradients on a fresh batch equal the eager flow's on the same weights (TF32 convolutions
    on both sides)."""
    run = train("glow_digits", GPU + [f"logging.root={tmp_path}", "data.batch_size=16", "flow.steps=4",
                                      "trainer.max_iters=4", "trainer.sample_every=0", "trainer.checkpoint.every_n_iters=0",
                                      "trainer.compile=reduce-overhead", "trainer.compile_scope=block"])
    m = run.module.to("cuda")
    assert m.it == 4 and set(m._compiled) == {"glow"}
    torch.manual_seed(1)
    x = m.prep(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8))  # on the module's device (CUDA)
    out = {}
    for name, net in (("eager", m.glow), ("compiled", m._compiled["glow"])):
        m.glow.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        logp, _ = net(x)
        logp.mean().backward()
        out[name] = (logp.detach().clone(), [p.grad.clone() for p in m.glow.parameters()])
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-4, atol=1e-2)
    for ge, gc in zip(out["eager"][1], out["compiled"][1]):
        assert float((gc - ge).norm()) <= 1e-2 * float(ge.norm()) + 1e-6


def test_largest_batch_under_a_memory_cap_on_cuda(tmp_path):
    """`bench memory` on CUDA, the allocator capped at 1.5 GB: real probe processes run out of memory
    above some batch; the answer's peak reserved memory is within the cap, the next multiple ran out
    of memory, and peak memory grows with the batch among the batches that fit."""
    import json

    from launch.cli import main

    out = tmp_path / "memory.jsonl"
    rc = main(["bench", "memory", "wgan_gp_mnist5k", "trainer.accelerator=gpu", f"logging.root={tmp_path}",
               "data.resolution=64", "model.g_width=64", "model.d_width=64", "--start", "64", "--multiple", "64",
               "--max", "4096", "--memory-gb", "1.5", "--precision", "32", "--no-compile", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    best, probes = r["largest_batch"], {p["batch"]: p for p in r["probes"]}
    assert best is not None and r["smallest_failing"] == best + 64, sorted(probes)
    assert probes[best]["fits"] and probes[best]["peak_reserved_gb"] <= 1.5
    assert probes[best + 64]["error"] == "out of memory" and probes[best]["memory_limit_gb"] == 1.5
    fitting = [probes[b]["peak_mem_gb"] for b in sorted(probes) if probes[b]["fits"]]
    assert fitting == sorted(fitting) and len(fitting) >= 2, fitting
