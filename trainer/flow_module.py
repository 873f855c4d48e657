"""FlowModule: maximum-likelihood training of a normalising flow (Glow) in bits/dim.

Data: uint8 images are quantised to n_bits and dequantised with uniform noise,
    x = ((images >> (8 - n_bits)) + U(0, 1)) / 2^n_bits - 0.5,
so x is continuous in [-0.5, 0.5) and the loss is the discrete bits/dim of the quantised data,
    bits/dim = -(log p(x) - D log(n_bins)) / (D ln 2),  D = C*H*W.
Class-conditional models add weight_y * cross-entropy (bits) of the classifier head on the top latent.

The noise comes from a generator seeded by (seed, rank, step): a pure function of checkpointed
counters, so resume needs no RNG state and ranks draw different noise.

ActNorm's data-dependent init runs once, on the first batch, with its moments averaged over ranks
(the strategy's mean reduce), so every rank computes identical parameters; callers that can should
call ``init_actnorm`` themselves before DDP wraps the model. A model restored from a checkpoint has
its "initialised" buffers set and is never re-initialised.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from typing import Callable, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.glow import Glow, build_flow
from trainer.bench_profile import phase
from trainer.callbacks.ema import ema_beta, ema_update
from trainer.counters import HostCounters
from trainer.finite import DeviceStreaks, check_streaks, clear_skip_flag, device_check_possible, flag_step
from trainer.speed import SpeedSwitches, compile_modules, nhwc, optimizer_kwargs
from trainer.gan_module import CHECKPOINT_FORMAT, NonFiniteLossError, mix_seed, set_requires_grad

LN2 = math.log(2.0)

# Every key FlowModule and glow_from_config read, with CPU-friendly defaults. The run config (a plain
# dict) must have these sections; merge_config() fills the missing keys from here.
FLOW_DEFAULTS = {
    "flow": {
        "model": "glow", "levels": 2, "steps": 8, "hidden": 64, "coupling": "affine", "lu": True,
        "learn_top": True, "class_conditional": False, "weight_y": 0.01, "n_bits": 8,
        "optimizer": "adamax", "lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0,
        "warmup_images": 50_000, "checkpointing": False, "fused": True, "sample_temperature": 0.7,
    },
    "ema": {"enabled": False, "decay": 0.999, "start_iter": 0, "rampup_iters": 0},
    "trainer": {"seed": 0, "max_iters": 1000, "max_nonfinite": 20, "sample_grid": 64},
}


def merge_config(overrides: Optional[dict] = None, base: Optional[dict] = None) -> dict:
    """Deep copy of ``base`` (FLOW_DEFAULTS) with ``overrides`` merged in, section by section."""
    out = copy.deepcopy(base if base is not None else FLOW_DEFAULTS)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---- pure functions ------------------------------------------------------------------------------


def check_n_bits(n_bits: int) -> int:
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"flow.n_bits must be an integer in 1..8, got {n_bits!r}.")
    return n_bits


def dequantize(images: torch.Tensor, n_bits: int, noise: torch.Tensor) -> torch.Tensor:
    """uint8 images and U(0, 1) noise of the same shape -> continuous x in [-0.5, 0.5)."""
    q = (images.to(torch.int32) >> (8 - n_bits)).float()
    return (q + noise) / (2 ** n_bits) - 0.5


def bits_per_dim(log_prob: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """Discrete bits/dim from the continuous log-density of dequantised x (in fp32 or fp64).
    The -D log(n_bins) term is the log of the bin volume (1/n_bins)^D."""
    lp = log_prob.float() if log_prob.dtype in (torch.float16, torch.bfloat16) else log_prob
    return -(lp - n_dims * math.log(2 ** n_bits)) / (n_dims * LN2)


def classifier_bits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class head in bits, per example."""
    return F.cross_entropy(logits.float(), y, reduction="none") / LN2


