"""Config name -> network builder. Builders take plain keyword arguments and return (G, D)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch.nn as nn

MODELS: Dict[str, Callable[..., Tuple[nn.Module, nn.Module]]] = {}
DESCRIPTIONS: Dict[str, str] = {}


def register(name: str, description: str):
    def deco(fn):
        MODELS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return deco


def build_gan(name: str, **kwargs) -> Tuple[nn.Module, nn.Module]:
    if name not in MODELS:
        raise KeyError(f"Unknown model '{name}'. Valid models: {', '.join(sorted(MODELS))}.")
    return MODELS[name](**kwargs)


from models import dcgan  # noqa: E402,F401  (registers its builders)
