"""torch.compile sees each training network as one graph: no graph breaks (a host read, data-dependent
Python control flow or an untraceable call inside a forward would split it, costing fusion and adding
launches; the GPU experiments ship compiled). Traced with torch._dynamo.explain, no inductor compile."""
import dataclasses

import pytest
import torch
import torch._dynamo as dynamo

from trainer.build import build_module
from trainer.config import load_config
from trainer.pgan_schedule import FADE, STABLE, Phase


def one_graph(fn, *args):
    dynamo.reset()
    try:
        ex = dynamo.explain(fn)(*args)
    finally:
        dynamo.reset()
    reasons = [str(b.reason)[:200] for b in ex.break_reasons]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_biggan_g_and_d_compile_to_one_graph_each(attention):
    cfg = load_config("biggan_mnist5k", ["model.g_width=4", "model.d_width=4", "model.shared_dim=8",
                                         f"model.attention_impl={attention}"])
    m = build_module(cfg, channels=1, num_classes=10)
    y = torch.randint(10, (4,))
    one_graph(m.G, torch.randn(4, cfg.model.z_dim), y)
    one_graph(m.D, torch.randn(4, 1, 32, 32), y)


def test_glow_compiles_to_one_graph():
    cfg = load_config("glow_digits", [])
    m = build_module(cfg, channels=1, num_classes=0)
    r = cfg.data.resolution
    m.glow.initialize_actnorm(torch.rand(8, 1, r, r))
    one_graph(m.glow, torch.rand(4, 1, r, r))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_pgan_g_and_d_compile_to_one_graph_each_in_stable_and_fade_phases(alpha):
    cfg = load_config("pgan_mnist5k", ["pgan.fmap_base=32", "pgan.fmap_max=8"])
    m = build_module(cfg, channels=1, num_classes=0)
    one_graph(m.G, torch.randn(4, cfg.model.z_dim), 2, alpha)
    one_graph(m.D, torch.randn(4, 1, 16, 16), 2, alpha)


def _penalty_inputs(n: int, res: int):
    g = torch.Generator().manual_seed(0)
    real, fake = (torch.randn(n, 1, res, res, generator=g) for _ in range(2))
    return real, fake, torch.rand(n, generator=g)


def test_wgan_gp_penalty_compiles_to_one_graph():
    """The penalty's input gradient (torch.func.vjp) is traced, not a break: the double backward compiles."""
    cfg = load_config("wgan_gp_mnist5k", ["model.g_width=4", "model.d_width=4"])
    m = build_module(cfg, channels=1, num_classes=0)
    one_graph(m.gradient_penalty, *_penalty_inputs(4, cfg.data.resolution), None, torch.float32)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_pgan_penalty_compiles_to_one_graph_in_stable_and_fade_phases(alpha):
    cfg = load_config("pgan_mnist5k", ["pgan.fmap_base=32", "pgan.fmap_max=8"])
    m = build_module(cfg, channels=1, num_classes=0)
    m.phase = dataclasses.replace(m.phase, level=2, resolution=16, alpha=alpha, phase=FADE if alpha < 1 else STABLE)
    one_graph(m.gradient_penalty, *_penalty_inputs(4, 16), None, torch.float32, *m.net_args())


def test_pgan_compiles_once_per_level_and_fade_while_alpha_changes_every_step(monkeypatch):
    """Growing 8 -> 16 px, the step's G, D and penalty calls (D's phase without grad for G, G's phase
    with it), compiled as training compiles them, through two fade-ins and their stable phases: one
    graph per (level, fade, grad mode), none per alpha or per input layout. Before: the penalty, reading
    alpha as a float, recompiled at every fade-in step, and automatic dynamic shapes gave D a third graph
    per (level, fade) for the reals (a view of the batch) once the resolution had changed."""
    import functools

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from models.pgan import PGANDiscriminator, PGANGenerator
    from trainer.gan_module import GANModule

    cfg = load_config("pgan_mnist5k", ["pgan.fmap_base=32", "pgan.fmap_max=8"])
    m = build_module(cfg, channels=1, num_classes=0)
    dynamo.reset()
    # the module's own compile call (its mode and options), traced without inductor's code generation
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    m.compile_networks("default")
    phases = [Phase(1, a, FADE, 8, 4) for a in (0.0, 0.25, 0.5)] + [Phase(1, 1.0, STABLE, 8, 4)] * 2
    phases += [Phase(2, a, FADE, 16, 4) for a in (0.0, 0.2, 0.4, 0.6)] + [Phase(2, 1.0, STABLE, 16, 4)] * 2
    try:
        for p in phases:
            m.phase = p
            real = torch.randn(4, 1, p.resolution, p.resolution).chunk(1)[0]  # as d_step's micro-batches
            with torch.no_grad():
                fake = m._g(torch.randn(4, cfg.model.z_dim), None)
            (m._d(real, None).sum() + m._d(fake, None).sum()
             + m.fast("gradient_penalty")(real, fake, torch.rand(4), None, torch.float32, *m.net_args())).backward()
            m._d(m._g(torch.randn(4, cfg.model.z_dim), None), None).sum().backward()
        graphs = {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in
                  (("G", PGANGenerator.forward), ("D", PGANDiscriminator.forward),
                   ("gradient_penalty", GANModule.gradient_penalty))}
    finally:
        dynamo.reset()
    # 4 (level, fade) pairs; G and D each in two grad modes (D: reals without grad, fakes with it)
    assert graphs == {"G": 8, "D": 8, "gradient_penalty": 4}
