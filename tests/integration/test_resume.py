"""Resume is exact: N iterations + resume + N more == 2N uninterrupted, for weights, G_ema,
optimiser states, counters and the data position."""
import csv

import torch

from trainer.build import train
from trainer.checkpointing import load_checkpoint


def _state(path):
    ckpt = load_checkpoint(path)
    return ckpt["state_dict"], ckpt["optimizer_states"], ckpt["genscale"]


def _assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


def _check_resume(tmp_path, experiment, n, extra):
    common = [f"logging.root={tmp_path}", "trainer.progress_bar=false", "logging.wandb=false",
              "trainer.deterministic=true", f"trainer.checkpoint.every_n_iters={n}",
              "trainer.sample_every=0", "trainer.log_every=1", *extra]
    full = train(experiment, common + [f"trainer.max_iters={2 * n}", "logging.run_id=full"])
    half = train(experiment, common + [f"trainer.max_iters={n}", "logging.run_id=half"])
    resumed = train(None, [f"resume={half.run_dir}", f"trainer.max_iters={2 * n}"])
    assert resumed.run_dir == half.run_dir
    sd_full, opt_full, meta_full = _state(full.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    sd_res, opt_res, meta_res = _state(resumed.run_dir / "checkpoints" / f"iter-{2 * n:07d}.ckpt")
    assert meta_full["iteration"] == meta_res["iteration"] == 2 * n
    assert meta_full["images_seen"] == meta_res["images_seen"]
    assert any(k.startswith("G_ema.") for k in sd_full)
    _assert_same(sd_full, sd_res, "state_dict")
    _assert_same(opt_full, opt_res, "optimizer_states")
    # the CSV history survives the resume: every iteration logged once, in order
    with open(resumed.run_dir / "metrics.csv") as fh:
        its = [int(float(r["iteration"])) for r in csv.DictReader(fh)]
    assert its == list(range(1, 2 * n + 1))
    # the halfway state really differs from the end state (the test would catch a no-op resume)
    sd_half, _, _ = _state(half.run_dir / "checkpoints" / f"iter-{n:07d}.ckpt")
    assert not torch.equal(sd_half["G.fc.weight"], sd_full["G.fc.weight"])


def test_resume_exact_vanilla_with_batchnorm_and_ema(tmp_path):
    _check_resume(tmp_path, "gan_digits", 6, ["ema.rampup_iters=4", "ema.start_iter=2"])


def test_resume_exact_wgan_gp_with_critic_steps_and_accumulation(tmp_path):
    _check_resume(tmp_path, "gan_digits", 4, ["loss.name=wgan_gp", "model.d_norm=layer", "optim.n_critic=3",
                                              "optim.accumulate=2", "data.hflip=true"])


def test_resume_from_an_older_checkpoint_supersedes_later_evaluations(tmp_path):
    """resume=auto falls back to iteration 2 when iteration 4's checkpoint is torn: metrics.csv drops the
    rows after 2, and eval.jsonl's evaluation of iteration 4 moves to eval.superseded.jsonl."""
    import json as _json

    from trainer.build import train

    common = [f"logging.root={tmp_path}", "trainer.progress_bar=false", "logging.wandb=false",
              "logging.run_id=e", "trainer.checkpoint.every_n_iters=2", "trainer.sample_every=0"]
    run = train("gan_digits", common + ["trainer.max_iters=4"])
    log = run.run_dir / "eval.jsonl"
    log.write_text("".join(_json.dumps({"iteration": i, "fid": float(i)}) + "\n" for i in (2, 4)))
    ckpt4 = run.run_dir / "checkpoints" / "iter-0000004.ckpt"
    ckpt4.write_bytes(ckpt4.read_bytes()[:1000])  # torn (last.ckpt, a hard link to it, too)
    train("gan_digits", common + ["trainer.max_iters=4", "resume=auto"])
    assert [_json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [2]
    assert [_json.loads(x)["iteration"] for x in (run.run_dir / "eval.superseded.jsonl").read_text().splitlines()] == [4]
