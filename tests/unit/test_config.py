"""Strict config loading: layers, error messages that name the source and the fix, validation."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest

from trainer.config import (CHOICES, DEFAULT_EXPERIMENT, ConfigError, GenscaleConfig, describe_fields,
                            list_experiments, load_config, valid_keys)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# ---- what ships validates ----------------------------------------------------------------------


def test_default_experiment_loads():
    cfg = load_config()
    assert cfg.experiment == DEFAULT_EXPERIMENT
    # wgan_gp_mnist5k extends gan_mnist5k: its own keys and the parent's
    assert cfg.loss.name == "wgan_gp" and cfg.model.d_norm == "layer" and cfg.optim.n_critic == 5
    assert cfg.data.name == "mnist5k" and cfg.data.batch_size == 64  # from the parent
    assert cfg.model.g_width == 16  # its own CPU-sized width overrides the parent's 32


def test_experiment_list():
    names = list_experiments()
    assert {"gan_digits", "gan_mnist5k", "wgan_gp_mnist5k", "wgan_mnist5k"} <= set(names)
    assert DEFAULT_EXPERIMENT in names


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_validates(name):
    cfg = load_config(name)
    assert cfg.experiment == name


def test_gan_digits_chain():
    cfg = load_config("gan_digits")
    assert cfg.data.name == "digits" and cfg.data.resolution == 16 and cfg.data.batch_size == 32
    assert cfg.loss.name == "nonsaturating"            # from gan_mnist5k
    assert cfg.ema.rampup_iters == 100                  # from gan_mnist5k
    assert cfg.trainer.checkpoint.every_n_iters == 100  # nested override in gan_digits
    assert cfg.trainer.checkpoint.save_top_k == 3       # dataclass default survives the nested override
    assert list(cfg.optim.g.betas) == [0.5, 0.999]


def test_wgan_experiment_is_the_paper_schedule():
    cfg = load_config("wgan_mnist5k")
    assert cfg.loss.name == "wgan" and cfg.loss.clip == 0.01
    assert (cfg.optim.n_critic, cfg.optim.critic_boost_steps, cfg.optim.critic_boost_first,
            cfg.optim.critic_boost_every) == (5, 100, 25, 500)
    assert cfg.optim.g.name == cfg.optim.d.name == "rmsprop"


# ---- overrides ---------------------------------------------------------------------------------


def test_override_is_typed():
    cfg = load_config("gan_digits", ["trainer.max_iters=7", "optim.g.lr=0.5", "ema.enabled=false",
                                     "trainer.precision=bf16-mixed"])
    assert cfg.trainer.max_iters == 7 and type(cfg.trainer.max_iters) is int
    assert cfg.optim.g.lr == 0.5 and type(cfg.optim.g.lr) is float
    assert cfg.ema.enabled is False
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.optim.d.lr == 2e-4  # the sibling is untouched


def test_override_beats_experiment_and_later_override_wins():
    cfg = load_config("gan_digits", ["data.batch_size=16", "data.batch_size=8"])
    assert cfg.data.batch_size == 8


def test_config_is_struct_after_load():
    cfg = load_config("gan_digits")
    with pytest.raises(Exception):
        cfg.trainer.not_a_key = 1
    cfg.trainer.max_iters = 3  # but writable
    assert cfg.trainer.max_iters == 3


def test_unknown_cli_key_names_key_source_and_suggestion():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", ["trainer.max_iter=5"])
    msg = str(ei.value)
    assert "'trainer.max_iter'" in msg
    assert "command-line argument" in msg and "trainer.max_iter=5" in msg
    assert "trainer.max_iters" in msg.split("Closest valid keys:")[1]


def test_unknown_nested_cli_key_suggests_sibling():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", ["optim.g.lrr=1"])
    assert "optim.g.lrr" in str(ei.value) and "optim.g.lr" in str(ei.value).split("Closest")[1]


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("gan_digits", ["trainer.max_iters"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", ["optim.g.lr=abc"])
    msg = str(ei.value)
    assert "'optim.g.lr'" in msg and "command-line argument" in msg and "abc" in msg


def test_float_for_int_is_refused():
    with pytest.raises(ConfigError, match="trainer.seed"):
        load_config("gan_digits", ["trainer.seed=1.5"])


@pytest.mark.parametrize("key, bad", [("trainer.precision", "64"), ("model.d_norm", "instance"),
                                      ("optim.d.name", "sgd"), ("eval.features", "clip"),
                                      ("knowledge.irl_log_z", "mean")])
def test_invalid_choice_lists_valid_values(key, bad):
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", [f"{key}={bad}"])
    msg = str(ei.value)
    assert key in msg and bad in msg
    for choice in CHOICES[key]:
        assert choice in msg


def test_unknown_experiment_lists_valid_ones():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digit")
    msg = str(ei.value)
    assert "'gan_digit'" in msg
    for name in list_experiments():
        assert name in msg


@pytest.mark.parametrize("key, bad, valid", [
    ("model.name", "stylegan", ["dcgan"]),
    ("loss.name", "lsgan", ["hinge", "nonsaturating", "wgan", "wgan_gp"]),
    ("data.name", "cifar10", ["digits", "mnist5k", "npz"]),
])
def test_unknown_registry_names_list_valid_ones(key, bad, valid):
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", [f"{key}={bad}"])
    msg = str(ei.value)
    assert bad in msg and key in msg
    for v in valid:
        assert v in msg


def test_wgan_gp_with_batchnorm_critic_refused():
    with pytest.raises(ConfigError, match="d_norm"):
        load_config("wgan_gp_mnist5k", ["model.d_norm=batch"])
    with pytest.raises(ConfigError, match="BatchNorm"):
        load_config("gan_digits", ["loss.name=wgan_gp"])  # gan_digits has d_norm=batch
    assert load_config("gan_digits", ["loss.name=wgan_gp", "model.d_norm=none"]).loss.name == "wgan_gp"


def test_batch_not_divisible_by_accumulate_refused():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", ["data.batch_size=30", "optim.accumulate=4"])
    assert "data.batch_size=30" in str(ei.value) and "optim.accumulate=4" in str(ei.value)
    assert load_config("gan_digits", ["data.batch_size=32", "optim.accumulate=4"]).optim.accumulate == 4


@pytest.mark.parametrize("ov", ["trainer.max_iters=0", "data.batch_size=-1", "optim.n_critic=0",
                                "data.val_fraction=1.0", "data.val_fraction=0", "ema.decay=1.0",
                                "trainer.accelerator=tpu", "trainer.strategy=foo", "trainer.num_nodes=0",
                                "trainer.log_every=0", "data.num_workers=-1", "optim.d.lr=-1", "flow.lr=0",
                                "optim.g.betas=[0.5]", "flow.betas=[0.9,1.0]"])
def test_out_of_range_values_refused(ov):
    with pytest.raises(ConfigError, match=ov.split("=")[0]):
        load_config("gan_digits", [ov])


# ---- experiment files --------------------------------------------------------------------------


def test_typo_in_experiment_file_names_the_file(tmp_path):
    p = write(tmp_path / "typo.yaml", """\
        extends: gan_digits
        trainer:
          max_iter: 5
        """)
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    msg = str(ei.value)
    assert str(p) in msg
    assert "trainer.max_iter" in msg and "trainer.max_iters" in msg.split("Closest")[1]
    assert "command-line" not in msg


def test_typo_in_parent_file_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.yaml", """\
        extends: gan_digits
        model:
          z_dimm: 4
        """)
    child = write(tmp_path / "child.yaml", f"""\
        extends: {parent}
        trainer:
          max_iters: 3
        """)
    with pytest.raises(ConfigError) as ei:
        load_config(str(child))
    assert str(parent) in str(ei.value) and "model.z_dimm" in str(ei.value)


def test_wrong_type_in_experiment_file_names_file_and_key(tmp_path):
    p = write(tmp_path / "bad.yaml", """\
        extends: gan_digits
        data:
          batch_size: lots
        """)
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value) and "data.batch_size" in str(ei.value)


def test_extends_chain_merges(tmp_path):
    parent = write(tmp_path / "parent.yaml", """\
        extends: gan_digits
        model:
          z_dim: 12
          g_width: 24
        trainer:
          max_iters: 50
          seed: 3
        """)
    child = write(tmp_path / "child.yaml", f"""\
        extends: {parent}
        model:
          z_dim: 20
        trainer:
          max_iters: 9
        """)
    cfg = load_config(str(child))
    assert cfg.experiment == "child"
    assert cfg.model.z_dim == 20 and cfg.trainer.max_iters == 9   # child overrides parent
    assert cfg.model.g_width == 24 and cfg.trainer.seed == 3      # parent values kept
    assert cfg.data.name == "digits" and cfg.model.d_width == 16  # grandparent gan_digits
    assert cfg.loss.name == "nonsaturating"                       # great-grandparent gan_mnist5k
    assert cfg.trainer.log_every == 10                            # dataclass default
    # and the command line beats all files
    assert load_config(str(child), ["model.z_dim=5"]).model.z_dim == 5


def test_extends_cycle_is_reported(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, f"extends: {b}\n")
    write(b, f"extends: {a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(a))


def test_unparseable_yaml_names_file(tmp_path):
    p = write(tmp_path / "broken.yaml", "trainer: [unclosed\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value)


def test_resume_base_layer():
    from trainer.config import to_dict

    base = to_dict(load_config("gan_digits", ["trainer.max_iters=11"]))
    cfg = load_config(base=base, overrides=["trainer.max_iters=20"])
    assert cfg.trainer.max_iters == 20 and cfg.data.name == "digits" and cfg.experiment == "gan_digits"


def test_a_run_saved_before_pgan_fused_scale_resumes_with_the_separate_ops():
    """The fused D activates after pooling, another function: a run saved before the key existed (trained
    with the separate ops) must resume with them; new runs get the official code's default."""
    from trainer.build import gan_build_args
    from trainer.config import to_dict

    base = to_dict(load_config("pgan_mnist5k"))
    assert base["pgan"]["fused_scale"] is True and load_config(base=base).pgan.fused_scale is True
    del base["pgan"]["fused_scale"]
    cfg = load_config(base=base)
    assert cfg.pgan.fused_scale is False and "fused_scale" not in base["pgan"]
    assert gan_build_args(to_dict(cfg), 1, 10)["fused_scale"] is False
    assert load_config(base=base, overrides=["pgan.fused_scale=true"]).pgan.fused_scale is True


