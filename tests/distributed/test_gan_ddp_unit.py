"""Fast checks of the gan_ddp wiring (no processes started)."""
import pytest
import torch

from tests.conftest import tiny
from trainer.build import _strategy, launched_follower, make_run_dir
from trainer.config import ConfigError, load_config
from trainer.strategies.gan_ddp import GANDDPStrategy, _buckets

RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "GENSCALE_RUN_ID",
             "SLURM_JOB_ID")


@pytest.fixture
def no_launcher_env(monkeypatch):
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def _t(*overrides):
    return load_config("gan_digits", list(overrides)).trainer


def test_auto_picks_gan_ddp_for_several_processes_only():
    assert _strategy(_t("trainer.accelerator=cpu", "trainer.devices=1")) == "auto"
    s = _strategy(_t("trainer.accelerator=cpu", "trainer.devices=2", "trainer.dist_timeout_s=7"))
    assert isinstance(s, GANDDPStrategy) and s._timeout.total_seconds() == 7
    assert isinstance(_strategy(_t("trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2")), GANDDPStrategy)
    assert isinstance(_strategy(_t("trainer.strategy=gan_ddp")), GANDDPStrategy)
    assert _strategy(_t("trainer.strategy=ddp_find_unused_parameters_true")) == "ddp_find_unused_parameters_true"


def test_plain_ddp_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="trainer.strategy=gan_ddp"):
        _strategy(_t("trainer.strategy=ddp"))
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        _strategy(_t("trainer.strategy=gan_ddp", "trainer.dist_timeout_s=0"))


def test_gan_ddp_is_a_registered_lightning_strategy_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry.get("gan_ddp").__class__ is GANDDPStrategy


def test_buckets_group_by_dtype_and_respect_the_cap():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(10)]
    assert sorted(map(sorted, _buckets(ts, cap_bytes=80))) == [[0, 1], [2], [3]]
    assert sorted(map(sorted, _buckets(ts, cap_bytes=10))) == [[0], [1], [2], [3]]  # oversize tensors alone


def test_followers_join_rank0s_run_directory(tmp_path, no_launcher_env):
    mp = no_launcher_env
    assert not launched_follower()
    cfg = load_config("gan_digits", tiny(tmp_path, "logging.run_id=shared"))
    lead, fresh = make_run_dir(cfg)
    assert fresh and lead.is_dir()  # rank 0 claimed it
    (lead / "config.yaml").write_text("x")
    mp.setenv("RANK", "1")
    assert launched_follower()
    # an existing run directory is not an error for rank 1: rank 0 wrote it (and rank 1 never owns it)
    assert make_run_dir(load_config("gan_digits", tiny(tmp_path, "logging.run_id=shared"))) == (lead, False)
    with pytest.raises(ConfigError, match="logging.run_id"):
        make_run_dir(load_config("gan_digits", tiny(tmp_path)))
    mp.delenv("RANK")
    mp.setenv("LOCAL_RANK", "1")
    mp.setenv("GENSCALE_RUN_ID", "shared")  # what rank 0 exports before Lightning starts the other ranks
    assert make_run_dir(load_config("gan_digits", tiny(tmp_path))) == (lead, False)


def test_two_runs_starting_at_once_never_share_a_fresh_directory(tmp_path, no_launcher_env, monkeypatch):
    """Timestamp ids of the same second: the second run takes '-1' at once (it used to take the same
    directory until the first had written config.yaml), and a named id that exists is never owned."""
    import trainer.build as build

    monkeypatch.setattr(build, "default_run_id", lambda: "20261127-120000")
    a, fresh_a = make_run_dir(load_config("gan_digits", tiny(tmp_path)))
    b, fresh_b = make_run_dir(load_config("gan_digits", tiny(tmp_path)))
    assert (a.name, b.name, fresh_a, fresh_b) == ("20261127-120000", "20261127-120000-1", True, True)
    named, fresh = make_run_dir(load_config("gan_digits", tiny(tmp_path, "logging.run_id=20261127-120000")))
    assert named == a and not fresh  # taken by the first run (no config.yaml yet): joined, never removed


def test_resume_with_another_world_size_is_refused(tmp_path, no_launcher_env):
    from trainer.build import prepare_run, train
    from trainer.checkpointing import CheckpointError, load_checkpoint

    run = train("gan_digits", tiny(tmp_path, "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_iters=2",
                                   "trainer.sample_every=0", "data.batch_size=16"))
    assert load_checkpoint(run.run_dir)["genscale"]["world_size"] == 1
    with pytest.raises(CheckpointError, match=r"written by 1 process\(es\) and this resume would run 2"):
        prepare_run(None, [f"resume={run.run_dir}", "trainer.accelerator=cpu", "trainer.devices=2"])
    prepare_run(None, [f"resume={run.run_dir}", "trainer.max_iters=4"])  # same world size: accepted
