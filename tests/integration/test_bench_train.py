"""`genscale bench train` on CPU with tiny configs: it times the real module, counts FLOPs that scale
as they must, and reports what BENCHMARKS.md needs."""
import json

from launch.cli import main
from trainer.bench import run_train_bench


def _bench(tmp_path, batch, *extra, exp="gan_digits"):
    return run_train_bench(exp, [f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu", *extra],
                           batch=batch, steps=3, warmup=1)


def test_flops_scale_with_batch_and_critic_steps(tmp_path):
    a = _bench(tmp_path, 8, "optim.n_critic=1")
    b = _bench(tmp_path, 16, "optim.n_critic=1")
    c = _bench(tmp_path, 8, "optim.n_critic=2")
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
                           "trainer.strategy=deepspeed", "trainer.zero_stage=1", "model.d_norm=none",
                           "model.g_width=8", "model.d_width=8", "--batch", "8", "--precision", "16-mixed",
                           "--steps", "2", "--warmup", "0", "--out", str(out)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["precision"] == "16-mixed" and row["strategy"] == "MultiEngineDeepSpeedStrategy"
    assert row["zero_stage"] == 1 and row["flops_per_iter"] > 0
