"""FlowModule: dequantisation and bits/dim by hand, warmup, and tiny Lightning runs on digits (CPU):
bits/dim decreases, EMA, class conditioning, non-finite skipping, checkpoint round trip."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from data_pipelines.builtin import load_split
from models.glow import Glow
from trainer.flow_module import (FLOW_DEFAULTS, FlowModule, bits_per_dim, check_n_bits, classifier_bits,
                                 dequantize, glow_from_config, merge_config, warmup_lr)
from trainer.callbacks.samples import SampleGridCallback
from trainer.checkpointing import IterationCheckpoint
from trainer.finite import device_check_possible
from trainer.gan_module import NonFiniteLossError

# ---- pure functions by hand ----------------------------------------------------------------------


def test_bits_per_dim_by_hand():
    lp = torch.tensor([-100.0, 50.0], dtype=torch.float64)
    d, n_bits = 12, 5
    # -(lp - D ln 32) / (D ln 2) = -lp / (D ln 2) + 5
    expected = [100.0 / (12 * math.log(2)) + 5.0, -50.0 / (12 * math.log(2)) + 5.0]
    assert torch.allclose(bits_per_dim(lp, d, n_bits), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # 8 bits, a uniform density on [-0.5, 0.5)^D (log p = 0): exactly 8 bits/dim
    assert float(bits_per_dim(torch.zeros(1), 784, 8)) == pytest.approx(8.0)


def test_dequantize_by_hand():
    images = torch.tensor([0, 7, 8, 255, 128], dtype=torch.uint8)
    noise = torch.tensor([0.5, 0.5, 0.0, 0.999, 0.25])
    # 5 bits: floor(v / 8) -> 0, 0, 1, 31, 16
    expected = torch.tensor([0.5 / 32, 0.5 / 32, 1 / 32, 31.999 / 32, 16.25 / 32]) - 0.5
    assert torch.allclose(dequantize(images, 5, noise), expected)
    assert torch.allclose(dequantize(images, 8, noise), (images.float() + noise) / 256 - 0.5)
    x = dequantize(torch.full((1000,), 255, dtype=torch.uint8), 3, torch.rand(1000))
    assert x.min() >= 7 / 8 - 0.5 and x.max() < 0.5
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="1..8"):
            check_n_bits(bad)


def test_classifier_bits_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = math.exp(0.0) / (math.exp(2.0) + 1.0 + math.exp(-1.0))
    assert float(classifier_bits(logits, torch.tensor([1]))) == pytest.approx(-math.log2(p), rel=1e-6)


def test_warmup_lr_values():
    assert warmup_lr(1e-3, 0, 1000) == 0.0
    assert warmup_lr(1e-3, 250, 1000) == pytest.approx(2.5e-4)
    assert warmup_lr(1e-3, 1000, 1000) == pytest.approx(1e-3)
    assert warmup_lr(1e-3, 5000, 1000) == pytest.approx(1e-3)
    assert warmup_lr(1e-3, 7, 0) == 1e-3


# ---- Lightning runs on digits --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    d = load_split("digits", "train", 8)
    return d.images[:256], d.labels[:256].long()


def make(cfg_over=None, num_classes=0, seed=0):
    cfg = merge_config({"flow": {"levels": 2, "steps": 2, "hidden": 16, "n_bits": 5, "optimizer": "adam",
                                 "lr": 3e-3, "warmup_images": 128},
                        "trainer": {"max_iters": 10_000}})
    cfg = merge_config(cfg_over or {}, cfg)
    torch.manual_seed(seed)
    return FlowModule(glow_from_config(cfg, 1, 8, num_classes), cfg)


def loader(digits, batch=32):
    images, labels = digits
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(0), drop_last=True)


def fit(module, digits, steps, ckpt_path=None, **kw):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(module, loader(digits), ckpt_path=ckpt_path)
    return trainer


def test_flow_module_trains_and_bits_per_dim_decreases(digits):
    m = make()
    images, labels = digits
    m.init_actnorm(m.prep(images[:64]))
    before = m.evaluate_bpd(images[:128], labels[:128], seed=1)
    assert 4.0 < before < 8.0  # 5-bit data: a uniform model would score 5
    trainer = fit(m, digits, 40)
    after = m.evaluate_bpd(images[:128], labels[:128], seed=1)
    assert after < before - 0.8, (before, after)
    assert int(m.iteration) == 40 and int(m.images_seen) == 40 * 32
    # the last step's lr: images seen including that batch (1280) >= warmup (128): the full lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3)
    s = m.sample_images(4, temperature=0.7, use_ema=False, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 1, 8, 8) and torch.isfinite(s).all() and s.abs().max() <= 1


def test_warmup_is_applied_per_step_and_lazy_init_runs_once(digits, monkeypatch):
    m = make({"flow": {"warmup_images": 32 * 8}})
    calls, lrs = [], []
    orig = Glow.initialize_actnorm
    monkeypatch.setattr(Glow, "initialize_actnorm", lambda self, *a, **k: (calls.append(1), orig(self, *a, **k)))

    class LR(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(m, digits, 3, callbacks=[LR()])
    assert len(calls) == 1 and m.glow.actnorm_initialized()
    assert lrs == pytest.approx([3e-3 * k / 8 for k in (1, 2, 3)])


def test_checkpoint_round_trip_restores_exactly_and_never_reinitialises(digits, tmp_path, monkeypatch):
    m = make({"ema": {"enabled": True, "decay": 0.9}})
    trainer = fit(m, digits, 5)
    path = tmp_path / "flow.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    g = ckpt["genscale"]
    assert (g["kind"], g["iteration"], g["images_seen"]) == ("flow", 5, 160) and g["config"] == m.cfg
    fresh = make({"ema": {"enabled": True, "decay": 0.9}}, seed=123)
    assert not fresh.glow.actnorm_initialized()
    fresh.load_state_dict(ckpt["state_dict"])
    for (k, a), b in zip(m.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    x = m.prep(digits[0][:16], torch.Generator().manual_seed(0))
    assert torch.equal(m.glow.log_prob(x), fresh.glow.log_prob(x))
    # resume through Lightning: the ActNorm init is not run again
    monkeypatch.setattr(Glow, "initialize_actnorm", lambda *a, **k: pytest.fail("ActNorm re-initialised"))
    resumed = make({"ema": {"enabled": True, "decay": 0.9}}, seed=123)
    fit(resumed, digits, 7, ckpt_path=str(path))
    assert int(resumed.iteration) == 7 and int(resumed.images_seen) == 7 * 32


def test_ema_starts_from_the_initialised_flow_and_averages(digits):
    m = make({"ema": {"enabled": True, "decay": 0.75}})
    m.init_actnorm(m.prep(digits[0][:64]))  # the explicit path (what build does before DDP wraps)
    snap = {k: v.clone() for k, v in m.glow.state_dict().items()}
    assert all(torch.equal(snap[k], v) for k, v in m.glow_ema.state_dict().items())
    fit(m, digits, 1)
    for (k, p), e in zip(m.glow.named_parameters(), m.glow_ema.parameters()):
        assert torch.allclose(e, 0.75 * snap[k] + 0.25 * p.detach(), atol=1e-7), k


def test_class_conditional_training_uses_the_classifier(digits):
    m = make({"flow": {"class_conditional": True, "weight_y": 0.5}}, num_classes=10)
    assert m.glow.num_classes == 10 and m.glow.classifier is not None
    images, labels = digits
    x = m.prep(images[:8], torch.Generator().manual_seed(0))
    m.init_actnorm(x, labels[:8])
    t = m.losses(x, labels[:8])
    # zero-initialised head: uniform over 10 classes, log2(10) bits
    assert torch.allclose(t["bits_y"], torch.full((8,), math.log2(10)))
    fit(m, digits, 3)
    assert m.glow.classifier.linear.weight.abs().sum() > 0
    assert m.glow.class_prior.linear.weight.abs().sum() > 0
    lp = m.glow.log_prob(x, labels[:8])
    assert not torch.allclose(lp, m.glow.log_prob(x, (labels[:8] + 1) % 10))
    # weight_y = 0: no classifier parameters (none without gradients under DDP)
    assert make({"flow": {"class_conditional": True, "weight_y": 0.0}}, num_classes=10).glow.classifier is None


def test_nonfinite_loss_is_skipped_and_counted_then_stops_the_run(digits, monkeypatch):
    m = make()
    orig = FlowModule.losses
    state = {}

    def losses(self, x, y, glow=None):
        out = orig(self, x, y, glow)
        if int(self.iteration) == 2:  # the third step's loss is NaN
            state["before"] = [p.detach().clone() for p in self.glow.parameters()]
            out["bpd"] = out["bpd"] * float("nan")
        return out

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if int(pl_module.iteration) == 3:
                state["after"] = [p.detach().clone() for p in pl_module.glow.parameters()]

    monkeypatch.setattr(FlowModule, "losses", losses)
    fit(m, digits, 4, callbacks=[Check()])
    assert int(m.nonfinite_total) == 1 and int(m.iteration) == 4
    assert all(torch.equal(a, b) for a, b in zip(state["before"], state["after"]))
    assert all(torch.isfinite(p).all() for p in m.glow.parameters())
    m2 = make({"trainer": {"max_nonfinite": 1}})
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        fit(m2, digits, 4)


def _nan_at(monkeypatch, steps):
    """The flow's loss is NaN at these step indices (iteration before the step)."""
    orig = FlowModule.losses

    def losses(self, x, y, glow=None):
        out = orig(self, x, y, glow)
        if int(self.iteration) in steps:
            out["bpd"] = out["bpd"] * float("nan")
        return out

    monkeypatch.setattr(FlowModule, "losses", losses)


