"""GANModule's own mechanics, each against a hand-computed expectation: uint8 -> [-1, 1] and the
horizontal flips, training/eval modes around sampling, and the non-finite streaks that stop a run only
when consecutive (host path and the device-side counters)."""
from __future__ import annotations

import pytest
import torch

from trainer.build import build_module
from trainer.config import load_config


def module(experiment="gan_digits", *overrides, num_classes=10):
    cfg = load_config(experiment, ["logging.wandb=false", "model.z_dim=8", "model.g_width=8", "model.d_width=8",
                                   "data.resolution=8", *overrides])
    m = build_module(cfg, channels=1, num_classes=num_classes)
    m.manual_backward = lambda loss: loss.backward()
    return m


@pytest.mark.parametrize("ema", ["true", "false"])
def test_generate_restores_the_training_mode_of_the_net_it_used(ema):
    m = module("gan_digits", f"ema.enabled={ema}")
    m.G.train()
    m.generate(m.fixed_z[:4], use_ema=False)
    assert m.G.training  # a sample grid mid-training must not leave G's BatchNorm in eval mode
    if m.G_ema is not None:
        m.generate(m.fixed_z[:4])
        assert not m.G_ema.training


def test_prep_maps_uint8_to_minus_one_one_exactly():
    m = module("gan_digits", "data.hflip=false")
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    got = m._prep(x, torch.Generator().manual_seed(0)).flatten().tolist()
    assert got == pytest.approx([-1.0, 51 / 127.5 - 1.0, 1.0], abs=1e-7)


def test_hflip_mirrors_about_half_the_images_horizontally():
    m = module("gan_digits", "data.hflip=true")
    imgs = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(64, 1, 1, 1)  # asymmetric in H and W
    x = m._prep(imgs, torch.Generator().manual_seed(0))
    plain = imgs.float() / 127.5 - 1.0
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # only left-right flips, never up-down
    assert 16 <= int(mirrored.sum()) <= 48  # p = 1/2: 64 draws land here with prob > 0.9999


def test_only_consecutive_nonfinite_steps_stop_the_run():
    from trainer.finite import NonFiniteLossError

    m = module("gan_digits", "trainer.max_nonfinite=3")
    opt = torch.optim.SGD(m.D.parameters(), lr=0.1)
    for finite in (False, False, True, False, False, True):  # never 3 in a row
        m._finite_or_skip(finite, opt, "D")
    assert m.count("nonfinite_total") == 4
    for _ in range(2):
        m._finite_or_skip(False, opt, "D")
    with pytest.raises(NonFiniteLossError):
        m._finite_or_skip(False, opt, "D")


def test_device_streaks_reset_on_a_finite_step_and_report_the_longest_network():
    from trainer.finite import DeviceStreaks

    s = DeviceStreaks()
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    for bad in (one, one, zero, one):
        s.add("D", bad)
    assert s.longest() == ("D", 1)  # the finite step ended the first streak
    for _ in range(3):
        s.add("G", one)
    assert s.longest() == ("G", 3)  # the longer streak, whichever network was added first


def test_pgan_samples_of_an_early_level_are_upsampled_by_pixel_repetition():
    """Grids and evaluations get one size: a 4 px sample is shown at 32 px as blocks of 8x8 equal pixels
    (nearest), not smoothed."""
    cfg = load_config("pgan_mnist5k", ["logging.wandb=false", "pgan.fmap_base=16", "pgan.fmap_max=4"])
    m = build_module(cfg, channels=1, num_classes=10)
    z = torch.randn(3, m.z_dim)
    small = m.generate(z, use_ema=False, level=0, alpha=1.0)
    m.G.eval()
    with torch.no_grad():
        direct = m.G(z, 0, 1.0).clamp(-1, 1)
    assert direct.shape[-1] == 4 and small.shape[-1] == 32
    torch.testing.assert_close(small, direct.repeat_interleave(8, -1).repeat_interleave(8, -2))
