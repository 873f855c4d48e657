"""A small CNN digit classifier whose penultimate activations serve as FID/KID features on digit data.

Inception-v3 features (ImageNet photographs at 299 px) say little about 16-32 px grey digits; a
classifier trained on the domain itself gives features that separate what matters there (which
digit, stroke shape), the approach of e.g. Lucic et al. 2018 and the "FID on MNIST" variants.
Two stride-2 conv stages, then a fixed 4x4 pool so the head does not depend on the resolution (8-64 px).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _block(cin: int, cout: int) -> list:
    # Strided convs, not conv + max-pool: ~10x cheaper on CPUs, where the net is trained on first use.
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DomainClassifier(nn.Module):
    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 32, feat_dim: int = 128):
        super().__init__()
        if resolution < 4:
            raise ValueError(f"DomainClassifier needs images of at least 4 px, got {resolution}.")
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.width, self.feat_dim = width, feat_dim
        self.body = nn.Sequential(*_block(channels, width), *_block(width, 2 * width), nn.AdaptiveAvgPool2d(4))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, feat_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feat_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feat_dim) penultimate activations."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