def test_fused_adam_skips_nonfinite_steps_on_the_device_like_the_host_check(digits, monkeypatch):
    """trainer.finite_check=auto with fused Adam: the fused update skips itself on the loss's flag (no
    host read); the run ends with the host decision's weights and Adam state, bit for bit."""
    _nan_at(monkeypatch, {2, 3})
    ends = {}
    for check in ("host", "auto"):
        m = make({"flow": {"optimizer_impl": "fused"}, "trainer": {"finite_check": check}})
        trainer = fit(m, digits, 6)
        opt = trainer.optimizers[0]
        assert device_check_possible(m, opt) == (check == "auto") and "found_inf" not in vars(opt)
        assert int(m.nonfinite_total) == 2 and m.count("nonfinite_total") == 2 and int(m.iteration) == 6
        assert {float(st["step"]) for st in opt.state.values()} == {4.0}  # 6 steps, 2 skipped
        ends[check] = ({k: v.clone() for k, v in m.state_dict().items()},
                       [st["exp_avg_sq"].clone() for st in opt.state.values()])
    assert all(torch.equal(ends["host"][0][k], v) for k, v in ends["auto"][0].items())
    assert all(torch.equal(a, b) for a, b in zip(ends["host"][1], ends["auto"][1]))
    assert all(torch.isfinite(v).all() for v in ends["auto"][0].values() if v.is_floating_point())


