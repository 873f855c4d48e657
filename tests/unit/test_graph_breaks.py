"""torch.compile sees each training network as one graph: no graph breaks (a host read, data-dependent
Python control flow or an untraceable call inside a forward would split it, costing fusion and adding
launches; the GPU experiments ship compiled). Traced with torch._dynamo.explain, no inductor compile."""
import pytest
import torch
import torch._dynamo as dynamo

from trainer.build import build_module
from trainer.config import load_config


def one_graph(fn, *args):
    dynamo.reset()
    try:
        ex = dynamo.explain(fn)(*args)
    finally:
        dynamo.reset()
    reasons = [str(b.reason)[:200] for b in ex.break_reasons]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons


def test_biggan_g_and_d_compile_to_one_graph_each():
    cfg = load_config("biggan_mnist5k", ["model.g_width=4", "model.d_width=4", "model.shared_dim=8"])
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
