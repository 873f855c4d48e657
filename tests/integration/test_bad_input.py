"""Bad input gets a short, specific error and loses nothing."""
import math
import shutil

import pytest
import torch

from launch.cli import main
from trainer.build import prepare_run, train
from trainer.checkpointing import load_checkpoint
from trainer.config import ConfigError
from trainer.finite import device_check_possible
from trainer.gan_module import NonFiniteLossError
from trainer.losses import GANLoss, ns_d, ns_g


def _base(tmp_path):
    return [f"logging.root={tmp_path}", "trainer.progress_bar=false", "logging.wandb=false", "trainer.sample_every=0"]


def test_cli_reports_config_errors_without_making_a_run(tmp_path, capsys):
    assert main(["train", "gan_digits", *_base(tmp_path), "optim.n_critc=2"]) == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'optim.n_critic'".replace("n_critic", "n_critc") in err and "optim.n_critic" in err
    assert "command-line argument" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_missing_data_path_fails_before_any_run_dir(tmp_path, capsys):
    assert main(["train", "gan_digits", *_base(tmp_path), "data.name=npz", f"data.path={tmp_path}/nope.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "gan_digits").exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    args = ["train", "gan_digits", *_base(tmp_path), "trainer.max_iters=2", "logging.run_id=r1"]
    assert main(args) == 0
    before = (tmp_path / "gan_digits" / "r1" / "checkpoints" / "last.ckpt").read_bytes()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "gan_digits" / "r1" / "checkpoints" / "last.ckpt").read_bytes() == before


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_a_resume_never_overwrites_a_later_checkpoint_and_branches_on_request(tmp_path, capsys):
    args = ["train", "gan_digits", *_base(tmp_path), "trainer.checkpoint.every_n_iters=2",
            "trainer.checkpoint.save_top_k=-1"]
    assert main([*args, "trainer.max_iters=6", "logging.run_id=r"]) == 0
    run = tmp_path / "gan_digits" / "r"
    before = _snapshot(run)
    old = run / "checkpoints" / "iter-0000002.ckpt"
    assert main(["train", f"resume={old}", "trainer.max_iters=4"]) == 2
    err = capsys.readouterr().err
    assert "later checkpoints (iter-0000004.ckpt, iter-0000006.ckpt)" in err and "logging.run_id=NAME" in err
    assert _snapshot(run) == before
    # a branch: iteration 2 continued in a new run directory, the original untouched
    assert main(["train", f"resume={old}", "trainer.max_iters=2", "logging.run_id=b"]) == 2  # nothing to train
    assert "would train nothing" in capsys.readouterr().err and not (tmp_path / "gan_digits" / "b").exists()
    assert main(["train", f"resume={old}", "trainer.max_iters=4", "logging.run_id=b"]) == 0
    branch = tmp_path / "gan_digits" / "b"
    assert load_checkpoint(branch)["genscale"]["iteration"] == 4 and (branch / "config.yaml").exists()
    assert _snapshot(run) == before
    # a checkpoint outside any run directory: no run to write into unless named
    loose = tmp_path / "loose" / "x.ckpt"
    loose.parent.mkdir()
    shutil.copy(old, loose)
    assert main(["train", f"resume={loose}", "trainer.max_iters=3"]) == 2
    assert "not inside a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan_digits", "loose"]
    assert main(["train", f"resume={loose}", "trainer.max_iters=3", "logging.run_id=c"]) == 0
    assert load_checkpoint(tmp_path / "gan_digits" / "c")["genscale"]["iteration"] == 3


