"""Config name -> network builder. Builders take plain keyword arguments and return (G, D)."""
from __future__ import annotations

import inspect
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
    """Builds (G, D). Keyword arguments a builder does not take are dropped, so callers can pass the
    whole model config section (architecture-specific keys such as attention_res) to any builder."""
    if name not in MODELS:
        raise KeyError(f"Unknown model '{name}'. Valid models: {', '.join(sorted(MODELS))}.")
    fn = MODELS[name]
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


from models import biggan, dcgan, pgan  # noqa: E402,F401  (registers their builders)
