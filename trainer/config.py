"""Typed configuration: dataclass schemas, strict loading and validation.

A run's config is built from three layers, later ones winning:
  1. the dataclass defaults below (each field carries its own doc string),
  2. an experiment file ``configs/experiment/<name>.yaml`` (which may ``extends:`` another one),
  3. ``key=value`` overrides from the command line (OmegaConf dotlist syntax).
Every layer is merged into the structured schema on its own, so an unknown key or a wrongly typed
value is reported with the layer (file or argument) it came from and the closest valid keys.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"  # the configs package
EXPERIMENT_DIR = CONFIG_ROOT / "experiment"
DEFAULT_EXPERIMENT = "wgan_gp_mnist5k"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and how."""


def f(default: Any, doc: str):
    """A dataclass field with a default and a doc string (shown by ``genscale train --help-config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def sub(cls, doc: str):
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class CheckpointConfig:
    every_n_iters: int = f(500, "Save a checkpoint every N generator iterations (0: off).")
    every_n_minutes: float = f(0.0, "Also save every this many minutes of wall time (0: off).")
    save_top_k: int = f(3, "Keep this many checkpoints besides last.ckpt: the best k by `monitor`, "
                           "or the newest k when no monitor value was logged; the newest is kept as well.")
    monitor: str = f("", "Metric that ranks checkpoints (lower is better), e.g. 'eval/fid'. Empty: newest.")


@dataclass
class TrainerConfig:
    max_iters: int = f(2000, "Generator iterations to train (one iteration = n_critic D steps + one G step).")
    accelerator: str = f("auto", "Lightning accelerator: auto, cpu, gpu.")
    devices: str = f("auto", "Lightning devices: 'auto', a count such as '2', or a list such as '[0,1]'.")
    num_nodes: int = f(1, "Number of nodes.")
    strategy: str = f("auto", "Lightning strategy: auto (gan_ddp when more than one process), gan_ddp "
                              "(DDP without a DDP wrapper: G and D gradients averaged per phase), deepspeed "
                              "(one DeepSpeed engine per network, ZeRO stage trainer.zero_stage; GANs and "
                              "flows, CPU with gloo or GPUs with NCCL), or another Lightning strategy name "
                              "such as ddp_find_unused_parameters_true.")
    zero_stage: int = f(2, "trainer.strategy=deepspeed: ZeRO stage 0 (data parallel), 1 (optimiser states "
                           "partitioned) or 2 (optimiser states and gradients partitioned).")
    dist_timeout_s: float = f(1800.0, "Multi-process runs: seconds to wait for the other processes (joining "
                                      "the process group, each collective) before failing with an error.")
    precision: str = f("32", "Numerical precision: 32, bf16-mixed or 16-mixed.")
    seed: int = f(0, "Global seed; each rank seeds itself with seed + rank.")
    cpu_threads: int = f(0, "torch intra-op CPU threads (0: torch's default). On small shared-core "
                            "machines 1 can be many times faster than oversubscribed threads.")
    deterministic: bool = f(False, "Ask torch for deterministic algorithms (needed for bit-exact resume).")
    log_every: int = f(10, "Log scalar metrics every N iterations.")
    sample_every: int = f(250, "Write a fixed-latent sample grid every N iterations (0: only at the end).")
    sample_grid: int = f(64, "Number of images in the sample grid (a square number looks best).")
    preemption: bool = f(True, "On SIGUSR1/SIGTERM: checkpoint at the end of the current step, requeue the "
                               "SLURM job (if any) and stop; a requeued job resumes with resume=auto. Ctrl-C "
                               "(SIGINT): the same stop without a requeue; a second Ctrl-C aborts.")
    max_nonfinite: int = f(20, "Stop the run after this many consecutive steps with a non-finite loss.")
    finite_check: str = f("auto", "Where the per-step check that the loss is finite is decided. auto: on "
                                  "the device when the optimiser is fused, e.g. Adam on CUDA (a non-finite step is skipped inside "
                                  "the fused update, as GradScaler's found_inf does, with no host sync; a streak "
                                  "of trainer.max_nonfinite is then noticed at the next trainer.log_every "
                                  "iteration), else on the host. host: always on the host (one sync per "
                                  "optimiser phase; a streak stops the run at the step that completes it).")
    progress_bar: bool = f(True, "Show a progress bar with images/s and kimg.")
    channels_last: bool = f(False, "Keep G and D (or the flow), their optimiser state and the real images in "
                                   "channels_last (NHWC) memory, the layout tensor-core GPU convolutions use "
                                   "natively; same results. Off by default (launch/bench_gpu.sh measures it per "
                                   "card); not with trainer.strategy=deepspeed, whose flat parameter buffers need "
                                   "contiguous weights.")
    cudnn_benchmark: bool = f(True, "Let cuDNN time its convolution algorithms for each new shape and keep the "
                                    "fastest (torch.backends.cudnn.benchmark; CUDA only, no effect on CPUs). "
                                    "Turned off by trainer.deterministic=true, since the chosen algorithms may vary.")
    compile: str = f("off", "torch.compile G and D (or the flow) at the start of training with this mode: off, "
                            "default, reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs. "
                            "The gradient penalty is compiled as a graph of its own (D's forward, its input gradient "
                            "and the norm), whose backward is the double backward. Not with "
                            "trainer.strategy=deepspeed. The first steps are slow (compilation).")
    compile_scope: str = f("model", "What one torch.compile graph covers: model (the whole network: fusion across "
                                    "its layers, the longest compile) or block (flows only: each flow step on its own; "
                                    "the steps of a level share shapes, so one level's compiled code serves all its "
                                    "steps: compile time of about one step per level instead of the whole flow, at "
                                    "the cost of fusion across steps and, under reduce-overhead, one CUDA-graph "
                                    "replay per step).")
    checkpoint: CheckpointConfig = sub(CheckpointConfig, "When and how many checkpoints are written.")


@dataclass
class DataConfig:
    name: str = f("mnist5k", "Dataset: mnist5k, digits (built in), npz (arrays at `path`) or shards "
                             "(webdataset shards at `path`, written by `genscale data write`).")
    path: str = f("", "Data location for file-backed datasets (npz: a .npz with 'images' and optional 'labels'; "
                      "shards: a shard directory with index.json, or a URL pattern such as "
                      "/data/train-{000000..000099}.tar or https://host/train-{0..9}.tar).")
    resolution: int = f(32, "Images are resized to resolution x resolution.")
    batch_size: int = f(64, "Global batch size per D step, divided evenly across ranks.")
    val_fraction: float = f(0.1, "Fraction held out (fixed split, seed 1234) for evaluation.")
    num_workers: int = f(0, "DataLoader worker processes (in-memory data needs none).")
    hflip: bool = f(False, "Random horizontal flips of real images (off for digits).")
    mode: str = f("resampled", "Shards: 'resampled' (shards drawn with replacement, a fixed number of batches "
                               "per rank and epoch: safe with uneven shards) or 'exact' (each epoch deals the shards "
                               "to ranks and workers: disjoint samples, needs >= ranks x workers shards).")
    shuffle_buffer: int = f(1000, "Shards: samples held (as undecoded bytes) in each worker's shuffle buffer.")
    epoch_batches: int = f(0, "Shards, resampled mode: batches per rank per epoch (0: about one pass over the "
                              "train split, from index.json).")
    allow_pipe: bool = f(False, "Shards: allow `pipe:` URLs in data.path. They run shell commands, so enable "
                                "only for configs you trust.")


@dataclass
class ModelConfig:
    name: str = f("dcgan", "Architecture from the model registry (`genscale list models`).")
    z_dim: int = f(100, "Latent dimension.")
    g_width: int = f(64, "Generator width: channels of its last hidden layer.")
    d_width: int = f(64, "Discriminator width: channels of its first hidden layer.")
    d_norm: str = f("batch", "Normalisation in D: batch, layer or none (WGAN-GP must not use batch).")
    g_norm: str = f("batch", "Normalisation in G: batch or none.")
    num_classes: int = f(0, "Classes the model is built for; 0: the dataset's class count. A non-zero value "
                            "that differs from the dataset's stops the run at start (a run records the "
                            "resolved count, so a resume on other data is refused too).")
    class_conditional: bool = f(True, "Class-conditional models (biggan): condition G and D on labels when "
                                      "the data has classes (False: unconditional).")
    attention_res: int = f(64, "biggan: resolution whose G and D blocks are followed by self-attention (0: none).")
    attention_impl: str = f("matmul", "biggan: self-attention as explicit matmuls and softmax (matmul, as the "
                                      "reference) or one fused F.scaled_dot_product_attention (sdpa), which "
                                      "never materialises the (hw x hw/4) attention map.")
    shared_dim: int = f(128, "biggan: dimension of G's shared class embedding.")
    sn_eps: float = f(1e-6, "biggan: epsilon of the spectral-norm power iteration's normalisations.")


@dataclass
class PGANConfig:
    """Progressive GAN growing (model.name=pgan); trainer/pgan_schedule.py defines the schedule."""
    start_resolution: int = f(4, "Resolution trained first (a power of two >= 4).")
    final_resolution: int = f(0, "Resolution grown to (0: data.resolution; otherwise it must equal it).")
    fade_images: List[int] = f([600_000], "Real images of each fade-in (alpha 0 -> 1), one per resolution after "
                                          "the first, or one value for all (the paper: 800k; its code: 600k).")
    stable_images: List[int] = f([600_000], "Real images of each stabilisation phase, one per resolution or one "
                                            "value for all; the final resolution trains on until max_iters.")
    batch_sizes: List[int] = f([], "Global batch per resolution, one per resolution ([]: data.batch_size for all).")
    reset_optimizer: bool = f(True, "Reset both optimisers' state (Adam moments) when a layer is added.")
    fmap_base: int = f(8192, "Feature maps at stage s (resolution 2^(s+1)) are min(fmap_base / 2^s, fmap_max).")
    fmap_max: int = f(512, "Upper bound on the feature maps of any layer.")
    mbstd_group: int = f(4, "Group size of D's minibatch standard-deviation layer.")
    fused_scale: bool = f(True, "Resampling folded into the next convolution, as the official code's default: G's "
                                "upsample + 3x3 conv as one transposed conv (same function), D's 3x3 conv + 2x2 "
                                "average pool as one strided conv with the leaky ReLU after the pool. About a "
                                "third fewer FLOPs; false: separate ops, D activating before the pool.")


@dataclass
class LossConfig:
    name: str = f("nonsaturating", "GAN objective: nonsaturating, hinge, wgan (weight clipping) or wgan_gp.")
    gp_weight: float = f(10.0, "Gradient-penalty weight lambda (wgan_gp).")
    gp_autocast: bool = f(False, "wgan_gp under trainer.precision=bf16-mixed: run the penalty's critic (forward and "
                                 "input gradient) in bf16 autocast, as a step wrapped whole in autocast does, "
                                 "instead of fp32; the norm stays fp32. Not with 16-mixed (the unscaled inner gradient "
                                 "would underflow).")
    clip: float = f(0.01, "Critic weight-clipping bound c (wgan): parameters kept in [-c, c].")
    drift: float = f(0.0, "Drift penalty epsilon * mean(D(x)^2) (Progressive GAN uses 0.001).")
    ortho_reg: float = f(0.0, "BigGAN's modified orthogonal regularisation beta * ||W W^T * (1 - I)||_F^2 on "
                              "G's weights (embeddings excluded), added in each G step (BigGAN: 1e-4; 0: off).")


@dataclass
class OptimizerConfig:
    name: str = f("adam", "adam or rmsprop.")
    lr: float = f(2e-4, "Learning rate.")
    betas: List[float] = f([0.5, 0.999], "Adam betas.")
    eps: float = f(1e-8, "Epsilon.")
    weight_decay: float = f(0.0, "Weight decay.")
    impl: str = f("auto", "Optimiser kernels: auto (fused on CUDA where torch has a fused version of the "
                          "optimiser and the strategy is not deepspeed, else foreach), fused (one kernel for all "
                          "parameters; Adam only), foreach (a few batched kernels) or plain (a loop over "
                          "parameters). The same update, up to rounding.")


@dataclass
class OptimConfig:
    g: OptimizerConfig = sub(OptimizerConfig, "Generator optimiser.")
    d: OptimizerConfig = sub(OptimizerConfig, "Discriminator (critic) optimiser.")
    n_critic: int = f(1, "D steps per G step.")
    critic_boost_steps: int = f(0, "WGAN: D steps in boosted iterations (100 in the paper; 0: off).")
    critic_boost_first: int = f(25, "WGAN: the first this-many G iterations are boosted.")
    critic_boost_every: int = f(500, "WGAN: every this-many-th G iteration is boosted.")
    accumulate: int = f(1, "Split each batch into this many micro-batches whose gradients are summed.")


@dataclass
class EMAConfig:
    enabled: bool = f(True, "Keep an exponential moving average G_ema of the generator.")
    decay: float = f(0.999, "EMA decay beta: p_ema = beta * p_ema + (1 - beta) * p.")
    start_iter: int = f(0, "Before this G iteration G_ema is a plain copy of G.")
    rampup_iters: int = f(0, "After start, beta ramps linearly from 0 to decay over this many iterations.")


@dataclass
class FlowConfig:
    """Normalising flows (model.name=glow); the names are those trainer.flow_module.FLOW_DEFAULTS reads."""
    levels: int = f(2, "Glow levels L: each squeezes 2x2 (data.resolution must be divisible by 2^L) and all "
                       "but the last factor out half the channels.")
    steps: int = f(8, "Flow steps K per level (ActNorm -> invertible 1x1 conv -> coupling).")
    hidden: int = f(64, "Hidden channels of each coupling network (512 in the paper).")
    coupling: str = f("affine", "Coupling layer: affine (sigmoid scale) or additive (volume preserving).")
    lu: bool = f(True, "LU-decomposed invertible 1x1 convolutions (False: plain weight, slogdet in float64).")
    learn_top: bool = f(True, "Learn the top prior's mean and log-scale (zero-initialised conv).")
    class_conditional: bool = f(False, "Condition the top prior on the class label (needs labelled data).")
    weight_y: float = f(0.01, "Class-conditional: weight of the classifier head's cross-entropy (bits) "
                              "in the loss (0: no classifier head).")
    n_bits: int = f(8, "Quantise images to this many bits (1..8) before uniform dequantisation; bits/dim "
                       "at different n_bits are not comparable.")
    optimizer: str = f("adamax", "adam or adamax (the authors' code uses Adamax).")
    lr: float = f(1e-3, "Learning rate after warmup.")
    betas: List[float] = f([0.9, 0.99], "Adam/Adamax betas.")
    eps: float = f(1e-8, "Optimiser epsilon.")
    weight_decay: float = f(0.0, "Weight decay.")
    optimizer_impl: str = f("auto", "Optimiser kernels, as optim.g.impl: auto, fused (Adam only), foreach or plain.")
    warmup_images: int = f(50_000, "Linear lr warmup over this many training images (0: none).")
    checkpointing: bool = f(False, "Gradient checkpointing per flow step (less memory, about 30% slower).")
    fused: bool = f(True, "Fold each ActNorm into the convolution next to it and the zero convs' output "
                          "scales into their weights: the same function and gradients with half the "
                          "activation memory in fp32 and fewer kernels (false: separate layers, the "
                          "paper code's arithmetic).")
    sample_temperature: float = f(0.7, "Temperature of sample grids and the default of "
                                       "`genscale sample --temperature` (scales every prior's std).")


@dataclass
class LoggingConfig:
    root: str = f("runs", "Runs go to <root>/<experiment>/<run_id>/.")
    run_id: str = f("", "Run id; empty: $SLURM_JOB_ID if set, else a timestamp.")
    wandb: bool = f(True, "Log to Weights & Biases.")
    wandb_mode: str = f("offline", "offline (upload later with `genscale sync RUN_DIR`) or online (also chosen by "
                                   "WANDB_MODE=online; needs an API key and a reachable server, else the run "
                                   "logs offline with a warning). WANDB_MODE=disabled turns W&B off.")
    wandb_project: str = f("genscale", "W&B project name.")
    wandb_id: str = f("", "W&B run id; empty: <experiment>-<run_id>, so a resumed or requeued run continues "
                          "the same W&B run.")
    wandb_entity: str = f("", "W&B entity (user or team); empty: your default entity.")
    wandb_group: str = f("", "W&B group; empty: the experiment name (runs of one experiment, e.g. a sweep's "
                             "trials, group together).")
    wandb_tags: List[str] = f([], "W&B tags, e.g. [baseline,lr-sweep].")
    flow_temperatures: List[float] = f([0.5, 1.0], "Flows: besides each sample grid (at flow.sample_temperature), "
                                                   "grids at these temperatures from the same noise, in "
                                                   "samples/temperatures/ and on W&B ([]: none).")
    wandb_log_checkpoints: bool = f(True, "Online runs: upload each checkpoint as a W&B model artifact "
                                          "(offline runs never do: the checkpoints are in the run directory).")


@dataclass
class EvalConfig:
    num_samples: int = f(2000, "Generated samples compared against the held-out split (flows: held-out images "
                               "whose bits/dim are averaged, capped by the split's size).")
    every_n_iters: int = f(0, "Also evaluate FID/KID (flows: held-out bits/dim on num_samples val images) during "
                              "training every N iterations (0: off); logged as eval/fid, eval/kid (flows: "
                              "eval/bpd) and appended to eval.jsonl.")
    at_start: bool = f(False, "With every_n_iters: also evaluate before the first step (the untrained value).")
    features: str = f("auto", "Feature network: 'auto' (domain classifier for digit data, Inception "
                              "otherwise), 'domain', or 'inception'.")
    features_dir: str = f("runs/features", "Where trained domain-classifier feature networks are kept.")
    use_ema: bool = f(True, "Evaluate G_ema (False: the raw generator).")
    kid_subsets: int = f(50, "KID: number of random subsets.")
    kid_subset_size: int = f(500, "KID: size of each subset (capped by the sample count).")
    bn_mode: str = f("eval", "BatchNorm statistics of the evaluated G: 'eval' (its running statistics) or "
                             "'standing' (reset and re-accumulated over standing_batches sampled batches, on a "
                             "copy); recorded with every metric.")
    standing_batches: int = f(16, "bn_mode=standing: sampled batches (of 250) whose statistics are averaged.")
    truncation: float = f(0.0, "Latent truncation threshold T of evaluation (entries with |z| > T resampled; "
                               "0: none); recorded with every metric.")


@dataclass
class KnowledgeConfig:
    """Knowledge constraints (posterior regularisation, Hu et al. 2016/2018): docs/knowledge_constraints.md."""
    enabled: bool = f(False, "Build a teacher q proportional to p exp(lambda f) at every step: GANs get the reverse-KL "
                             "generator term -alpha lambda mean f(G(z)), flows the importance-weighted likelihood "
                             "term. Off: runs are unchanged.")
    constraint: str = f("class_consistency", "The constraint f(x): class_consistency (log-probability of the "
                                             "requested class under a classifier trained on the train split; "
                                             "class-conditional models) or symmetry (left-right mirror agreement).")
    learned: bool = f(False, "Update f's parameters phi by the max-ent IRL step on real versus generated images, "
                             "with its own AdamW optimiser (class_consistency only).")
    lam: float = f(1.0, "lambda: the teacher's weight on the constraint (0: the plain objective exactly).")
    alpha: float = f(1.0, "alpha: weight of the student's imitation term.")
    bound: float = f(5.0, "Constraint values are bound * tanh(f / bound) (0: unbounded), so a learned f cannot "
                          "collapse the importance weights onto one sample.")
    phi_lr: float = f(1e-4, "Learned constraint: AdamW learning rate of phi.")
    phi_weight_decay: float = f(1e-4, "Learned constraint: AdamW weight decay of phi (its regulariser).")
    phi_every: int = f(1, "Learned constraint: one IRL step every this many G iterations (flow steps).")
    irl_log_z: str = f("pooled", "Learned constraint, class-conditional models: log Z of the IRL loss over all "
                                 "model samples ('pooled') or per requested class weighted by the data's class "
                                 "shares ('per_class', the teacher's own normaliser: unbiased in the limit of many "
                                 "samples per class, but with a few per class and step it measured worse, see "
                                 "docs/knowledge_constraints.md).")
    samples: int = f(0, "Flows: model samples per rank and step for the weighted term (0: the batch per rank).")
    temperature: float = f(1.0, "Flows: temperature of those samples (1: the model distribution itself; > 0). The "
                                "weights are corrected to the untempered model, but away from 1 their effective "
                                "sample size collapses in high dimensions and the ESS gate skips the term.")
    ess_min: float = f(0.1, "Guard: a step whose teacher weights have effective sample size / N below this skips "
                            "the flow term (counted as knowledge/ess_skipped); GANs log it.")
    classifier_epochs: int = f(6, "class_consistency: training epochs of the constraint classifier (trained once, "
                                  "kept under eval.features_dir/knowledge-seed<S>).")
    classifier_seed: int = f(1, "class_consistency: seed of the constraint classifier; the evaluation classifier "
                                "uses seed 0, so class consistency is judged by an independent network.")
    keep_samples: int = f(64, "Size of the importance-resampled teacher sample set kept for diagnostics.")


@dataclass
class LaunchConfig:
    nodes: int = f(1, "Nodes for `genscale launch`.")
    gpus_per_node: int = f(1, "GPUs (processes) per node for `genscale launch`.")
    partition: str = f("", "SLURM partition.")
    time: str = f("", "SLURM time limit, e.g. 24:00:00.")
    account: str = f("", "SLURM account.")


@dataclass
class GenscaleConfig:
    experiment: str = f("", "Experiment name (set from the experiment file).")
    resume: str = f("", "Run directory or checkpoint to resume from; 'auto': the newest complete checkpoint "
                        "of this run's directory (logging.root/experiment/logging.run_id) if there is one, "
                        "else a fresh start there.")
    trainer: TrainerConfig = sub(TrainerConfig, "Training loop and Lightning Trainer.")
    data: DataConfig = sub(DataConfig, "Data.")
    model: ModelConfig = sub(ModelConfig, "Networks.")
    loss: LossConfig = sub(LossConfig, "Objective.")
    optim: OptimConfig = sub(OptimConfig, "Optimisers and step schedule.")
    ema: EMAConfig = sub(EMAConfig, "EMA of the generator (GANs) or of the flow (flows).")
    flow: FlowConfig = sub(FlowConfig, "Normalising-flow model and training (model.name=glow).")
    logging: LoggingConfig = sub(LoggingConfig, "Run directory and loggers.")
    eval: EvalConfig = sub(EvalConfig, "Evaluation protocol.")
    launch: LaunchConfig = sub(LaunchConfig, "Launchers.")
    knowledge: KnowledgeConfig = sub(KnowledgeConfig, "Knowledge-constraint training (off by default).")
    pgan: PGANConfig = sub(PGANConfig, "Progressive GAN growing schedule (model.name=pgan).")


CHOICES = {
    "trainer.precision": ["32", "bf16-mixed", "16-mixed"],
    "trainer.accelerator": ["auto", "cpu", "gpu", "cuda", "mps"],
    "trainer.zero_stage": ["0", "1", "2"],
    "model.d_norm": ["batch", "layer", "none"],
    "model.g_norm": ["batch", "none"],
    "optim.g.name": ["adam", "rmsprop"],
    "optim.d.name": ["adam", "rmsprop"],
    "logging.wandb_mode": ["offline", "online"],
    "eval.features": ["auto", "domain", "inception"],
    "eval.bn_mode": ["eval", "standing"],
    "data.mode": ["resampled", "exact"],
    "flow.coupling": ["affine", "additive"],
    "flow.optimizer": ["adam", "adamax"],
    "flow.optimizer_impl": ["auto", "fused", "foreach", "plain"],
    "optim.g.impl": ["auto", "fused", "foreach", "plain"],
    "optim.d.impl": ["auto", "fused", "foreach", "plain"],
    "trainer.compile": ["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    "trainer.compile_scope": ["model", "block"],
    "trainer.finite_check": ["auto", "host"],
    "model.attention_impl": ["matmul", "sdpa"],
    "knowledge.constraint": ["class_consistency", "symmetry"],
    "knowledge.irl_log_z": ["pooled", "per_class"],
}


# ----------------------------------------------------------------------------------------------
# Loading


def list_experiments() -> List[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def describe_experiment(name: str) -> dict:
    """One line of `genscale list`: the first sentence of the experiment file's leading comment, and the
    model, data and objective of its resolved config."""
    text = (EXPERIMENT_DIR / f"{name}.yaml").read_text().splitlines()
    comment = " ".join(ln.lstrip("# ").strip() for ln in text if ln.startswith("#")).split("# ")[0]
    first = re.split(r"(?<! al)(?<!e\.g)\.\s", comment)[0].strip().rstrip(".")  # not at "et al." / "e.g."
    cfg = load_config(name)
    if is_flow(cfg):
        fl = cfg.flow
        model = f"{cfg.model.name} (L={fl.levels}, K={fl.steps}, width {fl.hidden}, {fl.coupling})"
        objective = f"bits/dim on {fl.n_bits}-bit data"
    else:
        model = f"{cfg.model.name} (G width {cfg.model.g_width}, D width {cfg.model.d_width})"
        objective = f"loss {cfg.loss.name}, {cfg.optim.n_critic} D step(s) per G step"
    data = f"{cfg.data.name} {cfg.data.resolution}px, batch {cfg.data.batch_size}"
    k = cfg.knowledge
    constraints = (f"constraint {k.constraint} (lambda {k.lam:g}{', learned' if k.learned else ''})" if k.enabled
                   else "no constraints")
    return {"description": first[:110] + ("..." if len(first) > 110 else ""), "model": model, "data": data,
            "objective": objective, "constraints": constraints}


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if dataclasses.is_dataclass(node):
        for fl in dataclasses.fields(node):
            full = f"{prefix}{fl.name}"
            keys.append(full)
            keys.extend(_all_keys(getattr(node, fl.name), full + "."))
    return keys


def valid_keys() -> List[str]:
    return _all_keys(GenscaleConfig())


def _suggest(bad_key: str) -> str:
    keys = valid_keys()
    leaf = bad_key.split(".")[-1]
    parent = bad_key.rsplit(".", 1)[0] + "." if "." in bad_key else ""
    close = difflib.get_close_matches(bad_key, keys, n=3, cutoff=0.6)
    close += [k for k in keys if k.split(".")[-1] == leaf and k not in close][:3]
    if not close:
        siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
        close = difflib.get_close_matches(bad_key, siblings, n=3, cutoff=0.3) or siblings[:8]
    return ", ".join(close)


def _merge_layer(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(
            f"Unknown config key '{key}' in {source}. Closest valid keys: {_suggest(key)}. "
            "Run `genscale train --help-config` for every key with its meaning."
        ) from None
    except OmegaConfBaseException as e:
        section = _section_given_a_value(base, layer)
        if section:
            raise ConfigError(f"'{section}' in {source} is a section of the config, not a value: set its keys, "
                              f"e.g. {section}.{next(iter(OmegaConf.select(base, section)))}=... "
                              f"(`genscale train --help-config` lists them).") from None
        key = getattr(e, "full_key", None) or "?"
        current = OmegaConf.select(base, key, default=None) if key != "?" else None
        if isinstance(current, ListConfig):  # OmegaConf says "AnyNode is not a ListConfig, ..."
            example = ",".join(str(v) for v in current) or "..."
            raise ConfigError(f"Bad value for '{key}' in {source}: it takes a list, e.g. {key}=[{example}] "
                              "(`genscale train --help-config` shows each key's type).") from None
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"Bad value for '{key}' in {source}: {msg}. "
                          "Fix the value to the type shown in `genscale train --help-config`.") from None


def _section_given_a_value(base: DictConfig, layer, prefix: str = "") -> str:
    """The dotted key where ``layer`` puts a plain value over a section of ``base`` ('' if none)."""
    if not isinstance(layer, DictConfig):
        return ""
    for k in layer.keys():
        here, sub = f"{prefix}{k}", base.get(k) if isinstance(base, DictConfig) else None
        if isinstance(sub, DictConfig):
            v = layer._get_node(k)
            if not isinstance(v, DictConfig):
                return here
            found = _section_given_a_value(sub, v, here + ".")
            if found:
                return found
    return ""


def _load_experiment(name_or_path: str, seen: Optional[set] = None) -> List[tuple]:
    """Returns [(source, DictConfig)] for the experiment and those it extends, base first."""
    seen = seen or set()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and not path.exists():
        raise ConfigError(f"Experiment file '{name_or_path}' does not exist (from {Path.cwd()}). Give an existing "
                          f".yaml file or an experiment name (`genscale list experiments`).")
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = EXPERIMENT_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name_or_path, list_experiments(), n=3, cutoff=0.4)
        raise ConfigError(f"Unknown experiment '{name_or_path}'. Valid experiments: "
                          f"{', '.join(list_experiments())}" + (f" (closest: {', '.join(close)})" if close else "")
                          + ". An experiment may also be a path to a .yaml file.")
    if path in seen:
        raise ConfigError(f"Experiment {path} extends itself (cycle through 'extends').")
    seen.add(path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"Cannot parse experiment file {path}: {e}") from None
    parent = raw.pop("extends", None)
    layers = _load_experiment(str(parent), seen) if parent else []
    if "experiment" not in raw:
        raw.experiment = path.stem
    return layers + [(str(path), raw)]


def _parse_overrides(overrides: List[str]) -> List[tuple]:
    layers = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"Override '{ov}' is not of the form key=value (e.g. trainer.max_iters=100).")
        try:
            layers.append((f"command-line argument '{ov}'", OmegaConf.from_dotlist([ov])))
        except Exception as e:
            raise ConfigError(f"Cannot parse command-line argument '{ov}': {e}") from None
    return layers


def load_config(experiment: Optional[str] = None, overrides: Optional[List[str]] = None,
                base: Optional[dict] = None) -> DictConfig:
    """Defaults + experiment file (+ a saved config ``base`` when resuming) + overrides, validated."""
    cfg = OmegaConf.structured(GenscaleConfig)
    layers = [("saved run config", OmegaConf.create(_saved_behaviour(base)))] if base is not None else []
    if base is None:
        layers += _load_experiment(experiment or DEFAULT_EXPERIMENT)
    command_line = _parse_overrides(overrides or [])
    for source, layer in layers + command_line:
        cfg = _merge_layer(cfg, layer, source)
    _undo_yaml_booleans(cfg)
    _deepspeed_overrules_experiment_speed_switches(cfg, [layer for _, layer in command_line])
    _check_batch_not_shadowed(cfg, [layer for _, layer in command_line])
    def new(key):  # set now, not carried by a saved run (runs saved before a rule keep resuming)
        return base is None or any(OmegaConf.select(layer, key, default=None) is not None for _, layer in command_line)

    run_id = str(cfg.logging.run_id)
    existing = (Path(cfg.logging.root) / (cfg.experiment or "default") / run_id / "config.yaml").is_file()
    if run_id and new("logging.run_id") and not existing:  # an id naming an existing run is that run's
        check_run_id(run_id, "logging.run_id")
    if new("trainer.checkpoint.monitor"):
        _validate_monitor(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.set_struct(cfg, True)
    return cfg


# Keys added after runs could be saved, whose default changes what a saved run computes, with the value
# that keeps the old behaviour: a run resumed from a config saved before the key existed trains on as before.
BEFORE_KEY_EXISTED = {"pgan.fused_scale": False}


def _saved_behaviour(base: dict) -> dict:
    base = copy.deepcopy(base)
    for key, old in BEFORE_KEY_EXISTED.items():
        section, name = key.split(".")
        if name not in base.get(section, {}):
            base.setdefault(section, {})[name] = old
    return base


def _undo_yaml_booleans(cfg: DictConfig) -> None:
    """YAML 1.1 reads off/no/false as False, which a string field stores as 'False': trainer.compile=off
    would then be refused. Restore the word for choices that have it."""
    for key, choices in CHOICES.items():
        if "off" in choices and str(OmegaConf.select(cfg, key)) == "False":
            OmegaConf.update(cfg, key, "off")


def _check_batch_not_shadowed(cfg: DictConfig, command_line: List[DictConfig]) -> None:
    """A Progressive GAN with pgan.batch_sizes takes its batch from that list: data.batch_size given on the
    command line alone would be silently ignored."""
    def given(key):
        return any(OmegaConf.select(layer, key, default=None) is not None for layer in command_line)

    sizes = list(cfg.pgan.batch_sizes)
    if cfg.model.name == "pgan" and sizes and given("data.batch_size") and not given("pgan.batch_sizes"):
        b = cfg.data.batch_size
        raise ConfigError(f"data.batch_size={b} would be ignored: pgan.batch_sizes={sizes} sets the batch at each "
                          f"resolution. Give pgan.batch_sizes=[{', '.join([str(b)] * len(sizes))}] (one per "
                          f"resolution), or pgan.batch_sizes=[] to use data.batch_size at every resolution.")


def _deepspeed_overrules_experiment_speed_switches(cfg: DictConfig, command_line: List[DictConfig]) -> None:
    """The GPU experiments ship with trainer.compile and trainer.channels_last on, which DeepSpeed's
    engines do not survive. Under trainer.strategy=deepspeed the experiment's values give way to the
    defaults, so `genscale train biggan_imagenet128 trainer.strategy=deepspeed` just works; the same
    switches asked for on the command line are still refused (_validate_deepspeed)."""
    if cfg.trainer.strategy != "deepspeed":
        return
    for key, off in (("trainer.compile", "off"), ("trainer.channels_last", False)):
        if not any(OmegaConf.select(layer, key, default=None) is not None for layer in command_line):
            OmegaConf.update(cfg, key, off)


def validate(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        val = str(OmegaConf.select(cfg, key))
        if val not in choices:
            raise ConfigError(f"Invalid value '{val}' for '{key}'. Valid values: {', '.join(choices)}.")
    from models.glow import FLOWS
    from models.registry import MODELS
    from trainer.losses import LOSSES
    from data_pipelines.builtin import DATASETS

    for key, registry in (("model.name", {**MODELS, **FLOWS}), ("loss.name", LOSSES), ("data.name", DATASETS)):
        val = OmegaConf.select(cfg, key)
        if val not in registry:
            raise ConfigError(f"Unknown {key.split('.')[0]} '{val}' for '{key}'. Valid: {', '.join(sorted(registry))}.")
    positive = ["trainer.max_iters", "data.batch_size", "data.resolution", "optim.n_critic",
                "optim.accumulate", "model.z_dim", "trainer.sample_grid", "trainer.num_nodes", "trainer.log_every",
                "optim.g.lr", "optim.d.lr", "flow.lr"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {OmegaConf.select(cfg, key)}.")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"'data.num_workers' must be 0 (load in the main process) or more, got {cfg.data.num_workers}.")
    for key in ("optim.g.betas", "optim.d.betas", "flow.betas"):
        betas = list(OmegaConf.select(cfg, key))
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ConfigError(f"'{key}' must be two numbers in [0, 1) (beta1, beta2), got {betas}.")
    _validate_strategy(cfg.trainer.strategy)
    if cfg.data.batch_size % cfg.optim.accumulate:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                          f"optim.accumulate={cfg.optim.accumulate}; choose values that divide.")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}.")
    for key in ("start_iter", "rampup_iters"):
        if cfg.ema[key] < 0:
            raise ConfigError(f"ema.{key} must be 0 or more (G iterations), got {cfg.ema[key]}.")
    _validate_optimizer_impls(cfg)
    _validate_deepspeed(cfg)
    _validate_knowledge(cfg)
    _validate_pgan(cfg)
    if is_flow(cfg):
        _validate_flow(cfg)
    elif cfg.trainer.compile_scope == "block":
        raise ConfigError("trainer.compile_scope=block compiles a flow's steps one by one; GAN networks compile "
                          "whole. Set trainer.compile_scope=model.")
    elif cfg.loss.gp_autocast and cfg.trainer.precision != "bf16-mixed":
        raise ConfigError(f"loss.gp_autocast=true needs trainer.precision=bf16-mixed (got {cfg.trainer.precision}): "
                          "under 16-mixed the penalty's unscaled inner gradient would underflow, and in 32 there "
                          "is no autocast. Set loss.gp_autocast=false or trainer.precision=bf16-mixed.")
    elif cfg.loss.name == "wgan_gp" and cfg.model.d_norm == "batch":
        raise ConfigError("loss.name=wgan_gp with model.d_norm=batch: the gradient penalty is per sample, "
                          "so the critic must not use BatchNorm. Set model.d_norm=layer or none.")


def _validate_deepspeed(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.strategy != "deepspeed":
        return
    for key, on in (("trainer.channels_last", t.channels_last), ("trainer.compile", t.compile != "off")):
        if on:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} with trainer.strategy=deepspeed: DeepSpeed's "
                              "engines flatten the weights into their own buffers and wrap the networks, which "
                              f"channels_last weights and compiled modules do not survive. Add {key}="
                              f"{'false' if key.endswith('channels_last') else 'off'} to the command, or use "
                              "trainer.strategy=auto/gan_ddp.")
    if not is_flow(cfg) and cfg.model.name == "pgan":
        raise ConfigError("model.name=pgan with trainer.strategy=deepspeed: growing adds layers and resets the "
                          "optimisers, which DeepSpeed's engines (built once, with their own optimiser state) do not "
                          "follow. Use trainer.strategy=gan_ddp (the default for several processes).")
    if is_flow(cfg) and t.precision == "16-mixed":
        raise ConfigError("trainer.strategy=deepspeed with a flow supports trainer.precision 32 or bf16-mixed: "
                          "DeepSpeed's fp16 engines make every weight fp16, and Glow keeps its log-determinants "
                          "in fp32. Use trainer.precision=bf16-mixed.")
    if not is_flow(cfg) and cfg.loss.name == "wgan" and (t.zero_stage > 0 or t.precision == "16-mixed"):
        raise ConfigError(f"loss.name=wgan clips the critic's weights after each step, but DeepSpeed with ZeRO stage "
                          f"{t.zero_stage} and precision {t.precision} keeps its own master copy of the weights that "
                          "the clip would not reach. Use trainer.zero_stage=0 with precision 32 or bf16-mixed, or "
                          "trainer.strategy=gan_ddp.")


def _validate_strategy(name: str) -> None:
    """genscale's strategies, or one Lightning knows by name."""
    if name in ("auto", "gan_ddp", "deepspeed"):
        return
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if name not in known:
        raise ConfigError(f"Unknown trainer.strategy '{name}'. Valid: auto, gan_ddp, deepspeed, or one of Lightning's: "
                          f"{', '.join(sorted(k for k in known if 'deepspeed' not in k and 'fsdp' not in k))}.")


