"""worker.py with wandb.init recorded: each call appends "<rank> <pid>" to OUT/wandb_inits.log."""
import os
import runpy
import sys
from pathlib import Path

import wandb

_init = wandb.init


def _recording_init(*args, **kwargs):
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("LOCAL_RANK", 0))
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "wandb_inits.log", "a") as fh:
        fh.write(f"{rank} {os.getpid()}\n")
    return _init(*args, **kwargs)


wandb.init = _recording_init
runpy.run_path(str(Path(__file__).with_name("worker.py")), run_name="__main__")
