"""Worker processes forked from a server that has already imported the heavy libraries.

Each worker of the distributed tests is its own process (its own gloo rank, checkpoint writes and
exit code), but starting one with `python worker.py` costs about 9 s of CPU importing torch, Lightning
(which imports torchmetrics and scipy) and DeepSpeed. On the 2-core CI machine that was most of a
two-rank test. multiprocessing's forkserver imports them once (this module, as its preload) and forks
each worker from there. Only third-party libraries are preloaded: genscale's own modules are
imported fresh in every worker, after its environment is set, as in a real launch.
"""
import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: no OpenMP team exists in the server when it forks

import deepspeed  # noqa: E402,F401
import lightning  # noqa: E402,F401
import omegaconf  # noqa: E402,F401
import torch  # noqa: E402,F401
import wandb  # noqa: E402,F401
import webdataset  # noqa: E402,F401