# ---- documentation -----------------------------------------------------------------------------


def _leaf_fields(node, prefix=""):
    for fl in dataclasses.fields(node):
        val = getattr(node, fl.name)
        if dataclasses.is_dataclass(val):
            yield from _leaf_fields(val, prefix + fl.name + ".")
        else:
            yield prefix + fl.name, fl


def test_every_field_has_a_doc():
    leaves = dict(_leaf_fields(GenscaleConfig()))
    assert len(leaves) > 40
    for key, fl in leaves.items():
        assert fl.metadata.get("doc", "").strip(), f"{key} has no doc string"


def test_describe_fields_has_a_doc_on_every_leaf_line():
    lines = describe_fields()
    leaves = [k for k, _ in _leaf_fields(GenscaleConfig())]
    leaf_lines = [ln for ln in lines if ln.startswith("  ")]
    assert len(leaf_lines) == len(leaves)
    for key, line in zip(leaves, leaf_lines):
        head, doc = line.split("): ", 1)
        assert head.strip().startswith(key + " ("), line
        assert doc.strip(), f"empty doc for {key}"
    assert any(ln.startswith("  trainer.max_iters (int, default 2000): ") for ln in lines)
    # section lines carry their doc too
    for ln in lines:
        if not ln.startswith("  "):
            assert ln.split(":", 1)[1].strip(), ln


