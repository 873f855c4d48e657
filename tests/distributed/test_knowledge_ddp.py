"""2-process gloo: teacher weights, the flow term's and the IRL loss's gradients (averaged over ranks as
DDP does) equal one process on the gathered batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.knowledge.constraints import LinearConstraint
from trainer.knowledge.teacher import importance_teacher, irl_loss, weighted_nll_term

N, WORLD, LAM = 8, 2, 1.5


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * N, 3, generator=g), torch.randn(2 * N, 3, generator=g), torch.randn(3, generator=g)


def compute(x_model, x_data, theta_init, average: bool):
    """Teacher weights, d(flow term)/d(theta) and d(IRL loss)/d(phi) (theta and phi shared by the ranks)."""
    f = LinearConstraint(3)
    with torch.no_grad():
        f.phi.copy_(torch.tensor([0.5, -0.3, 0.8]))
    theta = theta_init.clone().requires_grad_(True)
    s = LAM * f(x_model).detach()
    term, teacher = weighted_nll_term((x_model @ theta) ** 2, s, alpha=0.7)
    term.backward()
    irl_loss(f(x_data), f(x_model), LAM).backward()
    grads = [theta.grad.clone(), f.phi.grad.clone()]
    if average:  # what DDP does to the gradients of shared parameters
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
    return (teacher.w, *grads)


def worker(rank: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_model, x_data, theta = batch()
        sl = slice(rank * N, (rank + 1) * N)
        w, g_theta, g_phi = compute(x_model[sl], x_data[sl], theta, average=True)
        if rank == 0:
            torch.save({"w": w, "g_theta": g_theta, "g_phi": g_phi}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_gathered_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    x_model, x_data, theta = batch()
    w, g_theta, g_phi = compute(x_model, x_data, theta, average=False)
    assert torch.allclose(got["w"], w, atol=1e-7)
    assert torch.allclose(got["w"], importance_teacher(LAM * x_model @ torch.tensor([0.5, -0.3, 0.8])).w, atol=1e-6)
    assert torch.allclose(got["g_theta"], g_theta, atol=1e-6)
    assert torch.allclose(got["g_phi"], g_phi, atol=1e-6)


def test_flow_knowledge_trains_on_two_ranks_at_temperature_one(tmp_path):
    """The callback's diagnostics gather every rank's samples: at T = 1 the tempered log-ratio is a
    0-dim zero, which crashed the gather on two ranks at the first step. Both temperatures train, and
    the logged log Z respects Jensen's bound against lambda E_p f."""
    import csv
    import json

    from tests.conftest import tiny
    from tests.distributed.helpers import finish_all, start_ranks

    for t in ("1.0", "0.8"):
        common = tiny(tmp_path, "trainer.accelerator=cpu", "trainer.max_iters=3", "trainer.checkpoint.every_n_iters=3",
                      "trainer.sample_every=0", "trainer.log_every=1", "knowledge.enabled=true",
                      "knowledge.constraint=symmetry", "knowledge.lam=2", f"knowledge.temperature={t}")
        finish_all(start_ranks(tmp_path / f"t{t}", "glow_digits", *common, f"logging.run_id=t{t}"))
        run_dir = json.loads((tmp_path / f"t{t}" / "rank0.json").read_text())["run_dir"]
        with open(f"{run_dir}/metrics.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("knowledge/log_z")]
        assert len(rows) == 3, t
        for r in rows:
            assert float(r["knowledge/log_z"]) >= 2 * float(r["knowledge/f_student"]) - 1e-5
