"""The speed switches (trainer/speed.py) train like the plain path on CPU, in fp32: optimiser impl
plain/foreach/fused, trainer.channels_last, trainer.compile (GAN with a gradient penalty, and Glow),
and trainer.cudnn_benchmark reaches torch. Each compares the weights after a few real `genscale train`
iterations against the default path from the same seed."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from trainer.build import build_module, build_trainer, train
from trainer.config import ConfigError, load_config
from trainer.speed import match_state_layout, optimizer_kwargs

CL = torch.channels_last


def _run(tmp_path, experiment, run_id, *extra):
    return train(experiment, [f"logging.root={tmp_path}", f"logging.run_id={run_id}", "logging.wandb=false",
                              "trainer.progress_bar=false", "trainer.sample_every=0",
                              "trainer.checkpoint.every_n_iters=0", "trainer.deterministic=true", *extra])


def _initial_state(run) -> dict:
    """The weights the run started from (prepare_run seeds, then builds; digits: 1 channel, 10 classes)."""
    L.seed_everything(run.cfg.trainer.seed, verbose=False)
    return build_module(run.cfg, channels=1, num_classes=10).state_dict()


def _assert_close_weights(a, b, atol):
    """Same weights within tolerance, and training moved them by far more than the tolerance."""
    sa, sb, s0 = a.module.state_dict(), b.module.state_dict(), _initial_state(a)
    assert sa.keys() == sb.keys() == s0.keys()  # compiled or NHWC networks keep the checkpoint's keys
    floats = [k for k in sa if torch.is_floating_point(sa[k]) and k != "fixed_z"]
    for k in floats:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")
    moved = max(float((sa[k] - s0[k]).abs().max()) for k in floats)
    assert moved > 100 * atol, f"training moved the weights by only {moved}"


GAN = ["model.g_width=8", "model.d_width=8", "data.batch_size=16", "trainer.max_iters=4", "trainer.sample_grid=4"]
GLOW = ["data.batch_size=16", "trainer.max_iters=4", "trainer.sample_grid=4"]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_optimizer_impls_match_the_plain_loop(tmp_path, impl):
    plain = _run(tmp_path, "gan_digits", "plain", *GAN, "optim.g.impl=plain", "optim.d.impl=plain")
    other = _run(tmp_path, "gan_digits", impl, *GAN, f"optim.g.impl={impl}", f"optim.d.impl={impl}")
    opt = other.trainer.optimizers[0]
    assert opt.defaults[impl] is True
    _assert_close_weights(plain, other, atol=1e-5)
    if impl == "foreach":  # on CPU torch's batched kernels do the loop's arithmetic: CPU runs reproduce exactly
        assert all(torch.equal(v, other.module.state_dict()[k]) for k, v in plain.module.state_dict().items())


def test_flow_fused_layers_give_the_separate_layers_log_density_and_gradients(tmp_path):
    """flow.fused (ActNorm and the zero convs' scales folded into the convolutions, the default) after
    real training steps, ActNorm's data-dependent init included: on the trained weights, log p(x) and
    every gradient equal the separate layers'. The weights after the Adamax steps of the two runs are
    compared only loosely, within 2e-3 (the compile test below says why)."""
    separate = _run(tmp_path, "glow_digits", "separate", *GLOW, "flow.fused=false")
    run = _run(tmp_path, "glow_digits", "fused", *GLOW)
    m = run.module
    assert m.glow.levels[0].fused and not separate.module.glow.levels[0].fused and m.it == 4
    for k, v in separate.module.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=2e-3, msg=lambda msg: f"{k}: {msg}")
    x = m.prep(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(1))
    out = {}
    for fused in (True, False):
        m.glow.set_fused(fused)
        m.glow.zero_grad(set_to_none=True)
        logp, _ = m.glow(x)
        logp.mean().backward()
        out[fused] = (logp.detach(), [p.grad.clone() for p in m.glow.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-4)
    for gs, gf in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-5)


def test_flow_optimizer_impl_foreach_matches_plain(tmp_path):
    plain = _run(tmp_path, "glow_digits", "plain", *GLOW, "flow.optimizer_impl=plain")
    other = _run(tmp_path, "glow_digits", "foreach", *GLOW, "flow.optimizer_impl=foreach")
    assert other.trainer.optimizers[0].defaults["foreach"] is True
    _assert_close_weights(plain, other, atol=1e-5)


def test_auto_impl_is_fused_on_cuda_for_adam_else_foreach():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert optimizer_kwargs(torch.optim.Adam, "auto", cuda) == {"fused": True}
    assert optimizer_kwargs(torch.optim.Adam, "auto", cuda, deepspeed=True) == {"foreach": True}
    assert optimizer_kwargs(torch.optim.Adamax, "auto", cuda) == {"foreach": True}
    assert optimizer_kwargs(torch.optim.Adam, "auto", cpu) == {"foreach": True}
    assert optimizer_kwargs(torch.optim.RMSprop, "plain", cpu) == {"foreach": False}
    with pytest.raises(ValueError, match="no fused implementation"):
        optimizer_kwargs(torch.optim.RMSprop, "fused", cuda)


@pytest.mark.parametrize("experiment,extra,nhwc_extra", [
    ("gan_digits", GAN, []),
    ("gan_digits", GAN, ["optim.g.impl=fused", "optim.d.impl=fused"]),  # fused kernels on NHWC weights and state
    ("glow_digits", GLOW, []),
])
def test_channels_last_trains_like_nchw(tmp_path, experiment, extra, nhwc_extra):
    base = _run(tmp_path, experiment, "nchw", *extra)
    nhwc = _run(tmp_path, experiment, "nhwc", *extra, "trainer.channels_last=true", *nhwc_extra)
    convs = [p for p in nhwc.module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=CL) for p in convs)
    states = [s["exp_avg"] for opt in nhwc.trainer.optimizers for s in opt.state.values()
              if s["exp_avg"].dim() == 4 and s["exp_avg"].shape[-1] > 1]
    assert states and all(s.is_contiguous(memory_format=CL) for s in states)
    _assert_close_weights(base, nhwc, atol=1e-5)


def test_restored_optimizer_state_takes_the_parameter_layout():
    p = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=CL))
    opt = torch.optim.Adam([p])
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(4, 3, 3, 3),
                    "exp_avg_sq": torch.rand(4, 3, 3, 3)}
    before = {k: v.clone() for k, v in opt.state[p].items()}
    match_state_layout(opt)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k].is_contiguous(memory_format=CL) and torch.equal(opt.state[p][k], before[k])
    assert opt.state[p]["step"] is not None and torch.equal(opt.state[p]["step"], before["step"])


def test_compile_with_gradient_penalty_trains_like_eager(tmp_path):
    """WGAN-GP: D compiled for the scores, and the penalty compiled as one function (D's forward, its
    input gradient, the norm) whose backward is the double backward."""
    extra = ["data.name=digits", "data.resolution=16", "model.g_width=8", "model.d_width=8", "model.z_dim=16",
             "data.batch_size=16", "trainer.max_iters=3", "optim.n_critic=1", "trainer.sample_grid=4"]
    eager = _run(tmp_path, "wgan_gp_mnist5k", "eager", *extra)
    compiled = _run(tmp_path, "wgan_gp_mnist5k", "compiled", *extra, "trainer.compile=default")
    assert set(compiled.module._compiled) == {"G", "D", "gradient_penalty"}
    _assert_close_weights(eager, compiled, atol=1e-4)


@pytest.mark.parametrize("scope", ["model", "block"])
def test_compile_glow_gives_eager_log_density_and_gradients(tmp_path, capsys, scope):
    """After real compiled training steps, the compiled flow's log p(x) and gradients on a fresh batch
    equal the eager flow's on the same weights. (Weights after several Adam steps are no test here:
    Adam moves a parameter with a near-zero gradient by ~lr whatever its sign, so rounding-level
    gradient differences become lr-sized weight differences in the first steps.) With
    trainer.compile_scope=block, the 2 x 4 flow steps compile to a few graphs, not one per step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = _run(tmp_path, "glow_digits", "compiled", *GLOW, "trainer.compile=default", f"trainer.compile_scope={scope}",
               *(["flow.steps=4"] if scope == "block" else []))
    assert f"torch.compile (mode default) of glow{' (each block on its own)' if scope == 'block' else ''}: the first " \
        "iterations compile" in capsys.readouterr().err
    m = run.module
    assert set(m._compiled) == {"glow"} and m.it == 4
    if scope == "block":  # a graph per level, and one more for the first step: its input (data) needs no grad
        assert counters["stats"]["unique_graphs"] == 2 + 1, dict(counters["stats"])
    x = m.prep(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(1))
    out = {}
    for name, net in (("eager", m.glow), ("compiled", m._compiled["glow"])):
        m.glow.zero_grad(set_to_none=True)
        logp, _ = net(x)
        logp.mean().backward()
        out[name] = (logp.detach(), [p.grad.clone() for p in m.glow.parameters()])
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-5, atol=1e-3)
    for ge, gc in zip(out["eager"][1], out["compiled"][1]):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-4)


