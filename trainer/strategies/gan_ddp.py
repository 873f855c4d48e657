"""Data parallelism for GANs without DistributedDataParallel's unused-parameter search.

Plain DDP wraps the whole LightningModule (G, D and G_ema together), so a D step leaves G's
parameters without gradients and DDP fails ("parameters that were not used in producing the
loss"), or needs ``find_unused_parameters=True`` and its graph traversal on every backward.

``GANDDPStrategy`` is Lightning's DDPStrategy (process launch, process group, rank-0 checkpoint
writing, ``reduce``/``broadcast``) without the DDP wrapper. The module asks for the gradient
synchronisation itself, once per phase:

* ``all_reduce_grads(net, finite)`` after the (accumulated) backward of a phase and before the
  optimiser step: the gradients of the network being stepped are flattened into buckets and
  all-reduced (averaged over ranks). Accumulated micro-batches only add up locally, so no
  ``no_sync`` is needed. The same all-reduce carries a per-parameter "has a gradient" mask (a
  parameter with no gradient on any rank keeps ``grad=None``, as in one process; one missing on
  some ranks only counts as zero there) and each rank's non-finite-loss flag, so all ranks step,
  or all skip, together.
* ``broadcast_buffers(*nets)`` after each training step: buffers (BatchNorm running statistics,
  spectral-norm power-iteration vectors, ActNorm state) are copied from rank 0, as DDP's
  ``broadcast_buffers=True`` does, so the ranks hold identical modules. BatchNorm still normalises
  each rank's batch with that rank's own statistics (as under DDP without SyncBatchNorm).

Parameters and buffers are broadcast from rank 0 once at setup. Since every rank then applies the
same averaged gradients with the same optimiser state, the weights, and the G_ema that follows G,
stay identical without further communication.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

STRATEGY_NAME = "gan_ddp"


def _buckets(tensors: List[torch.Tensor], cap_bytes: int) -> List[List[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), each group cut into buckets of at most cap bytes."""
    groups: Dict[Tuple, List[List[int]]] = {}
    sizes: Dict[Tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or (sizes[key] + nbytes > cap_bytes and groups[key][-1]):
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [b for bs in groups.values() for b in bs]


class GANDDPStrategy(DDPStrategy):
    strategy_name = STRATEGY_NAME

    def __init__(self, *args, bucket_cap_mb: float = 64.0, **kwargs):
        kwargs.setdefault("start_method", "popen")
        super().__init__(*args, **kwargs)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2 ** 20)

    # ---- no DDP wrapper ----------------------------------------------------------------------
    def configure_ddp(self) -> None:
        # Identical starting point on every rank: parameters and buffers from rank 0.
        _sync_module_states(self.model)

    @property
    def _active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ---- per-phase gradient averaging ----------------------------------------------------------
    @torch.no_grad()
    def all_reduce_grads(self, module: nn.Module, finite: bool = True) -> bool:
        """Averages the gradients of ``module`` over ranks; returns True when every rank's loss was finite."""
        if not self._active:
            return finite
        params = [p for p in module.parameters() if p.requires_grad]
        world = self.world_size
        device = params[0].device if params else self.root_device
        # meta = [has-grad mask per parameter..., non-finite flag], summed over ranks
        # built on the host and queued to the device (a blocking copy would wait for the device)
        meta = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if finite else 1.0],
                            dtype=torch.float32).to(device, non_blocking=True)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flats, works, buckets = [], [], _buckets(grads, self.bucket_cap_bytes)
        meta_in = next((k for k, b in enumerate(buckets) if grads[b[0]].dtype == torch.float32), None)
        for k, b in enumerate(buckets):
            parts = [grads[i].reshape(-1) for i in b] + ([meta] if k == meta_in else [])
            flat = torch.cat(parts)
            flats.append(flat)
            works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
        if meta_in is None:  # no fp32 gradients (e.g. bf16 weights): the flags travel on their own
            flats.append(meta)
            works.append(dist.all_reduce(meta, op=dist.ReduceOp.SUM, async_op=True))
        for w in works:
            w.wait()
        if meta_in is not None:
            meta = flats[meta_in][-meta.numel():]
        else:
            meta = flats[-1]
        meta = meta.tolist()  # the phase's one host read (not one per parameter)
        for b, flat in zip(buckets, flats):
            off = 0
            for i in b:
                p, n = params[i], params[i].numel()
                if meta[i] > 0:
                    g = flat[off: off + n].view_as(p).div_(world)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
                off += n
        return meta[-1] == 0

    def all_finite(self, finite: bool) -> bool:
        """True when ``finite`` holds on every rank (one tiny all-reduce)."""
        if not self._active:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag[0] == 0)

    # ---- buffers ------------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_buffers(self, *modules: nn.Module) -> None:
        """Copies every buffer of ``modules`` from rank 0 (one broadcast per dtype bucket)."""
        if not self._active:
            return
        bufs = [b for m in modules for b in m.buffers()]
        works, pending = [], []
        for b in _buckets(bufs, self.bucket_cap_bytes):
            flat = torch.cat([bufs[i].reshape(-1) for i in b])
            works.append(dist.broadcast(flat, src=0, async_op=True))
            pending.append((b, flat))
        for w in works:
            w.wait()
        if self.global_rank == 0:
            return
        for b, flat in pending:
            off = 0
            for i in b:
                n = bufs[i].numel()
                bufs[i].copy_(flat[off: off + n].view_as(bufs[i]))
                off += n


def register() -> None:
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(STRATEGY_NAME, GANDDPStrategy, description=(
            "DDP for GANs: no DistributedDataParallel wrapper; gradients averaged per phase "
            "(G or D), buffers broadcast from rank 0"))


register()