def test_valid_keys_cover_describe_fields():
    keys = set(valid_keys())
    assert {"trainer.max_iters", "trainer.checkpoint.save_top_k", "optim.g.betas", "ema.decay"} <= keys


@pytest.mark.parametrize("experiment, overrides, message", [
    ("wgan_mnist5k", ["trainer.zero_stage=2"], "clips the critic's weights"),
    ("glow_digits", ["trainer.precision=16-mixed"], "bf16-mixed"),
    ("pgan_mnist5k", [], "growing adds layers"),
])
def test_deepspeed_refuses_what_its_engines_cannot_follow(experiment, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(experiment, ["trainer.strategy=deepspeed", *overrides])
    load_config("wgan_mnist5k", ["trainer.strategy=deepspeed", "trainer.zero_stage=0"])  # stage 0 fp32 clips fine


def test_experiment_speed_switches_give_way_to_deepspeed_but_command_line_ones_are_refused():
    shipped = load_config("biggan_imagenet128")
    assert shipped.trainer.compile == "default" and shipped.trainer.channels_last is True
    ds = load_config("biggan_imagenet128", ["trainer.strategy=deepspeed"])
    assert ds.trainer.compile == "off" and ds.trainer.channels_last is False
    assert load_config("glow_cifar10", ["trainer.strategy=deepspeed"]).trainer.compile == "off"
    with pytest.raises(ConfigError, match="Add trainer.compile=off to the command"):
        load_config("biggan_imagenet128", ["trainer.strategy=deepspeed", "trainer.compile=default"])
    with pytest.raises(ConfigError, match="Add trainer.channels_last=false"):
        load_config("gan_digits", ["trainer.strategy=deepspeed", "trainer.channels_last=true"])


@pytest.mark.parametrize("word", ["off", "false", "no"])
def test_compile_off_survives_yaml_reading_it_as_a_boolean(word, tmp_path):
    assert load_config("biggan_imagenet128", [f"trainer.compile={word}"]).trainer.compile == "off"
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"extends: glow_cifar10\ntrainer:\n  compile: {word}\n")
    assert load_config(str(exp)).trainer.compile == "off"


