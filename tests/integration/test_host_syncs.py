"""Host synchronisations inside the training step, counted on CPU.

On a GPU every read of a device tensor's value on the host (bool(), int(), float(), .item(), .tolist(),
use as an index) waits for the device to drain its queue, so the host can no longer run ahead of the
GPU. On CPU nothing waits, but the same calls can be counted: these tests patch those methods of
torch.Tensor for the duration of training steps that are neither logging, progress-bar, checkpoint nor
sample steps, through the real `genscale train` path (module, callbacks, strategy) and count them.

What remains, by design (trainer/gan_module.py ``_sync_grads``, trainer/flow_module.py ``_all_finite``):
one read per optimiser phase of whether the loss was finite, because the step must be skipped on every
rank before the optimiser touches the weights, and a streak of trainer.max_nonfinite must stop the run
at that step. A GAN iteration with one D step has two phases (D, G); a flow step has one. A GAN or a flow
with fused Adam (the CUDA default) reads nothing: the fused update skips itself on a device flag
(trainer/finite.py), and the streak is read every trainer.log_every iterations.

Not counted, and checked by reading the code instead: blocking host-to-device copies (a Python number
logged with self.log is copied to the device and waited for; the step no longer logs Python numbers
per step), and reads of optimiser step counters, which torch keeps on the host (is_step_counter).
"""
from __future__ import annotations

import collections

import lightning as L
import pytest
import torch

from launch.profile_step import SyncCounter, is_step_counter
from trainer.build import prepare_run

# Expected reads per training step (one D step + one G step for the GANs, one step for the flow). With
# knowledge constraints the flow adds one: whether the importance weights' effective sample size clears
# knowledge.ess_min decides the step's loss term and the skip counter (KnowledgeCallback._flow_term).
# With fused optimisers (Adam's CUDA default) the skip is decided on the device (trainer.finite_check=auto)
# and the step reads nothing.
EXPECTED = {"gan": 2, "gan_fused": 0, "flow": 1, "flow_fused": 0, "flow_knowledge": 2, "flow_knowledge_fused": 1}
FUSED = ["optim.g.impl=fused", "optim.d.impl=fused"]


class Window(L.Callback):
    """Opens the counter at the first batch-start hook and closes it after every other callback's
    batch-end hook; per-step counts keyed by the step's index."""

    def __init__(self, counter: SyncCounter, steps: range):
        self.counter, self.steps = counter, steps
        self.per_step: dict = {}
        self.where: collections.Counter = collections.Counter()
        self._i = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._i += 1
        self.counter.exempt = lambda t: is_step_counter(t, trainer.optimizers)
        if self._i in self.steps:
            self.counter.count = 0
            self.counter.where.clear()
            self.counter.active = True

    def close(self):
        if self.counter.active:
            self.counter.active = False
            self.per_step[self._i] = self.counter.count
            self.where.update(self.counter.where)


class Close(L.Callback):
    def __init__(self, window: Window):
        self.window = window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.window.close()


def count_syncs(experiment: str, overrides: list, steps: range) -> Window:
    run = prepare_run(experiment, overrides)
    counter = SyncCounter()
    window = Window(counter, steps)
    run.trainer.callbacks.insert(0, window)
    run.trainer.callbacks.append(Close(window))
    with counter:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    return window


def _overrides(tmp_path, *extra):
    # No logging, checkpoint or sample step inside the counted window (steps 3..8 of 10); the progress
    # bar is on, refreshing at iteration 10 only.
    return [f"logging.root={tmp_path}", "logging.wandb=false", "trainer.log_every=1000", "trainer.max_iters=10",
            "trainer.sample_every=0", "trainer.checkpoint.every_n_iters=0", "trainer.progress_bar=true",
            f"eval.features_dir={tmp_path}/features", *extra]


CASES = {
    "gan_digits": ("gan", ["model.g_width=8", "model.d_width=8", "data.batch_size=16"]),
    "biggan_mnist5k": ("gan", ["data.name=digits", "model.g_width=4", "model.d_width=4", "model.shared_dim=8",
                               "data.batch_size=8", "trainer.sample_grid=10", "ema.start_iter=2"]),
    "glow_digits": ("flow", ["data.batch_size=16", "ema.enabled=true"]),
    "gan_digits+knowledge": ("gan", ["model.g_width=8", "model.d_width=8", "data.batch_size=16",
                                     "knowledge.enabled=true", "knowledge.constraint=symmetry"]),
    "glow_digits+knowledge": ("flow_knowledge", ["data.batch_size=16", "knowledge.enabled=true",
                                                 "knowledge.constraint=symmetry"]),
    "pgan_mnist5k": ("gan", ["data.name=digits", "data.resolution=8", "pgan.fmap_base=32", "pgan.fmap_max=8",
                             "data.batch_size=8", "pgan.batch_sizes=[8,8]", "pgan.fade_images=[40]",
                             "pgan.stable_images=[40]", "trainer.sample_grid=4"]),
}
CASES.update({  # the same runs with fused Adam
    f"{name}+fused": ("gan_fused", CASES[name][1] + FUSED)
    for name in ("gan_digits", "biggan_mnist5k", "pgan_mnist5k", "gan_digits+knowledge")})
CASES.update({  # glow_digits trains with Adam: fused, its step reads nothing either (with knowledge: the ESS gate)
    "glow_digits+fused": ("flow_fused", CASES["glow_digits"][1] + ["flow.optimizer_impl=fused"]),
    "glow_digits+knowledge+fused": ("flow_knowledge_fused",
                                    CASES["glow_digits+knowledge"][1] + ["flow.optimizer_impl=fused"])})


@pytest.mark.parametrize("experiment", list(CASES))
def test_training_steps_read_nothing_but_the_finite_flag(tmp_path, experiment):
    kind, extra = CASES[experiment]
    window = count_syncs(experiment.split("+")[0], _overrides(tmp_path, *extra), range(3, 9))
    assert sorted(window.per_step) == list(range(3, 9))
    expected = EXPECTED[kind]
    assert all(n == expected for n in window.per_step.values()), (
        f"host reads per step {window.per_step}, expected {expected}; sources: {dict(window.where)}")


def test_counter_sees_a_host_read(tmp_path):
    """The counter itself: a float() of a tensor inside the window is counted (guards the patching)."""
    counter = SyncCounter()
    with counter:
        counter.active = True
        float(torch.ones(()))
        int(torch.ones((), dtype=torch.long))
        torch.ones(2).tolist()
        counter.active = False
        float(torch.ones(()))
    assert counter.count == 3