def test_fused_adam_stops_a_nonfinite_streak_at_the_next_log_check(digits, monkeypatch):
    _nan_at(monkeypatch, set(range(1, 100)))
    m = make({"flow": {"optimizer_impl": "fused"}, "trainer": {"max_nonfinite": 2, "log_every": 3}})
    # steps 2, 3, ... are non-finite: the streak reaches 2 at step 3, which is also the first check
    with pytest.raises(NonFiniteLossError, match=r"non-finite for the last 2 consecutive steps, found at step 3"):
        fit(m, digits, 10)
    m = make({"flow": {"optimizer_impl": "fused"}, "trainer": {"max_nonfinite": 3, "log_every": 4}})
    with pytest.raises(NonFiniteLossError, match=r"last 3 consecutive steps, found at step 4 \(3 skipped"):
        fit(m, digits, 10)
    assert all(torch.isfinite(p).all() for p in m.glow.parameters())


def test_bf16_mixed_and_checkpointing_train(digits):
    m = make({"flow": {"checkpointing": True}})
    assert m.glow.checkpointing
    fit(m, digits, 2, precision="bf16-mixed")
    assert int(m.iteration) == 2 and int(m.nonfinite_total) == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.glow.parameters())


def test_defaults_describe_every_key_the_module_reads():
    m = FlowModule(glow_from_config(FLOW_DEFAULTS, 1, 8), merge_config())
    assert isinstance(m.glow, Glow) and m.glow.latent_shapes == [(2, 4, 4), (8, 2, 2)]
    assert isinstance(m.configure_optimizers(), torch.optim.Adamax)
    with pytest.raises(ValueError, match="1..8"):
        make({"flow": {"n_bits": 0}})