def test_pgan_feature_maps_that_run_out_before_the_last_resolution_are_refused():
    """fmaps at stage s are min(fmap_base / 2^s, fmap_max): at 256 px (stage 7) fmap_base 64 gives 0 maps,
    which used to surface as a ZeroDivisionError deep in the layer constructors."""
    base = ["data.resolution=256", "pgan.fade_images=[1]", "pgan.stable_images=[1]", "pgan.batch_sizes=[]"]
    with pytest.raises(ConfigError, match=r"pgan.fmap_base=64, pgan.fmap_max=8 leave no feature maps at 256 px.*"
                                          r"at least 128"):
        load_config("pgan_celebahq1024", base + ["pgan.fmap_base=64", "pgan.fmap_max=8"])
    with pytest.raises(ConfigError, match="pgan.fmap_max to at least 1"):
        load_config("pgan_celebahq1024", base + ["pgan.fmap_max=0"])
    from models.pgan import build_pgan

    cfg = load_config("pgan_celebahq1024", base + ["pgan.fmap_base=128", "pgan.fmap_max=8"])  # the smallest that works
    G, D = build_pgan(8, 256, 3, fmap_base=cfg.pgan.fmap_base, fmap_max=cfg.pgan.fmap_max)
    assert G.levels == D.levels == 7


@pytest.mark.parametrize("ov, section", [("trainer=3", "trainer"), ("trainer.checkpoint=5", "trainer.checkpoint")])
def test_a_value_for_a_whole_section_names_the_section(ov, section):
    with pytest.raises(ConfigError, match=rf"'{section}' in command-line argument '{ov}' is a section"):
        load_config("gan_digits", [ov])


def test_a_key_in_the_wrong_section_suggests_the_same_key_where_it_lives():
    with pytest.raises(ConfigError) as ei:
        load_config("gan_digits", ["trainer.z_dim=5"])
    assert "model.z_dim" in str(ei.value).split("Closest")[1]


@pytest.mark.parametrize("run_id", [".", "..", "../features", "a/b", "/abs", "-x", "a b", "x" * 201])
def test_a_run_id_must_name_one_directory(run_id):
    """A run id with path parts would put a run into its experiment's directory ('.'), beside it ('..')
    or inside another run ('a/b'), where report and resume=auto would mix runs up."""
    with pytest.raises(ConfigError, match="not a valid run id"):
        load_config("gan_digits", [f"logging.run_id={run_id}"])


def test_run_ids_from_the_environment_are_checked_too(monkeypatch):
    from trainer.build import default_run_id

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("GENSCALE_RUN_ID", "sweep-1_003.b+c")
    assert default_run_id() == "sweep-1_003.b+c"
    monkeypatch.setenv("GENSCALE_RUN_ID", "../x")
    with pytest.raises(ConfigError, match=r"\$GENSCALE_RUN_ID='../x' is not a valid run id"):
        default_run_id()


def test_a_batch_the_pgan_schedule_would_ignore_is_refused():
    """pgan_mnist5k sets pgan.batch_sizes, so data.batch_size alone on the command line would not change
    the batch (it trained at 32, then 16): refused with both fixes named. With the list given too, or
    emptied, data.batch_size counts."""
    with pytest.raises(ConfigError, match=r"pgan.batch_sizes=\[8, 8, 8, 8\].*pgan.batch_sizes=\[\]"):
        load_config("pgan_mnist5k", ["data.batch_size=8"])
    assert load_config("pgan_mnist5k", ["data.batch_size=8", "pgan.batch_sizes=[]"]).data.batch_size == 8
    assert list(load_config("pgan_mnist5k", ["data.batch_size=8", "pgan.batch_sizes=[8,8,8,8]"]).pgan.batch_sizes) == [8] * 4


