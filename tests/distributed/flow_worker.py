"""One rank of a 2-process CPU DDP FlowModule run (started by test_flow_ddp.py with torchrun-style env).

Each rank trains on different data (rank 1 sees brightened digits), saves its parameters right after
the ActNorm init and after the last step, and the test compares the ranks."""
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from data_pipelines.builtin import load_split
from models.glow import Glow
from trainer.flow_module import FlowModule, glow_from_config, merge_config


def main(out: str, steps: int) -> None:
    torch.set_num_threads(1)
    rank = int(__import__("os").environ["LOCAL_RANK"])
    d = load_split("digits", "train", 8)
    images = d.images[rank::2][:128]
    if rank == 1:  # deliberately different data, so a per-rank init would give different parameters
        images = (images.int() // 2 + 120).to(torch.uint8)
    cfg = merge_config({"flow": {"levels": 2, "steps": 2, "hidden": 16, "optimizer": "adam", "lr": 1e-3,
                                 "warmup_images": 64}, "trainer": {"max_iters": steps}})
    torch.manual_seed(0)  # same construction on both ranks (DDP would broadcast rank 0's anyway)
    module = FlowModule(glow_from_config(cfg, 1, 8), cfg)
    orig = Glow.initialize_actnorm

    def init_and_save(self, *a, **k):
        orig(self, *a, **k)
        torch.save({n: p.detach().clone() for n, p in self.named_parameters()}, f"{out}/init_rank{rank}.pt")
        torch.save(a[0].detach().clone(), f"{out}/init_batch_rank{rank}.pt")  # this rank's dequantised batch

    Glow.initialize_actnorm = init_and_save
    loader = DataLoader(TensorDataset(images, d.labels[rank::2][:128].long()), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(rank))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, loader)
    torch.save({n: p.detach().clone() for n, p in module.glow.named_parameters()}, f"{out}/final_rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
