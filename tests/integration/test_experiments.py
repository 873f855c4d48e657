"""Every shipped experiment loads, validates and trains a few iterations on CPU, leaving samples, a
checkpoint, the CSV log, the saved config and W&B offline run files."""
import csv

import pytest
import torch
import yaml

from trainer.build import train
from trainer.checkpointing import load_checkpoint
from trainer.config import is_flow, list_experiments, load_config


COMMON = ["trainer.progress_bar=false", "trainer.max_iters=3", "trainer.sample_every=2",
          "trainer.checkpoint.every_n_iters=2", "trainer.log_every=1", "data.batch_size=16", "trainer.sample_grid=16"]
# Widths and resolution are shrunk so each runs in seconds; the objective, optimiser, norms and
# critic schedule (GANs) or coupling, 1x1 convolution, n_bits and optimiser (flows) stay the experiment's.
GAN_SHRINK = ["model.g_width=8", "model.d_width=8", "data.resolution=16", "optim.critic_boost_steps=0"]
FLOW_SHRINK = ["flow.levels=2", "flow.steps=1", "flow.hidden=8", "data.resolution=8", "trainer.precision=32",
               "trainer.cpu_threads=0", "data.num_workers=0", "flow.checkpointing=false"]
# Experiments on data that is not built in (shards written from CIFAR-10, ImageNet, CelebA-HQ) train
# here on the built-in digits instead; they still load and validate as shipped (test below).
BUILTIN_DATA = ["data.name=digits", "data.path=''", "data.hflip=false"]
# The GPU experiments ship with torch.compile on; compiling each on a 2-core CPU would cost minutes, and
# compile is tested against the eager path in test_speed_switches.py.
NO_COMPILE = ["trainer.compile=off"]


# BigGAN has no 16 px architecture: its smallest (32 px), with ch 4 (16-64 channels).
BIGGAN_SHRINK = ["model.g_width=4", "model.d_width=4", "model.shared_dim=8", "data.resolution=32",
                 "trainer.precision=32", "trainer.cpu_threads=0", "data.num_workers=0"]
# Progressive GAN grown 4 -> 8 px, the second step at 8 px (a fade-in), narrow feature maps.
PGAN_SHRINK = ["pgan.fmap_base=32", "pgan.fmap_max=8", "model.z_dim=8", "data.resolution=8",
               "pgan.batch_sizes=[16,16]", "pgan.stable_images=[16]", "pgan.fade_images=[32]", "data.num_workers=0"]


def shrink(experiment: str) -> list:
    cfg = load_config(experiment)
    extra = (FLOW_SHRINK if is_flow(cfg) else BIGGAN_SHRINK if cfg.model.name == "biggan"
             else PGAN_SHRINK if cfg.model.name == "pgan" else GAN_SHRINK)
    return extra + NO_COMPILE + (BUILTIN_DATA if cfg.data.name not in ("mnist5k", "digits") else [])


@pytest.mark.parametrize("experiment", list_experiments())
def test_experiment_loads_and_validates_as_shipped(experiment):
    cfg = load_config(experiment)
    assert cfg.experiment == experiment
    if is_flow(cfg):
        assert cfg.data.resolution % 2 ** cfg.flow.levels == 0


@pytest.mark.parametrize("experiment", list_experiments())
def test_experiment_trains_a_few_iterations(experiment, tmp_path):
    run = train(experiment, [f"logging.root={tmp_path}"] + COMMON + shrink(experiment))
    flow = is_flow(run.cfg)
    d = run.run_dir
    assert d.parent.name == experiment
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["experiment"] == experiment and saved["trainer"]["max_iters"] == 3
    assert sorted(p.name for p in (d / "samples").glob("*.png")) == ["iter_0000002.png", "iter_0000003.png"]
    ckpt = load_checkpoint(d)
    assert ckpt["genscale"]["iteration"] == 3 and ckpt["genscale"]["config"] == saved
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert (d / "checkpoints" / "iter-0000002.ckpt").exists()
    with open(d / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["iteration"])) for r in rows] == [1, 2, 3]
    keys = ["train/bpd"] if flow else ["d/loss", "g/loss"]
    assert all(r[k] for r in rows for k in keys)
    offline = list((d / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    wandb_file = next(offline[0].glob("run-*.wandb"))
    blob = wandb_file.read_bytes()
    assert all(k.encode() in blob for k in keys)  # history keys are stored as plain strings
    assert list((offline[0] / "files" / "media" / "images").glob("samples_*.png"))


def test_wgan_clipping_holds_during_training(tmp_path):
    run = train("wgan_mnist5k", [f"logging.root={tmp_path}", "trainer.progress_bar=false", "logging.wandb=false",
                                 "trainer.max_iters=2", "model.d_width=8", "model.g_width=8",
                                 "data.resolution=16", "optim.critic_boost_steps=3", "trainer.sample_every=0"])
    c = run.cfg.loss.clip
    assert int(run.module.d_steps) == 6  # both iterations are boosted to 3 critic steps
    for p in run.module.D.parameters():
        assert p.abs().max() <= c + 1e-12