def test_cudnn_benchmark_reaches_torch_unless_deterministic(tmp_path):
    old = torch.backends.cudnn.benchmark
    try:
        for over, want in ([[], True], [["trainer.cudnn_benchmark=false"], False],
                           [["trainer.deterministic=true"], False]):
            cfg = load_config("gan_digits", ["logging.wandb=false", "trainer.progress_bar=false", *over])
            build_trainer(cfg, tmp_path)
            assert torch.backends.cudnn.benchmark is want, over
    finally:
        torch.backends.cudnn.benchmark = old


@pytest.mark.parametrize("override,valid", [
    ("optim.g.impl=fast", "auto, fused, foreach, plain"),
    ("flow.optimizer_impl=x", "auto, fused, foreach, plain"),
    ("trainer.compile=on", "off, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
    ("trainer.compile_scope=layer", "model, block"),
    ("model.attention_impl=flash", "matmul, sdpa"),
])
def test_unknown_switch_values_list_the_valid_ones(override, valid):
    with pytest.raises(ConfigError, match=f"Valid values: {valid}"):
        load_config("gan_digits", [override])


@pytest.mark.parametrize("experiment,override,msg", [
    ("wgan_mnist5k", "optim.d.impl=fused", "fused kernel for Adam only"),
    ("glow_digits", "flow.optimizer=adamax", None),
    ("gan_digits", "trainer.channels_last=true", "deepspeed"),
    ("gan_digits", "trainer.compile=default", "deepspeed"),
    ("wgan_gp_mnist5k", "loss.gp_autocast=true", "needs trainer.precision=bf16-mixed"),
    ("biggan_mnist5k", "trainer.compile_scope=block", "GAN networks compile whole. Set trainer.compile_scope=model"),
])
def test_impossible_combinations_are_refused(experiment, override, msg):
    if msg is None:  # adamax with auto is fine; with fused it is refused
        load_config(experiment, [override])
        with pytest.raises(ConfigError, match="fused kernel for Adam only"):
            load_config(experiment, [override, "flow.optimizer_impl=fused"])
        return
    extra = ["trainer.strategy=deepspeed"] if msg == "deepspeed" else []
    with pytest.raises(ConfigError, match=msg):
        load_config(experiment, [override, *extra])


def test_bench_rows_record_the_switches(tmp_path):
    from trainer.bench import format_table, run_train_bench

    row = run_train_bench("gan_digits", [f"logging.root={tmp_path}", "trainer.accelerator=cpu", "model.g_width=8",
                                         "model.d_width=8", "trainer.channels_last=true", "optim.g.impl=fused"],
                          batch=8, steps=2, warmup=0)
    assert row["channels_last"] is True and row["optimizer_impl"] == "fused/foreach"  # G fused, D auto on CPU
    assert row["compile_scope"] == "model" and 0 <= row["warmup_s"] < 60
    assert row["compile"] is False and row["compile_mode"] == "off" and row["cudnn_benchmark"] is True
    assert row["compile_cache"] == {"fx_hit": 0, "fx_miss": 0, "aot_hit": 0, "aot_miss": 0}  # nothing compiled
    assert "| no | yes | fused/foreach |" in format_table([row])
    w = f"{row['warmup_s']:.1f}"  # the warm-up says whether the compile came from the on-disk cache
    assert format_table([row]).endswith(f"| {w} |")
    assert format_table([{**row, "compile_cache": {"fx_hit": 4, "fx_miss": 0, "aot_hit": 2, "aot_miss": 0}}]) \
        .endswith(f"| {w} (cached) |")
    assert format_table([{**row, "compile_cache": {"fx_hit": 1, "fx_miss": 3, "aot_hit": 0, "aot_miss": 2}}]) \
        .endswith(f"| {w} (part cached) |")
    assert "| reduce-overhead per block | yes |" in format_table(
        [{**row, "compile": True, "compile_mode": "reduce-overhead", "compile_scope": "block"}])
    # each row names its variant and compares with the first row of its experiment, batch and precision
    fast = {**row, "variant": "x.y=1", "images_per_s": 2 * row["images_per_s"]}
    other = {**row, "variant": "x.y=2", "batch": 16, "images_per_s": 3 * row["images_per_s"]}
    lines = format_table([row, fast, other]).splitlines()[2:]
    assert [ln.split(" | ")[1] for ln in lines] == ["-", "x.y=1", "x.y=2"]
    assert [ln.split(" | ")[11] for ln in lines] == ["1.00x", "2.00x", "1.00x"]


def test_bench_no_compile_times_an_experiment_that_ships_compiled_eagerly(tmp_path):
    from trainer.bench import run_train_bench

    row = run_train_bench("gan_digits", [f"logging.root={tmp_path}", "trainer.accelerator=cpu", "model.g_width=8",
                                         "model.d_width=8", "trainer.compile=reduce-overhead"],
                          batch=8, steps=1, warmup=0, compile_nets=False)
    assert row["compile"] is False and row["compile_mode"] == "off"


def test_bench_variants_measure_each_switch_in_one_process_and_free_the_module(tmp_path, monkeypatch):
    """Two variants in one process: rows in order, each with its switch recorded, and the first run's
    module is gone before the second starts (on a GPU it would hold tens of GB)."""
    import gc
    import json
    import weakref

    import trainer.bench as bench
    from launch.cli import main

    built, alive_at_start = [], []
    real_build = bench.build_module

    def build(*a, **k):
        alive_at_start.append(sum(r() is not None for r in built))
        m = real_build(*a, **k)
        built.append(weakref.ref(m))
        return m

    monkeypatch.setattr(bench, "build_module", build)
    out = tmp_path / "rows.jsonl"
    rc = main(["bench", "train", "gan_digits", f"logging.root={tmp_path}", "trainer.accelerator=cpu",
               "model.g_width=8", "model.d_width=8", "--batch", "8", "--steps", "2", "--warmup", "0",
               "--variant", "", "--variant", "trainer.channels_last=true optim.d.impl=plain", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["", "trainer.channels_last=true optim.d.impl=plain"]
    assert [r["channels_last"] for r in rows] == [False, True]
    assert [r["optimizer_impl"] for r in rows] == ["foreach/foreach", "foreach/plain"]
    gc.collect()
    assert alive_at_start == [0, 0] and all(r() is None for r in built)


def test_resume_into_channels_last_with_fused_adam(tmp_path):
    """A checkpoint written in NCHW resumed with NHWC weights: the restored Adam moments are put into
    the weights' layout before the fused kernel sees them, and training continues like the NCHW run."""
    common = [*GAN, "trainer.checkpoint.every_n_iters=2"]
    full = _run(tmp_path, "gan_digits", "full", *common)
    _run(tmp_path, "gan_digits", "half", *common[:-1], "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=2")
    resumed = train(None, [f"resume={tmp_path}/gan_digits/half", "trainer.max_iters=4", "trainer.channels_last=true",
                           "optim.g.impl=fused", "optim.d.impl=fused"])
    assert int(resumed.module.iteration) == 4
    # the fused kernels this run asked for, not the foreach ones the checkpoint was written with
    opts = resumed.trainer.optimizers
    assert all(g["fused"] and not g["foreach"] for opt in opts for g in opt.param_groups)
    assert all(s["step"].dtype == torch.float32 for opt in opts for s in opt.state.values())
    states = [s["exp_avg"] for opt in resumed.trainer.optimizers for s in opt.state.values()
              if s["exp_avg"].dim() == 4 and s["exp_avg"].shape[-1] > 1]
    assert states and all(s.is_contiguous(memory_format=CL) for s in states)
    _assert_close_weights(full, resumed, atol=1e-5)


def test_a_variant_out_of_memory_becomes_a_row_and_the_next_still_runs(tmp_path, monkeypatch, capsys):
    import json

    import trainer.bench as bench
    from launch.cli import main

    real = bench.run_train_bench

    def run(experiment, overrides, **kw):
        if "data.batch_size=64" in overrides or kw.get("batch") == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(experiment, overrides, **kw)

    monkeypatch.setattr(bench, "run_train_bench", run)
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "train", "gan_digits", f"logging.root={tmp_path}", "trainer.accelerator=cpu",
                 "model.g_width=8", "model.d_width=8", "--batch", "64", "8", "--steps", "2", "--warmup", "0",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["error"] == "out of memory" and rows[0]["batch"] == 64 and "2.00 GiB" in rows[0]["detail"]
    assert "error" not in rows[1] and rows[1]["batch"] == 8
    assert "| gan_digits | batch 64 | baseline | out of memory |" in capsys.readouterr().out


def test_pgan_compile_leaves_room_for_a_graph_per_level():
    """PGAN's networks (and the gradient penalty through D) recompile per (level, fade) pair: 9 levels
    would overrun dynamo's default of 8 graphs per function and silently run the later levels eagerly."""
    import torch._dynamo.config as dynamo_config

    cfg = load_config("pgan_celebahq1024", ["data.resolution=64", "pgan.fmap_base=64", "pgan.fmap_max=8",
                                            "model.z_dim=8", "pgan.batch_sizes=[]"])
    module = build_module(cfg, channels=3, num_classes=0)
    old = dynamo_config.recompile_limit
    try:
        dynamo_config.recompile_limit = 8
        module.compile_networks("default")
        assert set(module._compiled) == {"G", "D", "gradient_penalty"}
        assert dynamo_config.recompile_limit >= 4 * 5  # 4..64 px
    finally:
        dynamo_config.recompile_limit = old
        torch._dynamo.reset()


@pytest.mark.parametrize("device,pinned", [("cuda", True), ("cpu", False)])
def test_batches_are_page_locked_only_for_cuda_training(device, pinned):
    from types import SimpleNamespace

    from data_pipelines.datamodule import ArrayDataModule

    dm = ArrayDataModule("digits", 8, 16, 0.1, "", 0, seed=0)
    dm.prepare()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=None,
                                 strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm.train_dataloader().pin_memory is pinned


def test_reduce_overhead_announces_each_phase_to_cuda_graphs(monkeypatch):
    """A compiled G runs twice per iteration (D's phase, G's phase); with CUDA graphs each phase must start
    a new graph generation, also when `genscale bench train` compiled the networks itself."""
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    cfg = load_config("gan_digits", ["model.g_width=8", "model.d_width=8"])
    module = build_module(cfg, channels=1, num_classes=10)
    module.new_phase()
    assert calls == []  # eager: nothing to announce
    module.compile_networks("reduce-overhead")
    module.new_phase()
    module.compile_networks("default")
    module.new_phase()
    assert calls == [1]
    torch._dynamo.reset()


def test_compiled_pgan_trains_like_eager_through_a_fade_in(tmp_path, monkeypatch):
    """Progressive GAN grown 4 -> 8 px (one 4 px step, then the 8 px fade-in over 2 steps) with G, D and the
    gradient penalty compiled: alpha enters as a tensor while fading, the penalty differentiates the
    level's D twice inside its own graph; the weights match the eager run's. Traced by dynamo and
    AOTAutograd as in training, without inductor's code generation (150 s of C++ compiles on 2 cores;
    the WGAN-GP test above runs inductor)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    extra = ["data.name=digits", "data.resolution=8", "pgan.fmap_base=32", "pgan.fmap_max=8", "model.z_dim=8",
             "pgan.fade_images=[32]", "pgan.stable_images=[16]", "pgan.batch_sizes=[16]", "trainer.max_iters=3",
             "trainer.sample_grid=4"]
    eager = _run(tmp_path, "pgan_mnist5k", "eager", *extra)
    compiled = _run(tmp_path, "pgan_mnist5k", "compiled", *extra, "trainer.compile=default")
    assert set(compiled.module._compiled) == {"G", "D", "gradient_penalty"}
    p = compiled.module.phase
    assert (p.level, p.phase, int(compiled.module.iteration)) == (1, "fade", 3)
    _assert_close_weights(eager, compiled, atol=2e-5)
