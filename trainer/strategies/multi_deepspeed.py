"""DeepSpeed for modules with several networks: one DeepSpeed engine per (network, optimiser) pair.

Lightning's own DeepSpeedStrategy refuses more than one optimiser (and CPUs), so a GAN cannot use it.
``MultiEngineDeepSpeedStrategy`` keeps Lightning's DDP process launch and process group (gloo on
CPU, NCCL on GPUs) and, instead of wrapping the LightningModule, builds one ``deepspeed.initialize``
engine per pair that the module names (``deepspeed_pairs()``: G and D for a GAN, the flow for Glow).

* Engines are built lazily, at the start of the first training step (``ensure_engines``): after a
  resume has loaded the weights and after Glow's data-dependent ActNorm init, because ZeRO copies the
  parameters into its own fp32 partitions when it is built, and in-place changes made after that
  would be overwritten by the next step.
* Accumulation is the module's: DeepSpeed runs with ``managed_gradient_accumulation=False``, so each
  ``engine.backward`` only adds to the local gradients (ZeRO-2 partitions them as it goes) and the
  one ``engine.step()`` per phase reduces and updates. The caller has already divided the loss by
  the number of micro-batches.
* Phases freeze the other network's ``requires_grad`` (the module does), so a backward never reaches
  an engine that is not being stepped (ZeRO-2 fails with "gradient computed twice" otherwise).
* Precision: ``32`` trains fp32 engines. ``bf16-mixed`` runs the forward under torch autocast with fp32
  weights in the engines (master weights, gradients and Adam moments fp32; ZeRO partitions the
  moments, and the gradients at stage 2), so fp32 pieces such as the gradient penalty keep working.
  ``16-mixed`` uses DeepSpeed's fp16 engines: fp16 weights, fp32 master partitions and one dynamic
  loss scaler per engine (so one per network), plus autocast for the forward.
* A non-finite loss on any rank skips the phase on every rank: ZeRO >= 1 sees the NaN in the reduced
  gradients and skips by itself; stage 0 drops the local gradients without stepping.
* Checkpoints: every rank writes its ZeRO partitions with ``engine.save_checkpoint`` into
  ``<name>.ckpt.ds/<engine>/``; then rank 0 writes the plain ``<name>.ckpt`` atomically, with fp32
  weights that ``genscale sample`` and ``eval`` read directly (the export) and a pointer to the
  DeepSpeed directory. The plain file is the commit marker: a run killed while the partitions were
  being written has no new plain file, so ``resume=auto`` takes the previous complete checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry

from trainer.strategies.gan_ddp import GANDDPStrategy

STRATEGY_NAME = "deepspeed_multi"
STAGES = (0, 1, 2)


def ds_config(stage: int, precision: str, micro_batch: int, bucket_mb: float = 50.0) -> dict:
    """The DeepSpeed config of one engine. Accumulation and clipping are the module's business."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage} is not supported; valid stages: {', '.join(map(str, STAGES))} "
                         "(stage 3 would need gathered parameters for EMA, spectral norm and ActNorm).")
    bucket = int(bucket_mb * 2 ** 20)
    cfg = {
        "train_micro_batch_size_per_gpu": max(1, int(micro_batch)),
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # RMSprop (WGAN), Adamax (Glow)
        "zero_optimization": {"stage": stage},
    }
    if stage > 0:
        cfg["zero_optimization"].update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                         "overlap_comm": False, "contiguous_gradients": True})
    if precision == "16-mixed":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def _batchnorm_to_half(net: nn.Module) -> None:
    """DeepSpeed's fp16 engines cast the parameters but leave BatchNorm's running statistics fp32,
    and torch's batch norm refuses fp16 inputs with fp32 statistics when it has no fp32 affine
    weight to go with them ("Expected running_mean to have type Half"): keep BatchNorm all fp16."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.half()


class MultiEngineDeepSpeedStrategy(GANDDPStrategy):
    strategy_name = STRATEGY_NAME

    def __init__(self, *args, stage: int = 2, micro_batch: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if stage not in STAGES:
            raise ValueError(f"trainer.zero_stage must be one of {', '.join(map(str, STAGES))}, got {stage}.")
        self.stage, self.micro_batch = stage, micro_batch
        self.engines: Dict[str, Any] = {}  # pair name -> DeepSpeedEngine
        self._by_net: Dict[int, Any] = {}  # id(network) -> engine
        self._by_opt: Dict[int, Any] = {}  # id(torch optimiser) -> engine
        self._pending_load: Optional[Tuple[Path, dict]] = None
        self.overflow_skips = 0

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        super().setup(trainer)
        # The engines do loss scaling (fp16) themselves; Lightning's plugin only provides autocast.
        if isinstance(self.precision_plugin, MixedPrecision):
            self.precision_plugin.scaler = None

    @property
    def precision_name(self) -> str:
        return str(getattr(self.precision_plugin, "precision", "32"))

    def ensure_engines(self, module) -> None:
        """Builds the engines (collective: every rank calls it at the same step), then loads a pending
        DeepSpeed checkpoint into them."""
        if self.engines:
            return
        import deepspeed
        import deepspeed.ops

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes of C++ build on a
        # fresh machine) that only its inference kernels use; training collectives go through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=self._get_process_group_backend(), auto_mpi_discovery=False,
                                   verbose=False)
        for name, net, opt in module.deepspeed_pairs():
            engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, dist_init_required=False,
                                                   config=ds_config(self.stage, self.precision_name,
                                                                    self.micro_batch))
            if self.precision_name == "16-mixed":
                _batchnorm_to_half(net)
            self.engines[name] = engine
            self._by_net[id(net)] = engine
            self._by_opt[id(opt)] = engine
        if self._pending_load is not None:
            self._load_engines(*self._pending_load)
            self._pending_load = None

    def engine_for(self, net: nn.Module):
        engine = self._by_net.get(id(net))
        if engine is None:
            raise RuntimeError("No DeepSpeed engine for this network: call ensure_engines at the start of the step.")
        return engine

    # ---- per-phase hooks used by the modules --------------------------------------------------------
    def engine_backward(self, net: nn.Module, loss: torch.Tensor) -> None:
        # The module divided by its micro-batch count already: no second scaling by DeepSpeed.
        self.engine_for(net).backward(loss, scale_wrt_gas=False)

    @torch.no_grad()
    def all_reduce_grads(self, module: nn.Module, finite: bool = True) -> bool:
        """DeepSpeed reduces the gradients itself (in engine.step); only the finite flag is shared."""
        return self.all_finite(finite)

    def engine_step(self, net: nn.Module) -> bool:
        """One optimiser step of ``net``'s engine; False when DeepSpeed skipped it (fp16 overflow)."""
        engine = self.engine_for(net)
        engine.step()
        applied = bool(engine.was_step_applied())
        if not applied:
            self.overflow_skips += 1
        return applied

    def discard_grads(self, net: nn.Module) -> None:
        """A non-finite loss somewhere: no update on any rank. ZeRO >= 1 reduces the NaN gradients
        and its own overflow check skips the step (and clears its buffers); stage 0 drops them."""
        engine = self.engine_for(net)
        if self.stage > 0:
            engine.step()
            if engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied a step whose loss was non-finite on some rank.")
        else:
            engine.zero_grad()

    # ---- automatic optimisation (Glow) --------------------------------------------------------------
    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        engine = self._by_opt.get(id(getattr(optimizer, "_optimizer", optimizer)))
        if engine is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        engine.backward(closure_loss, scale_wrt_gas=False)
        return closure_loss

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        torch_opt = getattr(optimizer, "_optimizer", optimizer)
        result = closure()  # training_step (which builds the engines on the first step) and backward
        engine = self._by_opt.get(id(torch_opt))
        if engine is None:
            raise RuntimeError("The module did not build its DeepSpeed engines in training_step.")
        if result is None:  # the module skipped the step (non-finite loss on some rank): no backward ran
            return None
        engine.step()
        if not engine.was_step_applied():
            self.overflow_skips += 1
        return result

    # ---- checkpoints --------------------------------------------------------------------------------
    def optimizer_state(self, optimizer) -> dict:
        # The optimiser state is partitioned across ranks: it lives in the DeepSpeed directory.
        return {}

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self.engines:  # before the first step (nothing trained yet): a plain checkpoint
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(filepath)
        ds_dir = path.with_name(path.name + ".ds")
        if self.is_global_zero and ds_dir.exists():
            shutil.rmtree(ds_dir)  # leftovers of a run killed before its plain file was written
        self.barrier("deepspeed_multi.save.clean")
        for name, engine in self.engines.items():  # collective: each rank writes its partitions
            engine.save_checkpoint(str(ds_dir), tag=name, client_state={}, save_latest=False)
        self.barrier("deepspeed_multi.save.partitions")
        checkpoint.setdefault("genscale", {})["deepspeed"] = {
            "dir": ds_dir.name, "engines": list(self.engines), "stage": self.stage,
            "precision": self.precision_name, "world_size": self.world_size}
        checkpoint["optimizer_states"] = []
        # The export: fp32 weights that sample/eval (and a non-DeepSpeed run's weights) read directly.
        checkpoint["state_dict"] = {k: (v.float() if torch.is_floating_point(v) else v)
                                    for k, v in checkpoint["state_dict"].items()}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        info = checkpoint.get("genscale", {}).get("deepspeed")
        if info is None:  # saved before the first step (no engines yet): nothing to restore;
            return        # a trained non-DeepSpeed checkpoint was already refused by prepare_run
        ckpt_path = Path(self.lightning_module.trainer.ckpt_path)
        self._pending_load = (ckpt_path.parent / info["dir"], info)

    def _load_engines(self, ds_dir: Path, info: dict) -> None:
        if not ds_dir.is_dir():
            raise FileNotFoundError(f"DeepSpeed state '{ds_dir}' is missing: the plain checkpoint beside it "
                                    "holds the weights only (enough for sample and eval), not the partitioned "
                                    "optimiser state an exact resume needs. Restore the directory.")
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(ds_dir), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load engine '{name}' from '{ds_dir}'.")

    def teardown(self) -> None:
        self.engines.clear()
        self._by_net.clear()
        self._by_opt.clear()
        super().teardown()


def register() -> None:
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(STRATEGY_NAME, MultiEngineDeepSpeedStrategy, description=(
            "DeepSpeed with one engine per (network, optimiser): GANs (G and D) and flows, ZeRO 0/1/2, CPU or GPU"))


register()
