"""Sampling and FID/KID evaluation of checkpoints, and the domain feature network they use on digits.

Protocol: `num_samples` images from G_ema (eval mode, so BatchNorm uses its running statistics),
latents from a seeded generator, quantised to uint8 like saved images, against the held-out 'val'
split of the run's dataset at the run's resolution. Real and generated images go through the same
uint8 -> features path. On digit data the features are the penultimate layer of a classifier
trained on the train split only (Inception features mean little on 16-32 px grey digits); it is
trained once per dataset and resolution and kept in eval.features_dir.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from data_pipelines.builtin import ArrayDataset, DataError, load_split
from models.biggan import truncated_normal
from models.classifier import DomainClassifier
from models.registry import build_gan
from trainer.checkpointing import CheckpointError, load_checkpoint
from trainer.config import ConfigError, EvalConfig
from trainer.csv_log import append_row
from trainer.images import save_grid, to_uint8
from trainer.metrics import fid_from_features, inception_feature_extractor, kid_from_features

DOMAIN_DATASETS = ("mnist5k", "digits")
GEN_BATCH = 250
FEATURE_BATCH = 500

Features = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, C, H, W) -> float64 (N, D) on the CPU


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the range G produces and GANModule trains D on."""
    return images.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------
# Domain feature network


def feature_net_path(dataset: str, resolution: int, features_dir: str | os.PathLike, data_path: str = "",
                     val_fraction: float = 0.1) -> Path:
    """<features_dir>/<dataset>-<res>px.pt; npz files and non-default splits get their own file, so a
    net is never reused for other images or for a split in which it saw the held-out ones."""
    name = dataset if dataset != "npz" else f"npz-{Path(data_path).stem}"
    if dataset == "shards":  # a shard directory: its name plus a hash of where it is
        where = hashlib.sha256(str(Path(data_path).resolve()).encode()).hexdigest()[:8]
        name = f"shards-{Path(data_path).name}-{where}"
    split = "" if val_fraction == 0.1 else f"-val{val_fraction:g}"
    return Path(features_dir) / f"{name}-{resolution}px{split}.pt"


def _fit_classifier(data: ArrayDataset, resolution: int, epochs: int, seed: int, device: torch.device,
                    batch_size: int = 64, lr: float = 3e-3) -> DomainClassifier:
    net = DomainClassifier(data.channels, resolution, data.num_classes).to(device)
    steps = epochs * math.ceil(len(data) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # One-cycle: a few epochs reach the accuracy a constant rate needs many more for.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=order).split(batch_size):
            x, y = _to_float(data.images[idx]).to(device), data.labels[idx].to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def classifier_accuracy(net: DomainClassifier, data: ArrayDataset) -> float:
    dev = next(net.parameters()).device
    correct = sum(int((net(_to_float(x).to(dev)).argmax(1).cpu() == y).sum())
                  for x, y in zip(data.images.split(FEATURE_BATCH), data.labels.split(FEATURE_BATCH)))
    return correct / max(1, len(data))


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: concurrent evals never collide
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train_feature_net(dataset: str, resolution: int, data_path: str = "", features_dir=None, force: bool = False,
                      epochs: int = 6, seed: int = 0, val_fraction: float = 0.1) -> Path:
    """Trains (or reuses) the domain classifier on the train split; returns its file."""
    features_dir = features_dir or EvalConfig().features_dir
    path = feature_net_path(dataset, resolution, features_dir, data_path, val_fraction)
    if path.exists() and not force:
        return path
    train = load_split(dataset, "train", resolution, val_fraction, data_path)
    val = load_split(dataset, "val", resolution, val_fraction, data_path)
    if train.num_classes < 2:
        raise DataError(f"The domain feature network is a classifier and needs labels, but '{dataset}' "
                        f"{data_path} has {train.num_classes} class(es). Add 'labels' to the data or use "
                        "eval.features=inception.")
    print(f"genscale: training the domain feature network for {dataset} at {resolution} px "
          f"({len(train)} train images, {epochs} epochs; done once, then reused from {path})", file=sys.stderr)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        net = _fit_classifier(train, resolution, epochs, seed, _device())
    acc = classifier_accuracy(net, val)
    meta = {"dataset": dataset, "data_path": data_path, "resolution": resolution, "channels": train.channels,
            "num_classes": train.num_classes, "width": net.width, "feat_dim": net.feat_dim,
            "val_accuracy": acc, "val_fraction": val_fraction, "epochs": epochs, "seed": seed,
            "train_seconds": round(time.perf_counter() - t0, 2)}
    _atomic_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}, path)
    print(f"genscale: feature network held-out accuracy {acc:.4f} ({meta['train_seconds']} s) -> {path}",
          file=sys.stderr)
    return path