def _validate_optimizer_impls(cfg: DictConfig) -> None:
    """impl=fused exists for Adam only (torch has no fused RMSprop or Adamax)."""
    pairs = [("optim.g.impl", "optim.g.name"), ("optim.d.impl", "optim.d.name"),
             ("flow.optimizer_impl", "flow.optimizer")]
    for impl_key, name_key in pairs:
        name = OmegaConf.select(cfg, name_key)
        if OmegaConf.select(cfg, impl_key) == "fused" and name != "adam":
            raise ConfigError(f"{impl_key}=fused: torch has a fused kernel for Adam only, but {name_key}={name}. "
                              f"Use {impl_key}=foreach (or auto), or {name_key}=adam.")


def _validate_knowledge(cfg: DictConfig) -> None:
    k = cfg.knowledge
    if not k.enabled:
        return
    if k.learned and k.constraint != "class_consistency":
        raise ConfigError(f"knowledge.learned=true needs a constraint with parameters: knowledge.constraint="
                          f"{k.constraint} has none. Use knowledge.constraint=class_consistency or learned=false.")
    if k.temperature <= 0:
        raise ConfigError(f"knowledge.temperature must be > 0 (importance weights need a density), got {k.temperature}.")
    rules = [("lam", k.lam >= 0, "non-negative"), ("alpha", k.alpha >= 0, "non-negative"),
             ("bound", k.bound >= 0, "non-negative"), ("phi_every", k.phi_every > 0, "positive"),
             ("ess_min", 0.0 <= k.ess_min <= 1.0, "in [0, 1]"),
             ("samples", k.samples >= 0, "0 (the batch size) or more"), ("keep_samples", k.keep_samples > 0, "positive")]
    for key, ok, want in rules:
        if not ok:
            raise ConfigError(f"knowledge.{key} must be {want}, got {k[key]}.")