def test_messages_for_a_list_key_given_a_number_and_a_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match=r"it takes a list, e.g. optim.g.betas=\[0.5,0.999\]"):
        load_config("gan_digits", ["optim.g.betas=0.5"])
    with pytest.raises(ConfigError, match="Experiment file '.*nope.yaml' does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_labelled_run_on_unlabelled_data_names_the_missing_labels():
    from trainer.build import resolve_num_classes

    cfg = load_config("biggan_mnist5k", ["model.num_classes=10"])
    with pytest.raises(ConfigError, match="has no labels. Use labelled data with 10 classes"):
        resolve_num_classes(cfg, 0)
    with pytest.raises(ConfigError, match="has 3 classes"):
        resolve_num_classes(cfg, 3)
    assert resolve_num_classes(load_config("biggan_mnist5k"), 0) == 0
    # runs saved when an npz without labels counted as one class resume as they were trained
    assert resolve_num_classes(load_config("biggan_mnist5k", ["model.num_classes=1"]), 0) == 1


def test_a_saved_run_with_an_id_from_before_the_rule_still_loads():
    """Run ids were free-form before: resuming such a run (its saved config) must still work; only a new id
    given now is checked."""
    saved = load_config("gan_digits", ["logging.run_id=lr"])
    saved.logging.run_id = "lr=1e-4"  # as an older version wrote it
    from trainer.config import to_dict

    assert load_config(base=to_dict(saved), overrides=["trainer.max_iters=9"]).logging.run_id == "lr=1e-4"
    with pytest.raises(ConfigError, match="not a valid run id"):
        load_config(base=to_dict(saved), overrides=["logging.run_id=a/b"])


def test_a_checkpoint_monitor_that_ranks_nothing_is_refused():
    """Checkpoints are ranked by what reaches callback_metrics; a GAN loss or a typo would rank every
    checkpoint last (inf) and keep the newest instead, silently."""
    for bad in ("g/loss", "eval/fdi"):
        with pytest.raises(ConfigError, match="eval/fid, eval/kid"):
            load_config("gan_digits", [f"trainer.checkpoint.monitor={bad}"])
    assert load_config("gan_digits", ["trainer.checkpoint.monitor=eval/fid"]).trainer.checkpoint.monitor == "eval/fid"
    assert load_config("glow_digits", ["trainer.checkpoint.monitor=train/bpd"])
    with pytest.raises(ConfigError, match="eval/bpd"):
        load_config("glow_digits", ["trainer.checkpoint.monitor=eval/fid"])


def test_negative_ema_schedule_lengths_are_refused():
    for key in ("ema.start_iter", "ema.rampup_iters"):
        with pytest.raises(ConfigError, match=f"{key} must be 0 or more"):
            load_config("gan_digits", [f"{key}=-5"])


def test_settings_the_config_makes_do_nothing_are_named():
    from trainer.config import ignored_settings

    ov = ["knowledge.learned=true", "knowledge.lam=3", "trainer.zero_stage=1", "trainer.max_iters=5"]
    notes = ignored_settings(load_config("gan_digits", ov), ov)
    assert notes == ["knowledge.lam has no effect with knowledge.enabled=false",
                     "knowledge.learned has no effect with knowledge.enabled=false",
                     "trainer.zero_stage has no effect with trainer.strategy=auto (it is DeepSpeed's)"]
    ov = ["knowledge.enabled=true", "knowledge.constraint=symmetry", "knowledge.irl_log_z=per_class"]
    assert ignored_settings(load_config("gan_digits", ov), ov) == [
        "knowledge.irl_log_z has no effect without knowledge.learned=true (a fixed constraint)"]
    ov = ["trainer.strategy=deepspeed", "trainer.zero_stage=1"]
    assert ignored_settings(load_config("gan_digits", ov), ov) == []


def test_rules_added_later_do_not_stop_saved_runs_from_resuming(tmp_path):
    """A run saved with a checkpoint monitor or a run id that a newer rule refuses resumes (from its saved
    config, and with resume=auto naming its existing directory); the rules apply to new settings."""
    from trainer.config import to_dict

    saved = load_config("gan_digits", [f"logging.root={tmp_path}"])
    saved.trainer.checkpoint.monitor, saved.logging.run_id = "g/loss", "lr=1e-4"
    assert load_config(base=to_dict(saved), overrides=["trainer.max_iters=9"]).trainer.checkpoint.monitor == "g/loss"
    with pytest.raises(ConfigError, match="not a metric"):
        load_config(base=to_dict(saved), overrides=["trainer.checkpoint.monitor=d/loss"])
    run = tmp_path / "gan_digits" / "lr=1e-4"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    assert load_config("gan_digits", [f"logging.root={tmp_path}", "logging.run_id=lr=1e-4"]).logging.run_id == "lr=1e-4"
    with pytest.raises(ConfigError, match="not a valid run id"):
        load_config("gan_digits", [f"logging.root={tmp_path}", "logging.run_id=.."])
