"""The training path's speed switches (trainer.channels_last, optimiser impl, trainer.compile).

Each switch leaves the update the same up to rounding (tests/integration/test_speed_switches.py) and
is chosen in the config, so `genscale bench train` can measure it on and off on one card.
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn

IMPLS = ("auto", "fused", "foreach", "plain")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _has_fused(cls) -> bool:
    return "fused" in inspect.signature(cls).parameters


def optimizer_kwargs(cls, impl: str, device: torch.device, deepspeed: bool = False) -> dict:
    """The fused/foreach keywords of torch optimiser ``cls`` for ``impl``.

    auto: fused on CUDA when torch has a fused ``cls`` (one kernel for every parameter, and no host
    read of the step counters) unless DeepSpeed owns the parameters (its flat partitions are tested
    with the multi-tensor path only), else foreach (a few batched kernels; torch's own CUDA default)."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown optimiser impl '{impl}'. Valid: {', '.join(IMPLS)}.")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and _has_fused(cls) and not deepspeed else "foreach"
    if impl == "fused":
        if not _has_fused(cls):
            raise ValueError(f"torch.optim.{cls.__name__} has no fused implementation; use impl foreach or auto.")
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def channels_last(*nets: Optional[nn.Module]) -> None:
    """4-D weights (convolutions) to NHWC in place; parameters keep their identity."""
    for net in nets:
        if net is not None:
            net.to(memory_format=torch.channels_last)


def nhwc(x: torch.Tensor, on: bool) -> torch.Tensor:
    """A 4-D batch in channels_last memory when ``on`` (the convolutions then need no layout change)."""
    return x.contiguous(memory_format=torch.channels_last) if on and x.dim() == 4 else x


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Optimiser state tensors in the memory layout of their parameter. State restored from a
    checkpoint arrives contiguous; the multi-tensor (foreach, fused) kernels are written for
    parameters, gradients and state of matching strides (foreach otherwise falls back to its slow
    per-tensor path)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def compile_modules(nets: Dict[str, Callable], mode: str) -> Dict[str, Callable]:
    """torch.compile wrappers of ``nets`` (modules, or methods that call them; same parameters and
    buffers). They are kept outside the module tree, so state_dict keys and checkpoints do not change;
    ``{}`` for mode off."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown trainer.compile mode '{mode}'. Valid: {', '.join(COMPILE_MODES)}.")
    if mode == "off":
        return {}
    # dynamic=False: a training step's shapes are fixed per phase, so each gets a static graph (the best
    # kernels, CUDA graphs). Dynamo's automatic dynamic shapes would turn PGAN's next resolution into a
    # symbolic graph with guards on its input's view base, one more recompile per (level, fade) pair.
    return {name: torch.compile(net, mode=mode, dynamic=False) for name, net in nets.items()}


def compile_cache_counts() -> Dict[str, int]:
    """This process's on-disk compile-cache lookups so far, as torch counts them: FX graphs (inductor)
    and AOTAutograd graphs, hits and misses. A compile whose lookups all hit loaded its kernels instead
    of generating them (launch/compile_cache.py carries the cache between machines), so its warm-up
    time says little about a cold start."""
    from torch._dynamo.utils import counters

    fx, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_hit": fx["fxgraph_cache_hit"], "fx_miss": fx["fxgraph_cache_miss"],
            "aot_hit": aot["autograd_cache_hit"], "aot_miss": aot["autograd_cache_miss"]}


def mark_cudagraph_step(mode: str) -> None:
    """reduce-overhead replays CUDA graphs whose outputs the next replay overwrites: a new step must be
    announced when a compiled network runs more than once per step (G in D's and in G's phase)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def apply_channels_last_to_optimizers(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        match_state_layout(getattr(opt, "optimizer", opt))


def restore_kernel_choice(opt: torch.optim.Optimizer) -> None:
    """A checkpoint's param_groups carry the fused/foreach flags they were written with, and
    load_state_dict puts them over the ones this run built the optimiser with: a run resumed with another
    optimiser impl would silently keep the old kernels. The built ones (the optimiser's defaults, which
    loading leaves alone) win, and the step counters move to where that kernel keeps them (fused: on the
    parameter's device, else on the host)."""
    for group in opt.param_groups:
        keys = [k for k in ("fused", "foreach") if k in opt.defaults and group.get(k) != opt.defaults[k]]
        if not keys:
            continue
        group.update({k: opt.defaults[k] for k in keys})
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


class SpeedSwitches:
    """Mixin for the training modules: applies trainer.channels_last and trainer.compile to the
    networks ``train_nets()`` names (and their EMA copies, ``ema_nets()``)."""

    _compiled: Dict[str, Callable]
    cfg: dict

    def train_nets(self) -> Dict[str, nn.Module]:
        raise NotImplementedError

    def compiled_methods(self) -> Dict[str, Callable]:
        """Methods of the step compiled as a whole besides the networks (the GAN's gradient penalty)."""
        return {}

    def ema_nets(self) -> list:
        return []

    @property
    def channels_last_on(self) -> bool:
        return bool(self.cfg["trainer"].get("channels_last", False))

    def fast(self, name: str) -> Callable:
        """The network (or method) to call in the training step: compiled when trainer.compile is on."""
        compiled = getattr(self, "_compiled", None) or {}
        return compiled[name] if name in compiled else getattr(self, name)

    def compile_networks(self, mode: str) -> None:
        """Compiles the training networks (also called by `genscale bench train` after its eager FLOP count)."""
        self._compiled = compile_modules({**self.train_nets(), **self.compiled_methods()}, mode)
        self._compile_mode = mode

    def new_phase(self) -> None:
        """At the start of each optimiser phase (GAN: D, G; flow: the step)."""
        mark_cudagraph_step(getattr(self, "_compile_mode", "off"))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Before the optimisers exist (so their fresh state takes the same layout) and before the move
        # to the device (Tensor.to keeps the layout).
        if self.channels_last_on:
            channels_last(*self.train_nets().values(), *self.ema_nets())

    def on_train_start(self) -> None:
        super().on_train_start()
        for opt in self.trainer.optimizers:  # after a checkpoint's optimiser state was restored
            inner = getattr(opt, "optimizer", opt)
            if isinstance(inner, torch.optim.Optimizer):
                restore_kernel_choice(inner)
        if self.channels_last_on:  # optimiser state restored from a checkpoint arrives NCHW
            apply_channels_last_to_optimizers(self.trainer.optimizers)
        mode = self.cfg["trainer"].get("compile", "off")
        if mode != "off" and getattr(self, "global_rank", 0) == 0:
            # Otherwise a shipped experiment that compiles looks hung for its first minutes.
            scope = " (each block on its own)" if self.cfg["trainer"].get("compile_scope", "model") == "block" else ""
            print(f"genscale: torch.compile (mode {mode}) of {', '.join(self.train_nets())}{scope}: the first "
                  "iterations compile, minutes for large networks; trainer.compile=off trains eagerly",
                  file=sys.stderr, flush=True)
        self.compile_networks(mode)