def _validate_pgan(cfg: DictConfig) -> None:
    """The growing schedule's lists must fit the resolutions, and every batch must split into micro-batches."""
    if cfg.model.name != "pgan":
        return
    from trainer.pgan_schedule import ScheduleError, schedule_from_config

    p = cfg.pgan
    if p.final_resolution and p.final_resolution != cfg.data.resolution:
        raise ConfigError(f"pgan.final_resolution={p.final_resolution} but data.resolution={cfg.data.resolution}: "
                          "the data is delivered at data.resolution; set both to the same value (or "
                          "pgan.final_resolution=0).")
    try:
        sched = schedule_from_config(to_dict(cfg))
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    bad = [b for b in sched.batch_sizes if b % cfg.optim.accumulate]
    if bad:
        raise ConfigError(f"pgan.batch_sizes {bad} are not divisible by optim.accumulate={cfg.optim.accumulate}.")
    # feature maps at stage s (resolution 2^(s+1)) are min(fmap_base / 2^s, fmap_max): the last stage's must
    # be at least 1
    if p.fmap_max < 1 or p.fmap_base < cfg.data.resolution // 2:
        raise ConfigError(f"pgan.fmap_base={p.fmap_base}, pgan.fmap_max={p.fmap_max} leave no feature maps at "
                          f"{cfg.data.resolution} px (min(fmap_base / 2^stage, fmap_max), stage log2(resolution) - 1): "
                          f"set pgan.fmap_base to at least {cfg.data.resolution // 2} and pgan.fmap_max to at least 1.")