def test_flow_fused_follows_the_config_and_older_configs_get_the_default():
    """A checkpoint's config from before flow.fused existed (genscale sample/eval build the module from
    it as saved) loads with the default; the key turns every foldable layer on or off, EMA copy included."""
    old = merge_config()
    del old["flow"]["fused"]
    assert FlowModule(glow_from_config(old, 1, 8), old).glow.levels[0].fused
    m = make({"flow": {"fused": False}, "ema": {"enabled": True}})
    flags = [mod.fused for net in (m.glow, m.glow_ema) for mod in net.modules() if hasattr(mod, "fused")]
    assert len(flags) == 2 * (2 + 2 * 2 * 3 + 1 + 1) and not any(flags)  # levels, coupling layers, priors


def test_fixed_noise_grids_and_the_existing_checkpoint_and_sample_callbacks(digits, tmp_path):
    m = make({"trainer": {"sample_grid": 9}})
    samples, ckpts = SampleGridCallback(tmp_path / "samples", every=2), IterationCheckpoint(tmp_path / "ckpt", 2)
    fit(m, digits, 4, callbacks=[samples, ckpts])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["iter_0000002.png", "iter_0000004.png"]
    assert (tmp_path / "ckpt" / "iter-0000004.ckpt").exists() and (tmp_path / "ckpt" / "last.ckpt").exists()
    a, b = m.generate(m.fixed_z), m.generate(m.fixed_z)
    assert a.shape == (9, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    # generate(z) is sample() at flow.sample_temperature from the noise z, mapped to [-1, 1]
    x = m.glow.sample(9, 0.7, eps=m.fixed_z)
    assert torch.allclose(a, (2 * x).clamp(-1, 1))


def test_hflip_mirrors_the_training_images_the_step_generator_picks(digits):
    """data.hflip (glow_celebahq256 sets it) flips each training image with probability 1/2, drawn from
    the step's generator, so a resume flips the same ones; off, the batch passes untouched."""
    images = digits[0][:16]
    got = make({"data": {"hflip": True}})._hflip(images, torch.Generator().manual_seed(3))
    flip = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < int(flip.sum()) < 16
    for i in range(16):
        assert torch.equal(got[i], images[i].flip(-1) if flip[i] else images[i])
    assert make()._hflip(images, torch.Generator()) is images


def test_ema_start_iter_counts_the_step_index_from_zero(digits):
    """ema.start_iter=2: the steps with index 0 and 1 copy the flow into the EMA (beta 0), the one with
    index 2 is the first to average. After two steps the EMA equals the flow exactly; after a third it
    is 0.75 * (weights after two) + 0.25 * (weights after three)."""
    m = make({"ema": {"enabled": True, "decay": 0.75, "start_iter": 2}})
    after = []  # (flow, EMA) weights after each step

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after.append([[p.detach().clone() for p in net.parameters()] for net in (module.glow, module.glow_ema)])

    fit(m, digits, 3, callbacks=[Record()])
    (flow1, ema1), (flow2, ema2), (flow3, ema3) = after
    assert all(torch.equal(e, p) for e, p in zip(ema1 + ema2, flow1 + flow2))
    assert not all(torch.equal(a, b) for a, b in zip(flow2, flow3))
    for a, p, e in zip(flow2, flow3, ema3):
        torch.testing.assert_close(e, 0.75 * a + 0.25 * p, rtol=1e-6, atol=1e-7)


def test_class_conditional_loss_adds_weight_y_times_the_classifier_bits(digits, monkeypatch):
    """The flow's loss is mean bpd + flow.weight_y * mean classifier bits (log2(10) bits from the zero-
    initialised head); the backward receives exactly that."""
    m = make({"flow": {"class_conditional": True, "weight_y": 0.5}}, num_classes=10)
    seen = []
    monkeypatch.setattr(FlowModule, "backward", lambda self, loss, *a, **k: seen.append(loss.detach().clone()))
    bpd = []
    losses = FlowModule.losses
    monkeypatch.setattr(FlowModule, "losses", lambda self, *a, **k: bpd.append(losses(self, *a, **k)) or bpd[-1])
    fit(m, digits, 1)
    assert len(seen) == 1 and float(bpd[-1]["bits_y"].mean()) == pytest.approx(math.log2(10), rel=1e-6)
    expected = float(bpd[-1]["bpd"].mean()) + 0.5 * math.log2(10)
    assert float(seen[0]) == pytest.approx(expected, rel=1e-6)


def test_evaluate_bpd_is_the_mean_over_images_with_a_partial_last_batch(digits, monkeypatch):
    """10 images in batches of 4 (4, 4, 2): the result is the mean of the ten per-image values, not of
    the three batch means."""
    m = make()
    images, labels = digits
    values = torch.arange(10, dtype=torch.float32) ** 2
    pos = {"i": 0}

    def per_image(self, x, y, net=None):
        out = values[pos["i"]: pos["i"] + x.shape[0]]
        pos["i"] += x.shape[0]
        return {"bpd": out}

    monkeypatch.setattr(FlowModule, "losses", per_image)
    assert m.evaluate_bpd(images[:10], labels[:10], batch_size=4) == pytest.approx(float(values.mean()))


def test_dequantisation_noise_differs_between_ranks_and_repeats_within_one():
    """Each rank draws its own dequantisation noise and flips: the step generator is seeded by (seed,
    rank, iteration)."""
    m = make()
    a, again = torch.rand(16, generator=m.noise_generator()), torch.rand(16, generator=m.noise_generator())
    m._rank = lambda: 1
    assert torch.equal(a, again) and not torch.equal(a, torch.rand(16, generator=m.noise_generator()))


def test_a_skipped_step_leaves_the_ema_as_it_was_on_the_host_path(digits, monkeypatch):
    """With the host's finite check a non-finite step neither updates the flow nor ticks its EMA."""
    _nan_at(monkeypatch, {2})
    ema = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            ema[int(module.iteration)] = [p.detach().clone() for p in module.glow_ema.parameters()]

    m = make({"ema": {"enabled": True, "decay": 0.5}, "trainer": {"finite_check": "host"}})
    fit(m, digits, 4, callbacks=[Record()])
    assert int(m.nonfinite_total) == 1
    assert all(torch.equal(a, b) for a, b in zip(ema[2], ema[3]))
    assert not all(torch.equal(a, b) for a, b in zip(ema[3], ema[4]))
