"""GANModule: the phase logic of adversarial training around two pure nn.Modules G and D.

One Lightning training_step = one D step on one batch. After ``n_critic`` D steps (a schedule of the
G iteration, so WGAN's 100-step phases are expressible) comes one G step. Each batch may be split
into micro-batches whose gradients are summed (accumulation); under the gan_ddp strategy the
gradients of the network being stepped are averaged over ranks once per phase, after the last
micro-batch (``_sync_grads``), and buffers are copied from rank 0 after each step (``_sync_buffers``). The module keeps its own counters as buffers (checkpointed with the weights), because
Lightning's global_step counts optimizer steps of both networks.

Randomness (latents, penalty mixing weights, flips) comes from a generator seeded by
(seed, rank, D step), a pure function of checkpointed counters, so resume is exact without saving
any RNG state and ranks draw distinct latents.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Optional

import lightning as L
import torch
import torch.nn as nn

from trainer.bench_profile import phase
from trainer.config import ConfigError
from trainer.counters import HostCounters
from trainer.finite import (DeviceStreaks, NonFiniteLossError, check_streaks, clear_skip_flag,
                             device_check_possible, flag_step)
from trainer.speed import SpeedSwitches, nhwc, optimizer_kwargs
from trainer.losses import clip_weights, drift_penalty, get_loss, gradient_penalty, ortho_params, ortho_reg

CHECKPOINT_FORMAT = 1


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def mix_seed(*parts: int) -> int:
    """splitmix64 over the parts: nearby (seed, rank, step) tuples give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def critic_steps(iteration: int, n_critic: int, boost_steps: int, boost_first: int, boost_every: int) -> int:
    """D steps before G iteration ``iteration`` (0-based); WGAN boosts early and periodic ones."""
    if boost_steps > 0 and (iteration < boost_first or (boost_every > 0 and iteration % boost_every == 0)):
        return boost_steps
    return n_critic


def check_micro_batches(per_rank: int, accum: int) -> int:
    """The micro-batch of optim.accumulate equal parts of this rank's batch; anything else would scale the
    gradient wrongly (fewer chunks, each divided by accum) or drop samples."""
    if per_rank % accum:
        raise ConfigError(f"This rank's batch of {per_rank} (data.batch_size / processes) does not split into "
                          f"optim.accumulate={accum} equal micro-batches. Choose data.batch_size divisible by "
                          f"processes x optim.accumulate (and so every pgan.batch_sizes entry).")
    return per_rank // accum