def is_flow(cfg) -> bool:
    """Whether model.name names a normalising flow (models.glow.FLOWS) rather than a GAN."""
    from models.glow import FLOWS

    return OmegaConf.select(cfg, "model.name") in FLOWS if isinstance(cfg, DictConfig) else cfg["model"]["name"] in FLOWS


# What reaches trainer.callback_metrics, where checkpoint ranking reads it (the periodic evaluations; a
# flow's per-step training bits/dim). GAN losses are logged straight to the loggers and rank nothing.
MONITORABLE = {"gan": ["eval/fid", "eval/kid", "eval/kid_std"], "flow": ["eval/bpd", "train/bpd", "train/bits_y"]}

def _validate_monitor(cfg: DictConfig) -> None:
    monitor, rankable = cfg.trainer.checkpoint.monitor, MONITORABLE["flow" if is_flow(cfg) else "gan"]
    if monitor and monitor not in rankable:
        raise ConfigError(f"trainer.checkpoint.monitor='{monitor}' is not a metric checkpoints can be ranked by "
                          f"for this model (a checkpoint lacking it would rank last, silently): use one of "
                          f"{', '.join(rankable)} (eval/* need eval.every_n_iters), or '' for the newest.")


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def check_run_id(run_id: str, source: str) -> str:
    """A run id is one directory name: no path separators, '.' or '..', so a run can never land in its
    experiment's directory, beside it or inside another run (where `report` and `resume` would mix them)."""
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"{source}='{run_id}' is not a valid run id: use letters, digits and . _ + - (not first, "
                          "no '/'), at most 200 characters: it names one directory.")
    return run_id