def warmup_lr(base_lr: float, images_seen: int, warmup_images: int) -> float:
    """Linear warmup over the first ``warmup_images`` images (Adam diverges to NaN without it)."""
    if warmup_images <= 0:
        return base_lr
    return base_lr * min(1.0, images_seen / warmup_images)


def glow_from_config(cfg: dict, channels: int, resolution: int, num_classes: int = 0) -> Glow:
    f = cfg["flow"]
    conditional = f["class_conditional"] and num_classes > 0
    # The run config (trainer.config.FlowConfig) names the flow in model.name; FLOW_DEFAULTS in flow.model.
    name = f.get("model") or cfg["model"]["name"]
    return build_flow(name, channels=channels, resolution=resolution, levels=f["levels"],
                      steps=f["steps"], hidden=f["hidden"], coupling=f["coupling"], lu=f["lu"],
                      learn_top=f["learn_top"], num_classes=num_classes if conditional else 0,
                      classifier=conditional and f["weight_y"] > 0)


# ---- the module ----------------------------------------------------------------------------------


class FlowModule(HostCounters, SpeedSwitches, L.LightningModule):
    COUNTERS = ("iteration", "images_seen", "nonfinite_total")

    def __init__(self, glow: Glow, cfg: dict):
        super().__init__()
        self.glow = glow
        self.cfg = cfg
        f = cfg["flow"]
        self.n_bits = check_n_bits(f["n_bits"])
        glow.checkpointing = bool(f["checkpointing"])
        glow.set_fused(bool(f.get("fused", True)))  # configs saved before the key existed: the default
        self.glow_ema: Optional[Glow] = None
        if cfg["ema"]["enabled"]:
            self.glow_ema = copy.deepcopy(glow).eval()
            self.glow_ema.checkpointing = False
            set_requires_grad(self.glow_ema, False)
        # iteration = training steps (batches) taken, skipped non-finite ones included.
        self._init_counters()  # checkpointed buffers with a host mirror (trainer/counters.py)
        # Fixed standard-normal noise for sample grids that are comparable across training.
        g = torch.Generator().manual_seed(mix_seed(cfg["trainer"]["seed"], 0xF1CED))
        self.register_buffer("fixed_z", torch.randn(cfg["trainer"]["sample_grid"], glow.n_dims, generator=g))
        self._init_checked = False  # once per process: a host read of every ActNorm flag
        self._nonfinite_streak = 0
        self._device_streaks = DeviceStreaks()  # trainer.finite_check on the device (trainer/finite.py)
        self._stepped = False
        self.loss_hooks: list = []  # callables (module, x, y) -> extra loss, e.g. the knowledge callback's

    # The names GAN-era callbacks and data modules read (checkpoint cadence, sample grids, resume).
    @property
    def d_steps(self) -> torch.Tensor:
        """Batches consumed (ArrayDataModule/ShardDataModule resume from it)."""
        return self.iteration

    @property
    def g_stepped(self) -> bool:
        """Every flow training step ends an iteration (IterationCheckpoint, SampleGridCallback)."""
        return True

    @property
    def n_dims(self) -> int:
        return self.glow.n_dims

    # ---- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        f = self.cfg["flow"]
        kind = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}.get(f["optimizer"])
        if kind is None:
            raise ValueError(f"flow.optimizer must be adam or adamax, got '{f['optimizer']}'.")
        # Lightning calls this after moving the module to its device, so auto can pick fused on CUDA.
        impl = optimizer_kwargs(kind, f.get("optimizer_impl", "auto"), self.device,
                                deepspeed=self.cfg["trainer"].get("strategy") == "deepspeed")
        # lr is overwritten every step by the warmup schedule.
        return kind(self.glow.parameters(), lr=f["lr"], betas=tuple(f["betas"]), eps=f["eps"],
                    weight_decay=f["weight_decay"], **impl)

    def train_nets(self) -> dict:
        return {"glow": self.glow}

    def compile_networks(self, mode: str) -> None:
        """trainer.compile_scope=block: each flow step compiled on its own, the flow around them eager.
        Dynamo lifts a step's parameters into graph inputs instead of guarding on the module, so the
        steps of a level (same shapes) share one compiled graph and the flow compiles a few small
        graphs instead of one of all L*K steps (glow_cifar10: 96)."""
        if mode == "off" or self.cfg["trainer"].get("compile_scope", "model") == "model":
            return super().compile_networks(mode)
        step_fns = [list(compile_modules(dict(enumerate(level.steps)), mode).values()) for level in self.glow.levels]
        self._compiled = {"glow": functools.partial(self.glow, step_fns=step_fns)}
        self._compile_mode = mode

    def ema_nets(self) -> list:
        return [self.glow_ema] if self.glow_ema is not None else []

    def deepspeed_pairs(self):
        """The one (name, network, optimiser) engine of the multi-engine DeepSpeed strategy."""
        return [("flow", self.glow, self.optimizers(use_pl_optimizer=False))]

    def _world(self) -> int:
        return self.trainer.world_size if getattr(self, "_trainer", None) is not None else 1

    def _rank(self) -> int:
        return self.global_rank if getattr(self, "_trainer", None) is not None else 0

    # ---- data -----------------------------------------------------------------------------------
    def noise_generator(self, salt: int = 0) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.cfg["trainer"]["seed"], self._rank(), self.it, salt))
        return g

    def prep(self, images: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        noise = torch.rand(images.shape, generator=gen, device=self.device)
        return nhwc(dequantize(images, self.n_bits, noise), self.channels_last_on)

    def _hflip(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """data.hflip: each training image mirrored with probability 1/2, drawn from the step's generator
        (so a resume flips the same images); evaluation never flips."""
        if not self.cfg.get("data", {}).get("hflip"):
            return images
        images = images.to(self.device, non_blocking=True)
        flip = torch.rand(images.shape[0], device=self.device, generator=gen) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)

    def _labels(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        return labels.to(self.device, torch.long) if self.glow.num_classes else None

    # ---- ActNorm init ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_actnorm(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                     reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Data-dependent ActNorm init on dequantised x (moments averaged by reduce_fn across ranks);
        the EMA copy starts from the initialised flow rather than averaging towards the identity."""
        self.glow.initialize_actnorm(x, y, reduce_fn)
        if self.glow_ema is not None:
            self.glow_ema.load_state_dict(self.glow.state_dict())

    def init_from_batch(self, batch) -> None:
        """ActNorm's data-dependent init from this training batch ahead of its step, exactly as the step
        would do it (the same flips and noise from the step's generator; collective across ranks): an
        evaluation before the first step then sees the flow that training starts from."""
        images, labels = batch
        gen = self.noise_generator()
        self._ensure_init(self.prep(self._hflip(images, gen), gen), self._labels(labels))

    def _ensure_init(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        if self._init_checked:
            return
        self._init_checked = True
        if self.glow.actnorm_initialized():  # restored from a checkpoint, or initialised by the caller
            return
        strategy = self.trainer.strategy
        self.init_actnorm(x, y, reduce_fn=lambda t: strategy.reduce(t, reduce_op="mean"))

    # ---- training -------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, y: Optional[torch.Tensor], glow: Optional[Glow] = None) -> dict:
        """Per-example bits/dim and classifier bits (fp32; the flow keeps its own precision)."""
        logp, logits = (glow or self.fast("glow"))(x, y)
        out = {"bpd": bits_per_dim(logp, self.n_dims, self.n_bits)}
        if logits is not None:
            out["bits_y"] = classifier_bits(logits, y)
        return out

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: all ranks then skip (or step) together. The one
        host sync of a step, kept on purpose: the decision must be known before backward and the
        optimiser step run (a NaN must never reach the weights or Adam's moments), and a streak of
        trainer.max_nonfinite must stop the run at the step that completes it."""
        bad = (~torch.isfinite(loss.detach())).float()
        bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return float(bad) == 0.0

    _NONFINITE_ADVICE = ("Those steps were skipped and the run stopped; the last checkpoint is intact. Lower "
                         "flow.lr, lengthen flow.warmup_images, use trainer.precision=32, or raise "
                         "trainer.max_nonfinite.")

    def _skip_nonfinite(self) -> None:
        self.add_count("nonfinite_total", 1)
        self._nonfinite_streak += 1
        limit = self.cfg["trainer"]["max_nonfinite"]
        if self._nonfinite_streak >= limit:
            raise NonFiniteLossError(
                f"The flow loss was non-finite for {self._nonfinite_streak} consecutive steps (step "
                f"{self.it}, {self.count('nonfinite_total')} skipped in all). {self._NONFINITE_ADVICE}")

    def training_step(self, batch, batch_idx):
        images, labels = batch
        f = self.cfg["flow"]
        gen = self.noise_generator()
        x = self.prep(self._hflip(images, gen), gen)
        y = self._labels(labels)
        self._ensure_init(x, y)
        ensure = getattr(self.trainer.strategy, "ensure_engines", None)
        if ensure is not None:
            ensure(self)  # DeepSpeed: engines built after ActNorm's data-dependent init
        seen_after = self.seen + x.shape[0] * self._world()
        lr = warmup_lr(f["lr"], seen_after, f["warmup_images"])
        opt = self.optimizers()
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        self.new_phase()
        with phase("flow forward"):
            terms = self.losses(x, y)
        loss = terms["bpd"].mean()
        if "bits_y" in terms:
            loss = loss + f["weight_y"] * terms["bits_y"].mean()
        for hook in self.loss_hooks:
            loss = loss + hook(self, x, y)
        self.add_count("iteration", 1)
        self.add_count("images_seen", x.shape[0] * self._world())
        if device_check_possible(self, opt):
            # fused Adam skips its own update when the flag is set (trainer/finite.py): no host sync. The
            # optimiser reads the flag after this closure; optimizer_step clears it.
            flag_step(self, opt, "flow", loss)
            self._stepped = True
            if self.it % self.cfg["trainer"].get("log_every", 1) == 0:
                check_streaks(self, "step", self._NONFINITE_ADVICE)
        else:
            self._stepped = self._all_finite(loss)
            if not self._stepped:
                self._skip_nonfinite()
                return None  # no backward, no optimiser step: the NaN never reaches the weights
            self._nonfinite_streak = 0
        logged = {"train/bpd": terms["bpd"].mean().detach()}
        if "bits_y" in terms:
            logged["train/bits_y"] = terms["bits_y"].mean().detach()
        # The device tensors stay in callback_metrics for checkpoint ranking (no host copy per step);
        # the loggers get rows keyed by iteration, with the host scalars added there.
        self.log_dict(logged, prog_bar=False, logger=False, on_step=True, on_epoch=False)
        self._log_rows({**logged, "train/lr": lr})
        if self.it >= self.cfg["trainer"]["max_iters"]:
            self.trainer.should_stop = True
        return loss

    def _log_rows(self, logged: dict) -> None:
        """Every trainer.log_every iterations (and the first), rank-averaged, straight to the loggers
        keyed by iteration like GANModule (Lightning's step would not count skipped steps)."""
        it = self.it
        every = self.cfg["trainer"].get("log_every", 1)
        if not self.trainer.loggers or (it % every and it != 1):
            return
        # read here, on logging steps only: under a device-side finite check the count lives on the device
        logged = {**logged, "train/nonfinite_skipped": float(self.count("nonfinite_total"))}
        keys = list(logged)
        vals = torch.stack([torch.as_tensor(logged[k], dtype=torch.float32, device=self.device) for k in keys])
        vals = self.trainer.strategy.reduce(vals, reduce_op="mean")
        row = {k: float(v) for k, v in zip(keys, vals.tolist())}
        row.update({"iteration": float(it), "progress/kimg": self.seen / 1000.0,
                    "perf/img_per_s": self._throughput()})
        self.last_logged = row  # the progress bar shows it
        if self.trainer.is_global_zero:
            for lg in self.loggers:
                lg.log_metrics(row, step=it)

    def _throughput(self) -> float:
        """Images/s (all ranks) since the previous logged row; 0 for the first."""
        now, seen = time.perf_counter(), self.seen
        last = getattr(self, "_perf_last", None)
        self._perf_last = (now, seen)
        return (seen - last[1]) / max(now - last[0], 1e-9) if last else 0.0

    def optimizer_step(self, *args, **kwargs) -> None:
        """The EMA update right after the optimiser step: callbacks' on_train_batch_end hooks run before
        the module's, so an update there would come after that step's checkpoint and sample grid (a
        resume from that checkpoint would then miss one update)."""
        try:
            with phase("flow update"):  # the step's closure (forward, backward) runs inside: its own parts
                super().optimizer_step(*args, **kwargs)
        finally:
            clear_skip_flag(self.optimizers())  # the device-side skip flag training_step may have set
        with phase("EMA"):
            self._update_ema()

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with phase("flow backward"):
            super().backward(loss, *args, **kwargs)

    def _update_ema(self) -> None:
        if self.glow_ema is None or not self._stepped:
            return
        e = self.cfg["ema"]
        # `iteration` already counts this step; the schedule uses the step's own index.
        ema_update(self.glow_ema, self.glow, ema_beta(self.it - 1, e["decay"], e["start_iter"],
                                                      e["rampup_iters"]))

    # ---- evaluation and sampling ----------------------------------------------------------------
    def eval_net(self, use_ema: bool = True) -> Glow:
        return self.glow_ema if (use_ema and self.glow_ema is not None) else self.glow

    @torch.no_grad()
    def evaluate_bpd(self, images: torch.Tensor, labels: torch.Tensor, use_ema: bool = True,
                     batch_size: int = 256, seed: int = 0) -> float:
        """Mean bits/dim over the images, with fresh dequantisation noise per image (seeded)."""
        net = self.eval_net(use_ema)
        g = torch.Generator(device=self.device).manual_seed(seed)
        total = 0.0
        for i in range(0, len(images), batch_size):
            x = self.prep(images[i:i + batch_size], g)
            total += float(self.losses(x, self._labels(labels[i:i + batch_size]), net)["bpd"].sum())
        return total / len(images)

    @torch.no_grad()
    def sample_images(self, n: int, temperature: float = 1.0, y: Optional[torch.Tensor] = None,
                      use_ema: bool = True, generator: Optional[torch.Generator] = None,
                      eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Samples as images in [-1, 1] (the convention of GANModule.generate). A class-conditional
        model without y cycles through the classes."""
        if y is None and self.glow.num_classes:
            y = torch.arange(n, device=self.device) % self.glow.num_classes
        x = self.eval_net(use_ema).sample(n, temperature, y, generator, eps)
        return (2.0 * x.float()).clamp(-1, 1)  # x in [-0.5, 0.5) -> [-1, 1)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
        """GANModule's interface for sample grids: images from (N, D) standard-normal noise ``z``
        (e.g. ``fixed_z``) at flow.sample_temperature."""
        return self.sample_images(len(z), self.cfg["flow"]["sample_temperature"], use_ema=use_ema,
                                  eps=z.to(self.device))

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["genscale"] = {
            "format": CHECKPOINT_FORMAT,
            "kind": "flow",
            "config": self.cfg,
            "iteration": self.it,
            "images_seen": self.seen,
            # the data position and per-rank noise depend on it: a resume must match it
            "world_size": int(self.trainer.world_size) if getattr(self, "_trainer", None) is not None else 1,
        }