def test_a_resume_that_changes_the_architecture_is_refused_before_writing(tmp_path, capsys):
    assert main(["train", "gan_digits", *_base(tmp_path), "trainer.max_iters=2", "logging.run_id=r"]) == 0
    run = tmp_path / "gan_digits" / "r"
    before = _snapshot(run)
    assert main(["train", f"resume={run}", "trainer.max_iters=4", "model.g_width=12"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the networks this resume builds" in err and "Traceback" not in err
    assert _snapshot(run) == before  # no config.resume-*.yaml either


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_bad_checkpoint_for_resume_sample_eval(tmp_path, capsys, damage):
    run = train("gan_digits", _base(tmp_path) + ["trainer.max_iters=2"])
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        data = (run.run_dir / "checkpoints" / "last.ckpt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = "truncated or corrupt"
    else:
        torch.save({"model": {"w": torch.zeros(2)}}, bad)
        expected = "not a genscale checkpoint"
    snapshot = sorted(p.name for p in run.run_dir.rglob("*"))
    for argv in (["train", f"resume={bad}"], ["sample", str(bad), "--out", str(tmp_path / "s.png")],
                 ["eval", str(bad)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in run.run_dir.rglob("*")) == snapshot


class _NaNAfter:
    """D loss that turns NaN from a given D step on (for `count` steps, or forever)."""

    def __init__(self, module, start, count=10**9):
        self.module, self.start, self.count = module, start, count

    def __call__(self, real, fake):
        loss = ns_d(real, fake)
        step = int(self.module.d_steps)
        return loss * math.nan if self.start <= step < self.start + self.count else loss


def test_transient_nonfinite_steps_are_skipped_and_counted(tmp_path):
    run = prepare_run("gan_digits", _base(tmp_path) + ["trainer.max_iters=8", "trainer.max_nonfinite=5"])
    run.module.loss = GANLoss(_NaNAfter(run.module, start=3, count=2), ns_g)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert int(run.module.nonfinite_total) == 2 and int(run.module.iteration) == 8
    assert all(torch.isfinite(p).all() for p in run.module.D.parameters())


def test_persistent_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = prepare_run("gan_digits", _base(tmp_path) + ["trainer.max_iters=50", "trainer.max_nonfinite=3",
                                                       "trainer.checkpoint.every_n_iters=4"])
    run.module.loss = GANLoss(_NaNAfter(run.module, start=10), ns_g)
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 consecutive steps"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpt = load_checkpoint(run.run_dir)
    # the newest checkpoint on disk was written before the stop, with finite weights: the skipped
    # D steps left D untouched, so the run is resumable from it
    assert 8 <= ckpt["genscale"]["iteration"] <= int(run.module.iteration) < 50
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not list((run.run_dir / "checkpoints").glob(".*tmp*"))


FUSED = ["optim.g.impl=fused", "optim.d.impl=fused"]


def _nan_run(tmp_path, run_id, extra, start, count=10**9):
    run = prepare_run("gan_digits", _base(tmp_path) + [f"logging.run_id={run_id}", "model.g_width=8",
                                                       "model.d_width=8", "data.batch_size=16", *extra])
    run.module.loss = GANLoss(_NaNAfter(run.module, start=start, count=count), ns_g)
    return run


def test_fused_optimisers_skip_nonfinite_steps_on_the_device_like_the_host_check(tmp_path):
    """trainer.finite_check=auto with fused Adam decides the skip on the device (found_inf): the run
    must end with the same weights, Adam state and skip count as the host decision, bit for bit."""
    finals = {}
    for check in ("host", "auto"):
        run = _nan_run(tmp_path, check, FUSED + ["trainer.max_iters=8", "trainer.max_nonfinite=5",
                                                 f"trainer.finite_check={check}"], start=3, count=2)
        run.trainer.fit(run.module, datamodule=run.datamodule)
        m = run.module
        assert device_check_possible(m, m.optimizers()[1]) == (check == "auto")
        assert int(m.nonfinite_total) == 2 and m.count("nonfinite_total") == 2 and int(m.iteration) == 8
        opt_d = m.optimizers(use_pl_optimizer=False)[1]
        # the skipped D steps did not count: 8 D steps taken, 2 skipped
        assert {float(st["step"]) for st in opt_d.state.values()} == {6.0}
        finals[check] = ({k: v.clone() for k, v in m.state_dict().items()},
                         [st["exp_avg_sq"].clone() for st in opt_d.state.values()])
    (w_host, v_host), (w_dev, v_dev) = finals["host"], finals["auto"]
    assert all(torch.equal(w_host[k], w_dev[k]) for k in w_host)
    assert all(torch.equal(a, b) for a, b in zip(v_host, v_dev))
    assert all(torch.isfinite(v).all() for v in w_dev.values() if v.is_floating_point())


def test_fused_optimisers_stop_a_nonfinite_streak_at_the_next_log_check(tmp_path):
    run = _nan_run(tmp_path, "streak", FUSED + ["trainer.max_iters=50", "trainer.max_nonfinite=3",
                                                "trainer.log_every=4"], start=10)
    # D steps 10, 11, ... (iterations 11, 12, ...) are non-finite: the streak reaches 3 at iteration 13,
    # and the check at iteration 16 (a multiple of log_every) finds 6 and stops the run there
    with pytest.raises(NonFiniteLossError, match=r"non-finite for the last 6 consecutive steps, "
                                                 r"found at iteration 16 \(6 skipped"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    m = run.module
    assert int(m.iteration) == 16 and all(torch.isfinite(p).all() for p in m.D.parameters())


def test_gpu_count_that_does_not_match_the_machine_or_allocation(tmp_path, capsys, monkeypatch):
    import torch

    from trainer.build import check_devices
    from trainer.config import load_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    rc = main(["train", "gan_digits", "trainer.accelerator=gpu", "trainer.devices=2", f"logging.root={tmp_path}"])
    err = capsys.readouterr().err
    assert rc != 0 and "has 0 CUDA GPU(s)" in err and "trainer.accelerator=cpu" in err
    assert not (tmp_path / "gan_digits").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="at most 4"):
        check_devices(load_config("gan_digits", ["trainer.accelerator=gpu", "trainer.devices=8"]).trainer)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError, match="--ntasks-per-node=2"):
        check_devices(load_config("gan_digits", ["trainer.accelerator=gpu", "trainer.devices=4"]).trainer)
    check_devices(load_config("gan_digits", ["trainer.accelerator=gpu", "trainer.devices=2"]).trainer)  # matches


def test_a_run_directory_without_checkpoint_points_to_resume_auto(tmp_path, capsys):
    """A run killed before its first checkpoint leaves config.yaml only: `resume=<dir>` could not load
    anything, so the message names resume=auto (which starts it again in place)."""
    (tmp_path / "gan_digits" / "r2").mkdir(parents=True)
    (tmp_path / "gan_digits" / "r2" / "config.yaml").write_text("x: 1\n")
    assert main(["train", "gan_digits", *_base(tmp_path), "trainer.max_iters=2", "logging.run_id=r2"]) == 2
    assert "wrote no checkpoint" in capsys.readouterr().err
    assert main(["train", "gan_digits", *_base(tmp_path), "trainer.max_iters=2", "logging.run_id=r2",
                 "resume=auto"]) == 0


def test_class_consistency_on_an_unconditional_model_is_refused_before_anything_is_written(tmp_path, capsys):
    """Refused with a short error before the run directory is made and before the constraint's own
    classifier is trained (it was a traceback from inside fit)."""
    assert main(["train", "gan_digits", *_base(tmp_path), "knowledge.enabled=true",
                 "knowledge.constraint=class_consistency"]) == 2
    err = capsys.readouterr().err
    assert "class_consistency needs a class-conditional model" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_a_class_conditional_flow_on_unlabelled_data_is_refused(tmp_path, capsys):
    """flow.class_conditional=true is a request: on data without labels it used to train an unconditional
    flow while config.yaml said class_conditional: true."""
    import numpy as np

    np.savez(tmp_path / "u.npz", images=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    assert main(["train", "glow_digits", *_base(tmp_path), "data.name=npz", f"data.path={tmp_path}/u.npz",
                 "flow.class_conditional=true"]) == 2
    assert "flow.class_conditional=true needs labelled data" in capsys.readouterr().err
    assert not (tmp_path / "glow_digits").exists()


def test_a_missing_shard_directory_is_named_as_such(tmp_path, capsys):
    assert main(["train", "gan_digits", *_base(tmp_path), "data.name=shards", f"data.path={tmp_path}/nope"]) == 2
    assert f"data.path='{tmp_path}/nope' does not exist" in capsys.readouterr().err


def test_a_closed_pipe_ends_a_listing_quietly(tmp_path):
    """`genscale list | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    from tests.distributed.helpers import REPO, clean_env

    proc = subprocess.run(f"{sys.executable} -m launch.cli list all | head -1", shell=True, cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "models:" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_a_directory_made_for_a_slurm_script_is_not_trained_into(tmp_path, capsys):
    """`genscale launch slurm` writes launch.sbatch into the run directory; a plain `genscale train` with
    that run id would start the run there with other process counts before the job does."""
    assert main(["launch", "slurm", "gan_digits", *_base(tmp_path), "logging.run_id=sl1"]) == 0
    capsys.readouterr()
    assert main(["train", "gan_digits", *_base(tmp_path), "logging.run_id=sl1"]) == 2
    assert "sbatch" in capsys.readouterr().err and not (tmp_path / "gan_digits" / "sl1" / "config.yaml").exists()


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    """Only a closed stdout ends quietly; a BrokenPipeError from anything else (a loader worker, a pipe:
    shard) is an error and propagates."""
    import launch.cli as cli

    def broken(args):
        raise BrokenPipeError("a pipe: shard's process went away")

    monkeypatch.setattr(cli, "cmd_list", broken)
    with pytest.raises(BrokenPipeError, match="shard"):
        cli.main(["list"])