def _validate_flow(cfg: DictConfig) -> None:
    fl, res = cfg.flow, cfg.data.resolution
    for key in ("levels", "steps", "hidden"):
        if fl[key] <= 0:
            raise ConfigError(f"'flow.{key}' must be positive, got {fl[key]}.")
    if res % (2 ** fl.levels):
        ok = [lv for lv in range(1, 9) if res % (2 ** lv) == 0]
        raise ConfigError(f"flow.levels={fl.levels} needs data.resolution divisible by 2^{fl.levels}={2 ** fl.levels} "
                          f"(each level squeezes 2x2), but data.resolution={res}. Choose flow.levels in "
                          f"{ok or 'none: use an even resolution'} or a resolution divisible by {2 ** fl.levels}.")
    if not 1 <= fl.n_bits <= 8:
        raise ConfigError(f"flow.n_bits must be an integer in 1..8, got {fl.n_bits}.")
    if fl.lr <= 0 or fl.warmup_images < 0 or fl.weight_y < 0 or fl.sample_temperature < 0:
        raise ConfigError(f"flow.lr must be positive and flow.warmup_images, flow.weight_y and "
                          f"flow.sample_temperature non-negative (got {fl.lr}, {fl.warmup_images}, {fl.weight_y}, "
                          f"{fl.sample_temperature}).")
    if len(fl.betas) != 2:
        raise ConfigError(f"flow.betas must have two values, got {list(fl.betas)}.")
    if cfg.optim.accumulate != 1:
        raise ConfigError("optim.accumulate applies to GANs only; flows take one optimiser step per batch "
                          f"(got optim.accumulate={cfg.optim.accumulate}).")