def load_feature_net(path: Path) -> Tuple[DomainClassifier, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain metadata only
        meta = obj["meta"]
        net = DomainClassifier(meta["channels"], meta["resolution"], meta["num_classes"], meta["width"],
                               meta["feat_dim"])
        net.load_state_dict(obj["state_dict"])
    except Exception as e:
        raise CheckpointError(f"Feature network '{path}' cannot be read ({type(e).__name__}: {e}). Delete it or "
                              "retrain it with `genscale eval train-features --dataset ... --force`.") from None
    return net.eval(), meta


# ----------------------------------------------------------------------------------------------
# Generator from a checkpoint


def _run_data(cfg: dict, split: str) -> ArrayDataset:
    d = cfg["data"]
    return load_split(d["name"], split, d["resolution"], d["val_fraction"], d["path"])


def _build_generator(cfg: dict, state: dict, data: ArrayDataset, use_ema: bool) -> Tuple[torch.nn.Module, bool]:
    """G exactly as trainer.build.build_module builds it, with G_ema's weights when asked and present."""
    from trainer.build import gan_build_args  # (build imports the evaluation callback, which imports us)

    m = cfg["model"]
    G, _ = build_gan(**gan_build_args(cfg, data.channels, m.get("num_classes") or data.num_classes))
    ema = use_ema and any(k.startswith("G_ema.") for k in state)
    prefix = "G_ema." if ema else "G."
    try:
        G.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise CheckpointError(f"The checkpoint's generator weights do not fit model '{m['name']}' as its config "
                              f"describes it ({str(e).splitlines()[0][:200]}).") from None
    if m["name"] == "pgan":
        G = pgan_at(G, cfg, int(state.get("images_seen", torch.tensor(0))))
    return G.eval(), ema


class _AtPhase(torch.nn.Module):
    """A Progressive GAN generator held at a checkpoint's (level, alpha), its images upsampled
    (nearest) to the final resolution, as the training grids show them."""

    def __init__(self, G: torch.nn.Module, level: int, alpha: float, size: int):
        super().__init__()
        self.G, self.level, self.alpha, self.size = G, level, alpha, size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.G(z, self.level, self.alpha)
        return x if x.shape[-1] == self.size else torch.nn.functional.interpolate(x, size=self.size, mode="nearest")


def pgan_at(G: torch.nn.Module, cfg: dict, images_seen: int) -> torch.nn.Module:
    """A Progressive GAN mid-growth has untrained top layers: sample it where training stood after
    ``images_seen`` images (a checkpoint's, or the running module's), not at the final resolution."""
    from trainer.pgan_schedule import schedule_from_config

    schedule = schedule_from_config(cfg)
    phase = schedule.at(images_seen)
    return _AtPhase(G, phase.level, float(phase.alpha), schedule.resolutions[-1])


def class_labels(G: torch.nn.Module, num: int, label: Optional[int] = None) -> Optional[torch.Tensor]:
    """Labels for `num` samples of a class-conditional G: all `label`, or cycling through the classes
    (balanced, for metrics); None for an unconditional G."""
    n = int(getattr(G, "num_classes", 0)) if getattr(G, "conditional", False) else 0
    if not n:
        if label is not None:
            raise ConfigError(f"--class {label}: this generator is not class-conditional.")
        return None
    if label is None:
        return torch.arange(num) % n
    if not 0 <= label < n:
        raise ConfigError(f"--class must be a class index in 0..{n - 1} (the model has {n} classes), got {label}.")
    return torch.full((num,), label, dtype=torch.long)


def _latents(num: int, z_dim: int, seed: int, truncation: float) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same images on any device; T=0 is plain randn.
    return truncated_normal(num, z_dim, truncation, generator=torch.Generator().manual_seed(seed))


def _run_g(G: torch.nn.Module, z: torch.Tensor, y: Optional[torch.Tensor], device) -> torch.Tensor:
    return G(z.to(device)) if y is None else G(z.to(device), y.to(device))


@torch.no_grad()
def generate_uint8(G: torch.nn.Module, z_dim: int, num: int, seed: int, device: torch.device,
                   truncation: float = 0.0, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    z = _latents(num, z_dim, seed, truncation)
    y = labels if labels is not None else class_labels(G, num)
    G = G.to(device)
    ys = y.split(GEN_BATCH) if y is not None else [None] * len(z.split(GEN_BATCH))
    return torch.cat([to_uint8(_run_g(G, zb, yb, device).float().cpu()) for zb, yb in zip(z.split(GEN_BATCH), ys)])


@torch.no_grad()
def standing_stats(G: torch.nn.Module, z_dim: int, batches: int, seed: int, device: torch.device,
                   truncation: float = 0.0) -> torch.nn.Module:
    """A copy of G whose BatchNorm statistics are reset and re-accumulated (a plain average:
    momentum None) over `batches` sampled batches: BigGAN's "standing statistics". Only the BN layers
    run in training mode, so spectral-norm vectors and everything else stay as they are."""
    G = copy.deepcopy(G).to(device).eval()
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for b in range(batches):
        z = _latents(GEN_BATCH, z_dim, seed + 7919 * (b + 1), truncation)  # not the evaluation's latents
        _run_g(G, z, class_labels(G, GEN_BATCH), device)
    return G.eval()


def sample_grid(checkpoint, num: int = 64, out="samples.png", seed: int = 0, use_ema: bool = True,
                truncation: float = 0.0, label: Optional[int] = None) -> Path:
    """Writes a PNG grid of `num` samples from latents seeded by `seed` (truncated at T > 0), of class
    `label` or cycling through the classes for a class-conditional G."""
    if num <= 0:
        raise ConfigError(f"--num must be positive, got {num}.")
    if truncation < 0:
        raise ConfigError(f"--truncation must be >= 0 (0: none), got {truncation}.")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["genscale"]["config"]
    # The run's data gives the channel and class counts build_module used (nothing extra is stored).
    G, _ = _build_generator(cfg, ckpt["state_dict"], _run_data(cfg, "val"), use_ema)
    y = class_labels(G, num, label)
    return save_grid(generate_uint8(G, cfg["model"]["z_dim"], num, seed, _device(), truncation, y), out)


@torch.no_grad()
def interpolation_images(G: torch.nn.Module, mode: str, a: int, b: int, rows: int, steps: int, seed: int = 0,
                         truncation: float = 0.0) -> torch.Tensor:
    """Class-conditional G, (rows * steps) images in row order. mode 'class': each row keeps one latent
    while the shared class embedding moves linearly from class a to class b. mode 'z': row r keeps
    class a + r (up to b, so rows = b - a + 1) while the latent moves linearly between two latents."""
    if not getattr(G, "conditional", False):
        raise ConfigError("Class interpolation needs a class-conditional generator (e.g. model.name=biggan).")
    n = int(G.num_classes)
    if not (0 <= a < n and 0 <= b < n):
        raise ConfigError(f"--interpolate-{mode} A B must be class indices in 0..{n - 1} (the model has {n} classes), "
                          f"got {a} {b}.")
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    if mode == "class":
        z = _latents(rows, G.z_dim, seed, truncation)[:, None].expand(rows, steps, G.z_dim)
        e = G.embed(torch.tensor([a, b]))
        y = (e[0] + t * (e[1] - e[0])).expand(rows, steps, -1).reshape(rows * steps, -1)
    else:
        classes = torch.arange(min(a, b), max(a, b) + 1)
        rows = len(classes)
        ends = _latents(2 * rows, G.z_dim, seed, truncation).view(rows, 2, 1, G.z_dim)
        z = ends[:, 0] + t * (ends[:, 1] - ends[:, 0])
        y = classes[:, None].expand(rows, steps).reshape(-1)
    return to_uint8(G(z.reshape(rows * steps, G.z_dim), y).float())


def interpolation_grid(checkpoint, mode: str, a: int, b: int, rows: int = 8, steps: int = 8, out="interp.png",
                       seed: int = 0, use_ema: bool = True, truncation: float = 0.0) -> Path:
    """Writes interpolation_images of a checkpoint's G (G_ema by default) as a grid, `steps` per row."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["genscale"]["config"]
    G, _ = _build_generator(cfg, ckpt["state_dict"], _run_data(cfg, "val"), use_ema)
    return save_grid(interpolation_images(G, mode, a, b, rows, steps, seed, truncation), out, nrow=steps)


# ----------------------------------------------------------------------------------------------
# FID / KID


def _feature_kind(requested: str, dataset: str, val: ArrayDataset) -> str:
    if requested not in ("auto", "domain", "inception"):
        raise ConfigError(f"Unknown feature network '{requested}'. Valid: auto, domain, inception.")
    if requested != "auto":
        return requested
    domain = dataset in DOMAIN_DATASETS or (dataset in ("npz", "shards") and val.channels == 1 and val.num_classes >= 2)
    return "domain" if domain else "inception"


def _domain_extractor(cfg: dict, val: ArrayDataset, features_dir, device) -> Tuple[Features, dict]:
    d = cfg["data"]
    path = train_feature_net(d["name"], d["resolution"], d["path"], features_dir, val_fraction=d["val_fraction"])
    net, meta = load_feature_net(path)
    if (meta["resolution"], meta["channels"]) != (d["resolution"], val.channels):
        raise ConfigError(f"Feature network '{path}' was trained for {meta['channels']}-channel {meta['resolution']} "
                          f"px images, not this run's data; retrain it with `genscale eval train-features --force`.")
    net = net.to(device)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    proto = {"features": f"domain-classifier:{path.name}", "feature_dim": meta["feat_dim"],
             "feature_net_val_accuracy": meta["val_accuracy"], "feature_net_sha256": sha}
    fn = lambda x: net.features(_to_float(x).to(device)).double().cpu()  # noqa: E731
    fn.classifier = net  # also gives the class consistency of class-conditional generators
    return fn, proto


def _extractor(kind: str, cfg: dict, val: ArrayDataset, features_dir, device) -> Tuple[Features, dict]:
    if kind == "domain":
        return _domain_extractor(cfg, val, features_dir, device)
    return inception_feature_extractor(device), {"features": "inception-v3", "feature_dim": 2048}


@torch.no_grad()
def _features(fn: Features, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x) for x in images.split(FEATURE_BATCH)])


def _train_vs_val_fid(cfg: dict, fn: Features, f_val: torch.Tensor, n: int, seed: int) -> float:
    """FID of n real train images against val: what a perfect generator would score at this n."""
    train = _run_data(cfg, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return fid_from_features(_features(fn, train.images[idx]), f_val)


def _append_log(ckpt_path: Path, result: dict) -> Optional[Path]:
    run_dir = ckpt_path.resolve().parent.parent
    if not (run_dir / "config.yaml").exists():
        return None
    log = run_dir / "eval.jsonl"
    with open(log, "a") as fh:  # one write of one line: concurrent evaluations do not interleave
        fh.write(json.dumps(result) + "\n")
    # The run's metrics.csv gets the numbers too, keyed by iteration like the training rows.
    tag = "eval" if result["protocol"]["ema"] else "eval_raw"
    append_row(run_dir / "metrics.csv", {"step": result["iteration"], "iteration": result["iteration"],
                                         f"{tag}/fid": result["fid"], f"{tag}/kid": result["kid_mean"],
                                         f"{tag}/kid_std": result["kid_std"]})
    return log


class GeneratorEvaluator:
    """FID/KID of a generator against the run's held-out split. Built once (feature network, real
    features); `__call__` then costs one generation and one feature pass, so training can call it
    periodically."""

    def __init__(self, cfg: dict, features_dir=None, features: Optional[str] = None,
                 device: Optional[torch.device] = None):
        ev = cfg["eval"]
        self.cfg, self.ev, self.device = cfg, ev, device or _device()
        self.val = _run_data(cfg, "val")
        self.kind = _feature_kind(features or ev["features"], cfg["data"]["name"], self.val)
        # Features first: a missing Inception or unlabelled data fails before any generation.
        self.fn, self.proto = _extractor(self.kind, cfg, self.val, features_dir or ev["features_dir"], self.device)
        self.f_real = _features(self.fn, self.val.images)
        self._floor: dict = {}

    @torch.no_grad()
    def _class_accuracy(self, images: torch.Tensor, labels: Optional[torch.Tensor]):
        """Accuracy of the domain classifier on samples of each requested class (overall, per class)."""
        net = getattr(self.fn, "classifier", None)
        if labels is None or net is None:
            return None, None
        pred = torch.cat([net(_to_float(x).to(self.device)).argmax(1).cpu() for x in images.split(FEATURE_BATCH)])
        hit = (pred == labels).float()
        return float(hit.mean()), [float(hit[labels == c].mean()) for c in range(int(labels.max()) + 1)]

    def __call__(self, G: torch.nn.Module, num: int, seed: int = 0, ema: bool = True,
                 truncation: Optional[float] = None, bn_mode: Optional[str] = None) -> dict:
        if num < 2:
            raise ConfigError(f"FID/KID need at least 2 generated samples, got {num}.")
        ev = self.ev
        T = float(ev.get("truncation", 0.0) if truncation is None else truncation)
        mode = bn_mode or ev.get("bn_mode", "eval")
        z_dim = self.cfg["model"]["z_dim"]
        was_training = G.training
        G.eval()
        # "standing": BN statistics re-accumulated on a copy; "eval": G's running statistics.
        net = G if mode == "eval" else standing_stats(G, z_dim, ev.get("standing_batches", 16), seed, self.device, T)
        labels = class_labels(G, num)
        images = generate_uint8(net, z_dim, num, seed, self.device, T, labels)
        G.train(was_training)
        f_fake = _features(self.fn, images)
        acc, acc_per_class = self._class_accuracy(images, labels)
        kid_mean, kid_std = kid_from_features(f_fake, self.f_real, ev["kid_subsets"], ev["kid_subset_size"], seed)
        if self.kind == "domain" and (num, seed) not in self._floor:
            # Cheap only with the small domain network; Inception would double the evaluation time.
            self._floor[(num, seed)] = _train_vs_val_fid(self.cfg, self.fn, self.f_real, num, seed)
        return {
            "fid": fid_from_features(f_fake, self.f_real),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "fid_train_vs_val": self._floor.get((num, seed)),
            "class_accuracy": acc,  # class-conditional G with domain features; else None
            "class_accuracy_per_class": acc_per_class,
            "protocol": {**self.proto, "num_generated": num, "num_real": len(self.val), "real_split": "val",
                         "ema": ema, "truncation": T or None, "bn_mode": mode, "seed": seed,
                         **({"standing_batches": ev.get("standing_batches", 16)} if mode == "standing" else {}),
                         "kid_subsets": ev["kid_subsets"],
                         "kid_subset_size": min(ev["kid_subset_size"], num, len(self.val))},
        }


def evaluate_checkpoint(checkpoint, num_samples: Optional[int] = None, seed: int = 0, use_ema: bool = True,
                        features_dir=None, features: Optional[str] = None, truncation: Optional[float] = None,
                        bn_mode: Optional[str] = None) -> dict:
    """FID/KID of a checkpoint's samples against the held-out split; appended to <run>/eval.jsonl.

    `features` overrides the run's eval.features ('auto', 'domain', 'inception'), `truncation` and
    `bn_mode` its eval.truncation and eval.bn_mode. G_ema is used when both `use_ema` and the run's
    eval.use_ema allow it and the checkpoint has one.
    """
    if bn_mode not in (None, "eval", "standing"):
        raise ConfigError(f"Unknown BN mode '{bn_mode}'. Valid: eval, standing.")
    if truncation is not None and truncation < 0:
        raise ConfigError(f"--truncation must be >= 0 (0: none), got {truncation}.")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["genscale"]["config"]
    num = num_samples or cfg["eval"]["num_samples"]
    if num < 2:
        raise ConfigError(f"FID/KID need at least 2 generated samples, got {num}.")
    evaluator = GeneratorEvaluator(cfg, features_dir, features)
    G, ema = _build_generator(cfg, ckpt["state_dict"], evaluator.val, use_ema and cfg["eval"]["use_ema"])
    result = evaluator(G, num, seed, ema, truncation, bn_mode)
    result.update({"iteration": int(ckpt["genscale"]["iteration"]),
                   "kimg": int(ckpt["genscale"]["images_seen"]) / 1000.0,
                   "checkpoint": str(ckpt["_path"]),
                   "time": _dt.datetime.now().isoformat(timespec="seconds")})
    _append_log(Path(ckpt["_path"]), result)
    return result
