"""Training counters kept on the host, mirrored into checkpointed buffers without host syncs.

GANModule, PGANModule and FlowModule count G iterations, D steps, images seen and skipped steps.
The counters are long buffers, so they are checkpointed with the weights (old checkpoints keep
loading) and travel with the module's state. Reading a buffer on the host (``int(module.iteration)``)
is a device synchronisation on a GPU: the host waits until every queued kernel has run. The training
step, and the callbacks that run after every step, read them several times per step.

So during training a Python int per counter is the source of truth: ``add_count``/``set_count``
change it and write the buffer with an in-place device op (``add_``/``fill_`` with a Python
scalar: queued, never waited for), and ``count``/``it``/``seen`` read the int. ``add_count_device``
adds a device tensor instead (a count only the device knows, e.g. a skipped step decided there): that
counter's mirror goes stale and the next ``count`` of it reads the buffer once. The mirror is
filled from the buffers once, at the first read after it was invalidated: at fit start and after a
``load_state_dict`` (a checkpoint restore, `genscale sample`/`eval`). Outside a fit (tests or tools
that write a buffer directly), reads go to the buffer.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class HostCounters:
    """Mixin for a LightningModule with long counter buffers named in ``COUNTERS``."""

    COUNTERS: Tuple[str, ...] = ()

    def _init_counters(self) -> None:
        for name in self.COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._host: Optional[Dict[str, int]] = None  # None: not training, or stale: read the buffers
        self._counting = False  # True between fit start and fit end

    def _mirror(self) -> Optional[Dict[str, int]]:
        if not self._counting:
            return None
        if self._host is None:  # once per fit or checkpoint load: the one read of the buffers
            self._host = {n: int(getattr(self, n)) for n in self.COUNTERS}
        return self._host

    def count(self, name: str) -> int:
        """The counter's value as an int: the host mirror while training (no sync unless the counter
        went stale), else the buffer."""
        host = self._mirror()
        if host is None:
            return int(getattr(self, name))
        if host[name] is None:  # stale after add_count_device: one read of the buffer
            host[name] = int(getattr(self, name))
        return host[name]

    def add_count(self, name: str, k: int) -> None:
        host = self._mirror()
        if host is not None and host[name] is not None:
            host[name] += k
        getattr(self, name).add_(k)

    def add_count_device(self, name: str, k: torch.Tensor) -> None:
        """Adds a 0-dim device tensor without reading it; the counter's mirror goes stale."""
        host = self._mirror()
        if host is not None:
            host[name] = None
        getattr(self, name).add_(k.to(torch.long))

    def set_count(self, name: str, value: int) -> None:
        host = self._mirror()
        if host is not None:
            host[name] = value
        getattr(self, name).fill_(value)

    @property
    def it(self) -> int:
        """G iterations (GANs) or steps (flows) taken: what callbacks key their cadence on."""
        return self.count("iteration")

    def on_train_batch_start(self, batch, batch_idx):
        # A run resumed at or past trainer.max_iters (a requeue after its last step, a relaunch of a
        # finished job) takes no step: Lightning ends the epoch on -1, and should_stop ends the fit.
        if self.it >= self.cfg["trainer"]["max_iters"]:
            self.trainer.should_stop = True
            return -1
        return None

    @property
    def seen(self) -> int:
        """Images seen over all ranks."""
        return self.count("images_seen")

    # ---- when the mirror is (re)filled -------------------------------------------------------------
    def start_counting(self) -> None:
        """Fit start: the buffers hold the truth (fresh, or restored from a checkpoint)."""
        self._counting, self._host = True, None

    def stop_counting(self) -> None:
        self._counting, self._host = False, None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._host = None  # the buffers changed under the mirror
        return out

    def setup(self, stage: str) -> None:
        # Before Lightning restores a checkpoint and before any callback's on_fit_start reads a counter.
        self.start_counting()
        super().setup(stage)

    def teardown(self, stage: str) -> None:
        self.stop_counting()
        super().teardown(stage)


def count_of(module, name: str) -> int:
    """A module's counter for callbacks: the host mirror of HostCounters modules (no sync while
    training), or the value of a plain tensor attribute (other modules, test doubles)."""
    return module.count(name) if isinstance(module, HostCounters) else int(getattr(module, name))


def iteration_of(module) -> int:
    return count_of(module, "iteration")


def images_of(module) -> int:
    return count_of(module, "images_seen")