def ignored_settings(cfg: DictConfig, overrides: List[str]) -> List[str]:
    """Command-line settings that this config makes do nothing (accepted, so a sweep can vary them, but
    said): the user asked for something the run will not do."""
    given = {o.split("=", 1)[0] for o in overrides if "=" in o}
    notes = []
    if not cfg.knowledge.enabled:
        notes += [f"{k} has no effect with knowledge.enabled=false" for k in sorted(given)
                  if k.startswith("knowledge.") and k != "knowledge.enabled"]
    elif "knowledge.irl_log_z" in given and not cfg.knowledge.learned:
        notes.append("knowledge.irl_log_z has no effect without knowledge.learned=true (a fixed constraint)")
    if "trainer.zero_stage" in given and cfg.trainer.strategy != "deepspeed":
        notes.append(f"trainer.zero_stage has no effect with trainer.strategy={cfg.trainer.strategy} "
                     "(it is DeepSpeed's)")
    return notes


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def describe_fields(node: Any = None, prefix: str = "") -> List[str]:
    """Lines 'key (type, default): doc' for every field, used by --help-config."""
    node = node if node is not None else GenscaleConfig()
    lines = []
    for fl in dataclasses.fields(node):
        val = getattr(node, fl.name)
        full = prefix + fl.name
        if dataclasses.is_dataclass(val):
            lines.append(f"{full}:  {fl.metadata.get('doc', '')}")
            lines.extend(describe_fields(val, full + "."))
        else:
            tname = getattr(fl.type, "__name__", str(fl.type))
            lines.append(f"  {full} ({tname}, default {val!r}): {fl.metadata.get('doc', '')}")
    return lines
