"""Sample-quality metrics over feature vectors: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018).

Both work on any features (a domain classifier's or Inception's); everything is done in float64
because FID subtracts large, nearly equal traces. `inception_feature_extractor` gives torchmetrics'
(torch-fidelity's) Inception-v3 only when its weights are already on disk: this code never downloads.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch

from trainer.config import ConfigError

# The file torch-fidelity's FeatureExtractorInceptionV3 fetches into the torch hub cache (the
# TF-FID Inception graph ported to PyTorch, so scores are comparable with published FIDs).
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


class InceptionUnavailableError(ConfigError):
    """Inception features were asked for but the package or its weights are not available offline."""


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _mean_cov(f: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    f = _as_f64(f)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Features must be (N >= 2, D), got shape {f.shape}.")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr (S1 S2)^(1/2) equals Tr (S1^(1/2) S2 S1^(1/2))^(1/2), whose argument is symmetric PSD, so
    it is the sum of square roots of real, clipped eigenvalues: no complex sqrtm, no imaginary
    residue, and it stays stable for singular covariances (fewer samples than dimensions).
    """
    mu1, mu2, s1, s2 = (np.atleast_1d(_as_f64(a)) for a in (mu1, mu2, sigma1, sigma2))
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}.")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(f1, f2) -> float:
    """FID between two (N, D) feature sets (tensors or arrays)."""
    mu1, s1 = _mean_cov(f1)
    mu2, s2 = _mean_cov(f2)
    return frechet_distance(mu1, s1, mu2, s2)


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3: diagonals dropped within each set."""
    d = x.shape[1]
    m, n = x.shape[0], y.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def kid_from_features(f1, f2, subsets: int = 50, subset_size: int = 500, seed: int = 0) -> Tuple[float, float]:
    """KID as torch-fidelity computes it: mean and std of MMD^2 over random subsets (no replacement
    within a subset), each subset `subset_size` rows of each set (capped by the smaller set)."""
    x, y = _as_f64(f1), _as_f64(f2)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}.")
    rng = np.random.default_rng(seed)
    vals = np.array([_poly_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
                     for _ in range(max(1, subsets))])
    return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------------------------
# Inception-v3 features, offline only


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _unavailable(reason: str) -> InceptionUnavailableError:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return InceptionUnavailableError(
        f"Inception-v3 features are not available: {reason}. This code never downloads them (compute nodes are "
        f"often offline). To provide them offline: install the extra with `pip install 'genscale[inception]'` "
        f"(torchmetrics[image], which brings torch-fidelity and torchvision), then on a machine with internet "
        f"download {INCEPTION_URL} and copy the file {INCEPTION_WEIGHTS} into the torch hub checkpoints directory "
        f"{hub}/ (that is $TORCH_HOME/hub/checkpoints/, TORCH_HOME defaulting to ~/.cache/torch). For digit data "
        f"use the domain feature network instead, which needs no download: eval.features=domain in training, "
        f"`genscale eval CKPT --features domain` afterwards.")


def inception_feature_extractor(device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (N, C, H, W) -> (N, 2048) float64 pool3 features on the CPU; raises
    InceptionUnavailableError when the packages or weights are not already on this machine.

    The weights file is checked first and handed over by path, so torch-fidelity's download branch
    (which would block or fail without a network) is never reached.
    """
    weights = inception_weights_path()
    if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("torchmetrics") is None:
        raise _unavailable("the packages torchmetrics and torch-fidelity are not installed")
    if not weights.is_file():
        raise _unavailable(f"the weights file {weights} does not exist")
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=os.fspath(weights)).to(device)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:  # Inception expects RGB; grey images are repeated over channels
            images = images.expand(-1, 3, -1, -1)
        return net(images.to(device).contiguous()).double().cpu()

    return features
