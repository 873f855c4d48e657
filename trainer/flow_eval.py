"""Sampling and held-out bits/dim of flow checkpoints (genscale.kind == "flow").

Protocol of `genscale eval` on a flow: the mean bits/dim of the run's held-out 'val' split (or its
first `num` images), at the run's flow.n_bits and resolution, with fresh uniform dequantisation
noise from a generator seeded by `seed`, evaluated with the EMA flow when the run kept one and
`use_ema` and eval.use_ema allow it. Lower is better; 8-bit and 5-bit numbers are not comparable.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from trainer.checkpointing import CheckpointError, load_checkpoint
from trainer.config import ConfigError
from trainer.csv_log import append_row
from trainer.images import save_grid


def is_flow_checkpoint(ckpt: dict) -> bool:
    return ckpt["genscale"].get("kind") == "flow"


def load_flow_module(ckpt, data=None):
    """FlowModule exactly as trainer.build.build_module builds it, with the checkpoint's weights (eval
    mode, on the GPU when there is one). ``data``: the run's val split (channels, classes)."""
    from trainer.evaluate import _device, _run_data
    from trainer.flow_module import FlowModule, glow_from_config

    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    cfg = ckpt["genscale"]["config"]
    data = data if data is not None else _run_data(cfg, "val")
    module = FlowModule(glow_from_config(cfg, data.channels, cfg["data"]["resolution"], data.num_classes), cfg)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"The checkpoint's flow weights do not fit model '{cfg['model']['name']}' as its "
                              f"config describes it ({str(e).splitlines()[0][:200]}).") from None
    return module.to(_device()).eval()


def flow_sample_grid(ckpt, num: int = 64, out="samples.png", seed: int = 0, use_ema: bool = True,
                     temperatures: Optional[Sequence[float]] = None, label: Optional[int] = None) -> List[Path]:
    """One PNG grid of `num` samples per temperature (default flow.sample_temperature), all from the
    same seeded standard-normal noise. Several temperatures: files <out stem>_T<t>.png."""
    if num <= 0:
        raise ConfigError(f"--num must be positive, got {num}.")
    module = load_flow_module(ckpt)
    temps = list(temperatures) if temperatures else [float(module.cfg["flow"]["sample_temperature"])]
    if any(t < 0 for t in temps):
        raise ConfigError(f"--temperature must be non-negative, got {temps}.")
    y = None
    if label is not None:
        if not module.glow.num_classes:
            raise ConfigError("--class needs a class-conditional flow (flow.class_conditional=true on labelled data).")
        if not 0 <= label < module.glow.num_classes:
            raise ConfigError(f"--class must be in 0..{module.glow.num_classes - 1}, got {label}.")
        y = torch.full((num,), label, dtype=torch.long, device=module.device)
    # Noise drawn on the CPU so a seed gives the same images on any device.
    eps = torch.randn(num, module.n_dims, generator=torch.Generator().manual_seed(seed))
    out = Path(out)
    paths = []
    for t in temps:
        images = module.sample_images(num, t, y, use_ema=use_ema, eps=eps.to(module.device)).cpu()
        path = out if len(temps) == 1 else out.with_name(f"{out.stem}_T{t:g}{out.suffix or '.png'}")
        paths.append(save_grid(images, path))
    return paths


def evaluate_flow_checkpoint(checkpoint, num: Optional[int] = None, seed: int = 0, use_ema: bool = True,
                             batch_size: int = 256) -> dict:
    """Held-out bits/dim of a flow checkpoint; appended to <run>/eval.jsonl and metrics.csv."""
    from trainer.evaluate import _run_data

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    cfg = ckpt["genscale"]["config"]
    val = _run_data(cfg, "val")
    n = min(num or cfg["eval"]["num_samples"], len(val))
    if n < 1:
        raise ConfigError(f"bits/dim needs at least one held-out image, got {n}.")
    module = load_flow_module(ckpt, val)
    ema = bool(use_ema and cfg["eval"]["use_ema"] and module.glow_ema is not None)
    t0 = time.perf_counter()
    bpd = module.evaluate_bpd(val.images[:n], val.labels[:n], use_ema=ema, batch_size=batch_size, seed=seed)
    result = {
        "bpd": bpd,
        "protocol": {"metric": "bits/dim (discrete, of the n_bits-quantised data)", "n_bits": module.n_bits,
                     "split": "val", "num_images": n, "num_val": len(val), "resolution": cfg["data"]["resolution"],
                     "dataset": cfg["data"]["name"], "ema": ema, "dequantisation": "uniform, fresh per image",
                     "dequantisation_seed": seed},
        "iteration": int(ckpt["genscale"]["iteration"]),
        "kimg": int(ckpt["genscale"]["images_seen"]) / 1000.0,
        "checkpoint": str(ckpt["_path"]),
        "seconds": round(time.perf_counter() - t0, 3),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    run_dir = Path(ckpt["_path"]).resolve().parent.parent
    if (run_dir / "config.yaml").exists():
        with open(run_dir / "eval.jsonl", "a") as fh:  # one write of one line
            fh.write(json.dumps(result) + "\n")
        tag = "eval" if ema or module.glow_ema is None else "eval_raw"
        append_row(run_dir / "metrics.csv", {"step": result["iteration"], "iteration": result["iteration"],
                                             f"{tag}/bpd": bpd})
    return result


@torch.no_grad()
def flow_interpolate(ckpt, a: int, b: int, num: int = 8, out="interpolation.png", seed: int = 0,
                     use_ema: bool = True) -> Path:
    """A row of `num` images decoded from (1 - w) z(x_a) + w z(x_b), w = 0..1, where x_a and x_b are
    the held-out images number a and b (dequantised with noise seeded by `seed`) and z is every
    level's latent (reusing the factored-out latents, so the endpoints reconstruct x_a and x_b)."""
    from trainer.evaluate import _run_data

    if num < 2:
        raise ConfigError(f"--num must be at least 2 for an interpolation, got {num}.")
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    val = _run_data(ckpt["genscale"]["config"], "val")
    for i in (a, b):
        if not 0 <= i < len(val):
            raise ConfigError(f"--interpolate takes indices of held-out images in 0..{len(val) - 1}, got {i}.")
    module = load_flow_module(ckpt, val)
    g = torch.Generator(device=module.device).manual_seed(seed)
    xa, xb = module.prep(val.images[a:a + 1], g), module.prep(val.images[b:b + 1], g)
    x = module.eval_net(use_ema).interpolate(xa, xb, torch.linspace(0, 1, num))
    return save_grid((2.0 * x.float()).clamp(-1, 1).cpu(), out)
