"""`genscale bench train` on CPU with tiny configs: it times the real module, counts FLOPs that scale
as they must, and reports what BENCHMARKS.md needs."""
import json

import pytest

from launch.cli import main
from trainer.bench import REPO, run_train_bench


def _bench(tmp_path, batch, *extra, exp="gan_digits"):
    return run_train_bench(exp, [f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu", *extra],
                           batch=batch, steps=3, warmup=1)


def test_flops_scale_with_batch_and_critic_steps(tmp_path):
    a = _bench(tmp_path, 8, "optim.n_critic=1")
    b = _bench(tmp_path, 16, "optim.n_critic=1")
    c = _bench(tmp_path, 8, "optim.n_critic=2", "optim.g.impl=fused", "optim.d.impl=fused")
    # every convolution and matmul is linear in the batch
    assert abs(b["flops_per_iter"] / a["flops_per_iter"] - 2.0) < 0.01, (a["flops_per_iter"], b["flops_per_iter"])
    # one more D step per iteration: a D step (G forward + D forward/backward) is between a third and all of it
    extra = c["flops_per_iter"] - a["flops_per_iter"]
    assert 0.3 * a["flops_per_iter"] < extra < a["flops_per_iter"]
    assert (a["images_per_iter"], c["images_per_iter"]) == (8, 16)  # D batches seen per iteration
    for r in (a, b, c):
        assert r["steps"] == 3 and 0 < r["s_per_iter_p10"] <= r["s_per_iter_median"] <= r["s_per_iter_p90"]
        assert abs(r["images_per_s"] - r["images_per_iter"] / r["s_per_iter_median"]) < 1e-6
        assert abs(r["tflops_per_s"] - r["flops_per_iter"] / r["s_per_iter_median"] / 1e12) < 1e-9
        assert r["device"].startswith("CPU") and r["commit"] and r["precision"] == "32"
    # foreach Adam (the CPU default) decides the finite check on the host, fused Adam on the device
    assert (a["optimizer_impl"], a["finite_check"], c["optimizer_impl"], c["finite_check"]) == (
        "foreach/foreach", "host", "fused/fused", "device")


def test_cli_writes_json_lines_for_a_flow(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rc = main(["bench", "train", "glow_digits", f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu",
               "--steps", "2", "--warmup", "0", "--batch", "8", "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["model"] == "glow" and row["batch"] == 8 and row["images_per_iter"] == 8 and row["flops_per_iter"] > 0
    assert "| glow_digits |" in capsys.readouterr().out


def test_deepspeed_fp16_engines_train_wgan_gp(tmp_path):
    """DeepSpeed's fp16 engines (fp16 weights, fp32 master partitions, a loss scaler per network) with
    the gradient penalty, whose x_hat must then be fp16 too. In a subprocess: DeepSpeed sets up a
    process group that should not outlive the test."""
    import subprocess
    import sys

    from tests.distributed.helpers import REPO, clean_env

    out = tmp_path / "fp16.jsonl"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "bench", "train", "wgan_gp_mnist5k",
                           f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu", "trainer.devices=1",
                           "trainer.strategy=deepspeed", "trainer.zero_stage=1",
                           "model.g_width=8", "model.d_width=8", "--batch", "8", "--precision", "16-mixed",
                           "--steps", "2", "--warmup", "0", "--out", str(out)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["precision"] == "16-mixed" and row["strategy"] == "MultiEngineDeepSpeedStrategy"
    assert row["zero_stage"] == 1 and row["flops_per_iter"] > 0


def test_every_command_of_the_gpu_bench_script_checks_on_cpu(tmp_path, capsys):
    """launch/bench_gpu.sh runs on a lent GPU within minutes of device time, so a typo costs the whole
    loan: each of its bench commands (arguments, experiment, overrides, variants) is recorded as the
    script expands it and checked here with `bench train --check` (every case's config loads)."""
    import os
    import shlex
    import subprocess

    import tarfile

    from launch.compile_cache import pack

    recorder, calls = tmp_path / "argv.sh", tmp_path / "calls.txt"
    recorder.write_text('#!/bin/bash\nprintf "%q " "$@" >> "$ARGV_OUT"; echo >> "$ARGV_OUT"\n')
    recorder.chmod(0o755)
    # the compile cache a previous session returned, carried in; the script unpacks it first and packs
    # the cache (grown by its compiles) for the next session last
    (tmp_path / "before" / "fxgraph" / "k").mkdir(parents=True)
    (tmp_path / "before" / "fxgraph" / "k" / "entry").write_bytes(b"graph")
    pack(str(tmp_path / "before"), str(tmp_path / "carried" / "compile_cache"), log=lambda m: None)
    env = dict(os.environ, CHECK="1", GENSCALE_CMD=str(recorder), ARGV_OUT=str(calls),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), COMPILE_CACHE_FROM=str(tmp_path / "carried"))
    subprocess.run(["bash", "launch/bench_gpu.sh", str(tmp_path / "out"), "600"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "inductor" / "fxgraph" / "k" / "entry").read_bytes() == b"graph"
    with tarfile.open(tmp_path / "out" / "compile_cache.00.tar.xz") as t:
        assert "fxgraph/k/entry" in t.getnames()
    log = (tmp_path / "out" / "bench.log").read_text()
    assert "compile cache: unpacked 1 files from 1 part(s)" in log and "compile cache: packed 1 files" in log
    commands = [shlex.split(line) for line in calls.read_text().splitlines()]
    assert len(commands) >= 6 and all(c[0] == "bench" and c[1] in ("train", "memory") and "--check" in c
                                      for c in commands)
    assert sum(c[1] == "memory" for c in commands) >= 1
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 0, argv
        printed = capsys.readouterr().out
        variants = max(1, argv.count("--variant"))
        assert printed.count("ok: ") >= variants, (argv, printed)


def test_the_gpu_scripts_slow_tests_name_real_gpu_tests():
    """The script runs the GPU tests in two groups by name (-k): a renamed test would silently drop out
    of the later group, so each name must still be (part of) exactly one test in tests/gpu."""
    import re

    script = (REPO / "launch" / "bench_gpu.sh").read_text()
    names = re.search(r'^SLOW_GPU_TESTS="(.+)"$', script, re.M).group(1).split(" or ")
    tests = re.findall(r"^def (test_\w+)", "".join(p.read_text() for p in (REPO / "tests" / "gpu").glob("test_*.py")), re.M)
    assert len(names) == 2 and all(sum(n in t for t in tests) == 1 for n in names), (names, tests)


def test_bench_overrides_may_follow_the_options(capsys):
    assert main(["bench", "train", "biggan_mnist5k", "--steps", "2", "model.attention_impl=sdpa", "--check"]) == 0
    assert "ok: biggan_mnist5k" in capsys.readouterr().out
    assert main(["bench", "train", "biggan_mnist5k", "model.attention_impl=flash", "--check"]) == 2
    assert "Valid values: matmul, sdpa" in capsys.readouterr().err


def test_profile_counts_each_iterations_convolutions(tmp_path, capsys):
    """--profile N: N whole iterations after the timed ones. Per vanilla-GAN iteration (n_critic 1; D has
    BatchNorm, so it scores reals and fakes in two calls): G and both D calls forward in D's phase, G and
    D again in G's, so 2 |G| + 3 |D| conv forwards; backwards through both D calls in D's phase and
    through D and G in G's, 3 |D| + |G|."""
    import torch.nn as nn

    from trainer.build import build_module
    from trainer.config import load_config

    ov = [f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu", "optim.n_critic=1"]
    module = build_module(load_config("gan_digits", ov), channels=1, num_classes=10)
    convs = {n: sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in getattr(module, n).modules()) for n in "GD"}
    for n in (2, 3):
        row = run_train_bench("gan_digits", ov, batch=8, steps=2, warmup=1, profile=n, profile_top=1000)
        p = row["profile"]
        assert p["device"] == "cpu" and p["iters"] == n
        calls = {t["name"]: t["calls_per_iter"] for t in p["top"]}
        assert calls["aten::_convolution"] == 2 * convs["G"] + 3 * convs["D"] == 10
        assert calls["aten::convolution_backward"] == 3 * convs["D"] + convs["G"] == 8
        assert sum(p["kinds_ms_per_iter"].values()) == pytest.approx(p["busy_ms_per_iter"])  # CPU: self times add up
        assert 0 < p["busy"] < 5 and p["kinds_ms_per_iter"]["matmul/conv"] > 0
        # the step's marked parts (no penalty: a vanilla GAN), each with host time and aten ops; with the
        # host time outside them they make up the profiled iteration
        assert set(p["phases"]) == {"batch", "D fakes", "D forward", "D backward", "D update", "G forward",
                                    "G backward", "G update", "EMA"}
        assert all(v["host_ms"] > 0 and v["kernels"] > 0 and v["device_ms"] == 0 for v in p["phases"].values())
        assert sum(v["host_ms"] for v in p["phases"].values()) + p["outside_phases_host_ms"] == pytest.approx(
            p["profiled_wall_ms_per_iter"])
        assert 0 < p["outside_phases_host_ms"] < p["profiled_wall_ms_per_iter"]
    out = tmp_path / "p.jsonl"
    assert main(["bench", "train", "gan_digits", *ov, "--steps", "2", "--warmup", "0", "--batch", "8",
                 "--profile", "1", "--profile-top", "3", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["profile"]["iters"] == 1 and len(row["profile"]["top"]) == 3
    assert "profile gan_digits batch 8 32 baseline: cpu" in capsys.readouterr().out


def test_bench_applies_the_configs_cpu_threads(tmp_path):
    import torch

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        row = _bench(tmp_path, 8, "trainer.cpu_threads=1", "model.g_width=8", "model.d_width=8")
        assert row["device"].endswith("(1 threads)") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_the_bench_times_the_steady_state(capsys):
    """WGAN's boosted critic iterations (100 D steps) are not the steady state: the bench turns them off,
    so an iteration is n_critic D steps + 1 G step; a Progressive GAN is timed at its final resolution."""
    ov = ["trainer.accelerator=cpu", "model.g_width=4", "model.d_width=4"]
    row = run_train_bench("wgan_mnist5k", ov, batch=4, steps=2, warmup=0)
    assert row["n_critic"] == 5 and row["images_per_iter"] == 5 * 4
    row = run_train_bench("pgan_mnist5k", ["trainer.accelerator=cpu", "pgan.fmap_base=16", "pgan.fmap_max=4"],
                          batch=8, steps=2, warmup=0)
    assert row["resolution"] == 32 and row["images_per_iter"] == 8
    # the FLOPs of the 32 px step: more than those of the same nets held at 4 px
    small = run_train_bench("pgan_mnist5k", ["trainer.accelerator=cpu", "pgan.fmap_base=16", "pgan.fmap_max=4",
                                             "pgan.stable_images=[100000]", "pgan.batch_sizes=[]"],
                            batch=8, steps=2, warmup=0)
    assert small["resolution"] == 4 and small["flops_per_iter"] < row["flops_per_iter"] / 10


def test_compiled_rows_need_a_warmup_and_no_flops_rows_say_so(tmp_path, capsys):
    args = ["bench", "train", "gan_digits", "trainer.accelerator=cpu", "--steps", "2", "--batch", "8"]
    assert main([*args, "--warmup", "0", "--compile"]) == 2
    assert "--warmup of at least 1" in capsys.readouterr().err
    out = tmp_path / "rows.jsonl"
    assert main([*args, "--warmup", "0", "--no-flops", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["flops_per_iter"] is None and row["tflops_per_s"] is None and row["rank"] == 0
    assert "n/a (--no-flops)" in capsys.readouterr().out


def test_a_batch_the_accumulation_divides_is_accepted_whatever_the_experiments_own(capsys):
    """--batch replaces data.batch_size before the config is checked: gan_digits' own 32 is not
    divisible by optim.accumulate=3, but the 48 asked for is."""
    from launch.cli import main

    assert main(["bench", "train", "gan_digits", "optim.accumulate=3", "--batch", "48", "--check"]) == 0
    assert "ok: gan_digits batch 48" in capsys.readouterr().out