class GANModule(HostCounters, SpeedSwitches, L.LightningModule):
    COUNTERS = ("iteration", "d_steps", "d_phase", "images_seen", "nonfinite_total")

    def __init__(self, G: nn.Module, D: nn.Module, cfg: dict, z_dim: int):
        super().__init__()
        self.automatic_optimization = False
        self.G, self.D = G, D
        self.cfg = cfg  # plain dict: the resolved run config (saved in every checkpoint)
        self.z_dim = z_dim
        self.G_ema: Optional[nn.Module] = None
        if cfg["ema"]["enabled"]:
            self.G_ema = copy.deepcopy(G).eval()
            set_requires_grad(self.G_ema, False)
        self.loss = get_loss(cfg["loss"]["name"])
        # Class-conditional networks (BigGAN) take labels: the real ones with real images, and labels
        # drawn uniformly from the step's generator for fakes. Other networks take none (and draw none).
        self.num_classes = int(getattr(G, "num_classes", 0)) if getattr(G, "conditional", False) else 0
        self._ortho = ortho_params(G) if cfg["loss"].get("ortho_reg", 0.0) > 0 else []
        self._ortho_last = torch.zeros(())
        # A D with BatchNorm scores reals and fakes in separate calls (_d_real_fake).
        self._d_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
        self._init_counters()  # checkpointed buffers with a host mirror (trainer/counters.py)
        grid = cfg["trainer"]["sample_grid"]
        g = torch.Generator().manual_seed(mix_seed(cfg["trainer"]["seed"], 0xF1CED))
        self.register_buffer("fixed_z", torch.randn(grid, z_dim, generator=g))
        self.g_stepped = False  # whether the last training_step ended with a G step (callbacks read it)
        self._nonfinite_streak = {"D": 0, "G": 0}
        self._device_streaks = DeviceStreaks()  # trainer.finite_check on the device (trainer/finite.py)
        self._scalers: dict = {}  # 16-mixed outside DeepSpeed: one GradScaler per network
        self._pending_scalers: dict = {}  # their states from a checkpoint, loaded at fit start
        self.overflow_skips = {"D": 0, "G": 0}
        self.g_loss_hooks: list = []  # callables (fake, y) -> extra G loss, e.g. the knowledge callback's
        self._t_last: Optional[float] = None
        self._img_s = 0.0
        self._seen_last = 0

    # ---- optimisers ------------------------------------------------------------------------
    def configure_optimizers(self):
        return [self._make_opt(self.G, self.cfg["optim"]["g"]), self._make_opt(self.D, self.cfg["optim"]["d"])]

    def _make_opt(self, net: nn.Module, o: dict) -> torch.optim.Optimizer:
        cls = torch.optim.Adam if o["name"] == "adam" else torch.optim.RMSprop
        # Lightning calls this after moving the module to its device, so auto can pick fused on CUDA.
        kw = optimizer_kwargs(cls, o.get("impl", "auto"), self.device,
                              deepspeed=self.cfg["trainer"].get("strategy") == "deepspeed")
        if cls is torch.optim.Adam:
            kw["betas"] = tuple(o["betas"])
        return cls(net.parameters(), lr=o["lr"], eps=o["eps"], weight_decay=o["weight_decay"], **kw)

    def train_nets(self) -> dict:
        return {"G": self.G, "D": self.D}

    def ema_nets(self) -> list:
        return [self.G_ema] if self.G_ema is not None else []

    # ---- helpers ---------------------------------------------------------------------------
    def _rng(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.cfg["trainer"]["seed"], self.global_rank, self.count("d_steps")))
        return g

    def _prep(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 -> float in [-1, 1] on the device; flips drawn from the step's generator."""
        x = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.cfg["data"]["hflip"]:
            flip = torch.rand(x.shape[0], device=self.device, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return nhwc(x, self.channels_last_on)

    def _sync_ctx(self, module: nn.Module, last: bool):
        """Skip DDP's gradient all-reduce on non-final micro-batches."""
        strategy = getattr(self, "_trainer", None) and self.trainer.strategy
        if not last and strategy is not None and hasattr(strategy, "block_backward_sync"):
            return strategy.block_backward_sync()
        return contextlib.nullcontext()

    def _strategy_hook(self, name: str):
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer.strategy, name, None) if trainer is not None else None

    def _sync_grads(self, net: nn.Module, loss: torch.Tensor) -> bool:
        """Averages ``net``'s gradients over ranks (gan_ddp; a no-op in one process). Returns whether
        the loss was finite on every rank, so that all ranks step or all skip together.

        The bool() is the phase's one host sync, kept on purpose: whether to step must be known on
        the host before the optimiser (or GradScaler, or DeepSpeed engine) touches the weights and
        Adam's moments, gan_ddp's all-reduce carries the flag to the other ranks, and a streak of
        trainer.max_nonfinite must stop the run at the step that completes it, not later."""
        finite = bool(torch.isfinite(loss))
        reduce = self._strategy_hook("all_reduce_grads")
        return reduce(net, finite) if reduce is not None else finite

    def _sync_buffers(self) -> None:
        """Copies G's and D's buffers (BatchNorm statistics, spectral-norm vectors) from rank 0."""
        broadcast = self._strategy_hook("broadcast_buffers")
        if broadcast is not None:
            broadcast(self.G, self.D)

    # ---- fp16: one loss scaler per network --------------------------------------------------------
    def on_fit_start(self) -> None:
        """Lightning's 16-mixed plugin has one GradScaler for both optimisers, so its scale would be
        updated twice per iteration and a G overflow would shrink D's scale too. Each network gets its
        own scaler instead (checkpointed); Lightning keeps providing autocast. DeepSpeed's fp16
        engines already scale per network."""
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is None or self._strategy_hook("engine_backward") is not None:
            return
        plugin.scaler = None
        self._scalers = {n: torch.amp.GradScaler(self.device.type) for n in ("G", "D")}
        for n, state in self._pending_scalers.items():
            self._scalers[n].load_state_dict(state)

    def _name(self, net: nn.Module) -> str:
        return "G" if net is self.G else "D"

    def _backward(self, net: nn.Module, loss: torch.Tensor) -> None:
        """Backward of one micro-batch: through ``net``'s DeepSpeed engine when there is one, scaled by
        ``net``'s own loss scaler under 16-mixed."""
        engine_backward = self._strategy_hook("engine_backward")
        if engine_backward is not None:
            engine_backward(net, loss)
        elif self._scalers:
            self.manual_backward(self._scalers[self._name(net)].scale(loss))
        else:
            self.manual_backward(loss)

    def _scaled_step(self, name: str, opt) -> bool:
        """scaler.step unscales (gradients already averaged over ranks, so every rank finds the same
        overflow) and skips on inf/NaN gradients; update() then backs the scale off. Returns whether
        the optimiser stepped."""
        scaler = self._scalers[name]
        before = scaler.get_scale()
        scaler.step(getattr(opt, "optimizer", opt))
        scaler.update()
        applied = scaler.get_scale() >= before
        self.overflow_skips[name] += int(not applied)
        return applied

    def _device_step(self, opt, name: str, loss: torch.Tensor) -> None:
        """The fused optimiser steps with the loss's non-finite flag; the skip count and the streak stay on
        the device until ``check_streaks`` reads them (trainer/finite.py)."""
        flag_step(self, opt, name, loss)
        try:
            opt.step()
        finally:
            clear_skip_flag(opt)

    _NONFINITE_ADVICE = ("Those steps were skipped and the run stopped; the last checkpoint written before them "
                         "is intact. Lower the learning rates, use trainer.precision=32, or raise "
                         "trainer.max_nonfinite if the spikes are transient.")

    def _step(self, net: nn.Module, opt, name: str, loss: torch.Tensor) -> bool:
        """The phase's update: gradients averaged (or the step skipped on every rank after a
        non-finite loss), then the optimiser (or DeepSpeed engine) steps. Returns whether it did
        (True when the fused optimiser decided on the device: clipping unchanged weights is a no-op)."""
        if device_check_possible(self, opt):
            self._device_step(opt, name, loss)
            return True
        if not self._finite_or_skip(self._sync_grads(net, loss), opt, name):
            discard = self._strategy_hook("discard_grads")
            if discard is not None:
                discard(net)
            return False
        engine_step = self._strategy_hook("engine_step")
        if engine_step is not None:
            return engine_step(net)  # False: DeepSpeed's fp16 loss scaler skipped an overflow
        if self._scalers:
            return self._scaled_step(name, opt)
        opt.step()
        return True

    @staticmethod
    def _param_dtype(net: nn.Module) -> torch.dtype:
        """fp32, or the 16-bit type DeepSpeed's fp16 engines gave the weights."""
        p = next(net.parameters(), None)
        return p.dtype if p is not None and p.dtype in (torch.float16, torch.bfloat16) else torch.float32

    def deepspeed_pairs(self):
        """(name, network, optimiser) for each DeepSpeed engine the multi-engine strategy builds."""
        opt_g, opt_d = self.optimizers(use_pl_optimizer=False)
        return [("G", self.G, opt_g), ("D", self.D, opt_d)]

    def _finite_or_skip(self, finite: bool, opt, net: str) -> bool:
        """Skips the optimiser step on a non-finite loss (on any rank); too many in a row (per network)
        stop the run."""
        if finite:
            self._nonfinite_streak[net] = 0
            return True
        opt.zero_grad(set_to_none=True)
        self.add_count("nonfinite_total", 1)
        self._nonfinite_streak[net] += 1
        limit = self.cfg["trainer"]["max_nonfinite"]
        if self._nonfinite_streak[net] >= limit:
            raise NonFiniteLossError(
                f"The {net} loss was non-finite for {self._nonfinite_streak[net]} consecutive steps "
                f"(iteration {self.it}, {self.count('nonfinite_total')} skipped in all). {self._NONFINITE_ADVICE}")
        return False

    def sample_latents(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=self.device, generator=gen)

    def sample_labels(self, n: int, gen: torch.Generator) -> Optional[torch.Tensor]:
        """Uniform class labels for fakes; None (and no draw) for unconditional networks."""
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), device=self.device, generator=gen)

    def net_args(self) -> tuple:
        """What G and D take after their input (and label) in this step: nothing; PGAN: level, alpha.
        Passed as arguments, so a compiled network or penalty sees them as inputs, not as module state."""
        return ()

    @staticmethod
    def _call(net, x: torch.Tensor, y: Optional[torch.Tensor], args: tuple) -> torch.Tensor:
        return net(x, *args) if y is None else net(x, y, *args)

    def _g(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return self._call(self.fast("G"), z, y, self.net_args())

    def _d(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return self._call(self.fast("D"), x, y, self.net_args())

    def _d_real_fake(self, r: torch.Tensor, fake: torch.Tensor, y_real: Optional[torch.Tensor],
                     y_fake: Optional[torch.Tensor]):
        """D's scores of the real and the fake micro-batch, as float."""
        if self._d_batchnorm:
            # Two calls, as in the DCGAN and WGAN reference code: in one call BatchNorm's batch statistics
            # would mix reals and fakes, so a fake's score would depend on the reals beside it, and D
            # would learn a different function from the one the G step (fakes alone) differentiates.
            return self._d(r, y_real).float(), self._d(fake.to(r.dtype), y_fake).float()
        y = None if y_fake is None else torch.cat([y_real, y_fake])
        # One call on reals and fakes together (BigGAN's reference): spectral norm's power iteration runs
        # once per D step.
        scores = self._d(torch.cat([r, fake.to(r.dtype)]), y).float()
        return scores[: r.shape[0]], scores[r.shape[0]:]

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
                         y: Optional[torch.Tensor], dtype: torch.dtype, *args) -> torch.Tensor:
        """WGAN-GP's penalty on D at the mixes of ``real`` and ``fake`` (``args``: ``net_args()``). It
        differentiates the plain D twice; under trainer.compile it is one graph of its own (D's forward,
        its input gradient and the norm), whose backward is the double backward (a compiled D's
        backward cannot be differentiated again)."""
        return gradient_penalty(lambda x: self._call(self.D, x, y, args), real, fake, eps, dtype,
                                autocast=self.cfg["loss"]["gp_autocast"])

    def compiled_methods(self) -> dict:
        return {"gradient_penalty": self.gradient_penalty} if self.loss.uses_gp else {}

    def _ortho_penalty(self, last: bool) -> torch.Tensor:
        """loss.ortho_reg's term, once per G step (on its last micro-batch), 0 elsewhere."""
        if not (self._ortho and last):
            return torch.zeros((), device=self.device)
        reg = ortho_reg(self._ortho, self.cfg["loss"]["ortho_reg"])
        self._ortho_last = reg.detach()
        return reg

    def sample_mix(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Per-sample interpolation weights of the gradient penalty."""
        return torch.rand(n, device=self.device, generator=gen)

    # ---- phases ----------------------------------------------------------------------------
    def d_step(self, real: torch.Tensor, gen: torch.Generator, opt, labels: Optional[torch.Tensor] = None) -> dict:
        c = self.cfg["loss"]
        accum = self.cfg["optim"]["accumulate"]
        check_micro_batches(real.shape[0], accum)
        set_requires_grad(self.G, False)
        set_requires_grad(self.D, True)
        opt.zero_grad(set_to_none=True)
        self.new_phase()
        total = torch.zeros((), device=self.device)
        stats = {"d/real": 0.0, "d/fake": 0.0, "d/gp": 0.0}
        y_real = labels.chunk(accum) if labels is not None else [None] * accum
        for k, r in enumerate(real.chunk(accum)):
            with self._sync_ctx(self.D, last=k == accum - 1):
                with torch.no_grad(), phase("D fakes"):
                    z = self.sample_latents(r.shape[0], gen)
                    y_fake = self.sample_labels(r.shape[0], gen)
                    fake = self._g(z, y_fake)
                with phase("D forward"):
                    s_real, s_fake = self._d_real_fake(r, fake, y_real[k], y_fake)
                    loss = self.loss.d(s_real, s_fake)
                if self.loss.uses_gp:
                    with phase("D penalty"):
                        eps = self.sample_mix(r.shape[0], gen)
                        gp = self.fast("gradient_penalty")(r, fake, eps, y_real[k], self._param_dtype(self.D),
                                                           *self.net_args())
                        loss = loss + c["gp_weight"] * gp
                        stats["d/gp"] += gp.detach() / accum
                if c["drift"] > 0:
                    loss = loss + c["drift"] * drift_penalty(s_real)
                with phase("D backward"):
                    self._backward(self.D, loss / accum)
            total = total + loss.detach() / accum
            stats["d/real"] += s_real.detach().mean() / accum
            stats["d/fake"] += s_fake.detach().mean() / accum
        with phase("D update"):
            if self._step(self.D, opt, "D", total) and self.loss.clips_weights:
                clip_weights(self.D, c["clip"])
        stats["d/loss"] = total
        return stats

    def g_step(self, batch: int, gen: torch.Generator, opt) -> dict:
        accum = self.cfg["optim"]["accumulate"]
        set_requires_grad(self.G, True)
        set_requires_grad(self.D, False)  # no D gradients are computed or accumulated in G's phase
        opt.zero_grad(set_to_none=True)
        self.new_phase()
        total = torch.zeros((), device=self.device)
        micro = check_micro_batches(batch, accum)
        for k in range(accum):
            with self._sync_ctx(self.G, last=k == accum - 1):
                z = self.sample_latents(micro, gen)
                y = self.sample_labels(micro, gen)
                # The regulariser enters unscaled once per step (the backward divides by accum); g/loss
                # includes it, g/ortho shows it alone.
                with phase("G forward"):
                    fake = self._g(z, y)
                    loss = self.loss.g(self._d(fake, y).float()) + accum * self._ortho_penalty(k == accum - 1)
                    for hook in self.g_loss_hooks:
                        loss = loss + hook(fake, y)
                with phase("G backward"):
                    self._backward(self.G, loss / accum)
            total = total + loss.detach() / accum
        with phase("G update"):
            self._step(self.G, opt, "G", total)
        set_requires_grad(self.D, True)
        return {"g/loss": total, "g/ortho": self._ortho_last} if self._ortho else {"g/loss": total}

    def n_critic_now(self) -> int:
        o = self.cfg["optim"]
        return critic_steps(self.it, o["n_critic"], o["critic_boost_steps"],
                            o["critic_boost_first"], o["critic_boost_every"])

    def training_step(self, batch, batch_idx):
        images, labels = batch
        ensure = self._strategy_hook("ensure_engines")
        if ensure is not None:
            ensure(self)  # DeepSpeed: engines built at the first step (after a resume's weights)
        opt_g, opt_d = self.optimizers()
        gen = self._rng()
        with phase("batch"):
            real = self._prep(images, gen)
        labels = labels.to(self.device, torch.long) if self.num_classes else None
        stats = self.d_step(real, gen, opt_d, labels)
        self.add_count("d_steps", 1)
        self.add_count("d_phase", 1)
        self.add_count("images_seen", real.shape[0] * self.trainer.world_size)
        self.g_stepped = False
        if self.count("d_phase") >= self.n_critic_now():
            stats.update(self.g_step(real.shape[0], gen, opt_g))
            self.add_count("iteration", 1)
            self.set_count("d_phase", 0)
            self.g_stepped = True
        self._sync_buffers()
        if self.g_stepped:
            if self.it % self.cfg["trainer"]["log_every"] == 0:
                check_streaks(self, "iteration", self._NONFINITE_ADVICE)
            self._log_progress(stats)
        if self.it >= self.cfg["trainer"]["max_iters"]:
            self.trainer.should_stop = True

    @property
    def img_per_s(self) -> float:
        """Images/s (all ranks) between the last two G steps, for the progress bar (a host float: a
        per-step self.log would copy it to the device every step)."""
        return self._img_s

    def effective_batch(self) -> int:
        """The global batch of the current step (Progressive GAN changes it per resolution)."""
        return self.cfg["data"]["batch_size"]

    def _log_progress(self, stats: dict) -> None:
        now = time.perf_counter()
        it, seen = self.it, self.seen
        if self._t_last is not None:
            self._img_s = (seen - self._seen_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._seen_last = now, seen
        kimg = seen / 1000.0
        every = self.cfg["trainer"]["log_every"]
        if it % every == 0 or it == 1:
            # Straight to the loggers, keyed by G iteration: self.log would repeat cached values on
            # every later batch in manual optimisation. The reduce is collective (all ranks log together).
            keys = list(stats)
            vals = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32, device=self.device) for k in keys])
            vals = self.trainer.strategy.reduce(vals, reduce_op="mean")
            logged = {k: float(v) for k, v in zip(keys, vals.tolist())}
            logged.update({"iteration": float(it), "progress/kimg": kimg, "perf/img_per_s": self._img_s,
                           "train/nonfinite_skipped": float(self.count("nonfinite_total"))})
            # the batch an update sees (data.batch_size, global) and how it is made: ranks x micro-batches
            world, accum = self.trainer.world_size, self.cfg["optim"]["accumulate"]
            batch = self.effective_batch()
            logged.update({"train/effective_batch": float(batch),
                           "train/micro_batch_per_rank": float(batch // (world * accum))})
            for n, scaler in self._scalers.items():
                logged[f"amp/scale_{n}"] = float(scaler.get_scale())
                logged[f"amp/overflow_skips_{n}"] = float(self.overflow_skips[n])
            self.last_logged = logged  # the progress bar shows it
            if self.trainer.is_global_zero:
                for lg in self.loggers:
                    lg.log_metrics(logged, step=it)

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["genscale"] = {
            "format": CHECKPOINT_FORMAT,
            "kind": "gan",
            "config": self.cfg,
            "iteration": self.it,
            "images_seen": self.seen,
            # the data position and per-rank random streams depend on it: a resume must match it
            "world_size": int(self.trainer.world_size) if getattr(self, "_trainer", None) is not None else 1,
        }
        if self._scalers:
            checkpoint["genscale"]["scalers"] = {n: s.state_dict() for n, s in self._scalers.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_scalers = dict(checkpoint.get("genscale", {}).get("scalers", {}))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, use_ema: bool = True, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images in [-1, 1] from latents, with G_ema (eval mode) when it exists and is asked for.
        Conditional networks get labels ``y``, by default cycling through the classes."""
        net = self.G_ema if (use_ema and self.G_ema is not None) else self.G
        if self.num_classes and y is None:
            y = torch.arange(z.shape[0]) % self.num_classes
        was_training = net.training
        net.eval()
        out = net(z.to(self.device)) if y is None else net(z.to(self.device), y.to(self.device))
        net.train(was_training)
        return out.float().clamp(-1, 1)
