"""16-mixed GAN training outside DeepSpeed: one GradScaler per network (Lightning's single scaler
would be updated by both optimisers). An overflow in D backs off D's scale and skips D's step only;
both scalers are checkpointed and restored on resume.

Lightning turns 16-mixed into bf16-mixed on a CPU, so on CPU the scalers are installed as the
16-mixed path installs them (GradScaler works on fp32 gradients too: a scale of 2**127 overflows
them); tests/gpu runs the real 16-mixed path on CUDA."""
import csv

import pytest
import torch

from trainer import gan_module
from trainer.build import train
from trainer.checkpointing import load_checkpoint

BASE = ["trainer.accelerator=cpu", "logging.wandb=false", "trainer.progress_bar=false", "trainer.sample_every=0",
        "trainer.log_every=1", "optim.n_critic=1"]
HUGE = 2.0 ** 127


@pytest.fixture
def scalers_on_cpu(monkeypatch):
    def on_fit_start(self):
        self._scalers = {"G": torch.amp.GradScaler("cpu"), "D": torch.amp.GradScaler("cpu", init_scale=HUGE)}
        # D's loss times 2**40: its scaled gradients overflow at every scale these tests reach (2**127
        # halved a few times), whatever the size of D's own gradients. G's loss is left alone.
        d = self.loss.d
        self.loss = self.loss._replace(d=lambda real, fake: d(real, fake) * 2.0 ** 40)
        for n, state in self._pending_scalers.items():
            self._scalers[n].load_state_dict(state)
    monkeypatch.setattr(gan_module.GANModule, "on_fit_start", on_fit_start)


def test_per_network_scalers_back_off_independently_and_resume(tmp_path, scalers_on_cpu):
    run = train("gan_digits", [f"logging.root={tmp_path}", *BASE, "trainer.max_iters=3", "logging.run_id=a",
                               "trainer.checkpoint.every_n_iters=3"])
    m = run.module
    saved = load_checkpoint(run.run_dir / "checkpoints" / "iter-0000003.ckpt")["genscale"]["scalers"]
    assert saved["G"]["scale"] == 2.0 ** 16  # G never overflowed: D's back-offs did not touch it
    assert saved["D"]["scale"] == HUGE / 2 ** 3 and m.overflow_skips == {"D": 3, "G": 0}
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    assert [float(r["amp/scale_G"]) for r in rows] == [2.0 ** 16] * 3
    assert [float(r["amp/overflow_skips_D"]) for r in rows] == [1.0, 2.0, 3.0]
    resumed = train("gan_digits", [f"resume={run.run_dir}", "trainer.max_iters=4"])
    # continued from 2**124 (kept, or halved once more), not re-initialised to 2**127
    assert resumed.module._scalers["D"].get_scale() in (HUGE / 2 ** 3, HUGE / 2 ** 4)
    assert resumed.module._scalers["G"].get_scale() == 2.0 ** 16


def test_skipped_d_steps_leave_d_unchanged_while_g_trains(tmp_path, scalers_on_cpu):
    first = train("gan_digits", [f"logging.root={tmp_path}", *BASE, "trainer.max_iters=1", "logging.run_id=b",
                                 "trainer.checkpoint.every_n_iters=1"])
    d_before = {k: v.clone() for k, v in first.module.D.state_dict().items() if k.endswith("weight")}
    g_before = {k: v.clone() for k, v in first.module.G.state_dict().items() if k.endswith("weight")}
    run = train("gan_digits", [f"resume={first.run_dir}", "trainer.max_iters=3"])
    assert all(torch.equal(run.module.D.state_dict()[k], v) for k, v in d_before.items())
    assert any(not torch.equal(run.module.G.state_dict()[k], v) for k, v in g_before.items())
