"""`genscale bench memory` on the CPU: a real probe process, its peak resident memory against the
budget, the verdict and exit code; and the refusals that cost no probe. (The search itself is checked
against brute force in tests/unit/test_memory_search.py; out of CUDA memory in tests/gpu.)"""
import json

from launch.cli import main


def test_a_probe_over_the_budget_does_not_fit(tmp_path, capsys):
    """One real probe (a `bench train` process at batch 8): a torch process needs far more than 10 MB,
    so batch 8, the smallest multiple, does not fit; exit 1, and the row carries the measurement."""
    out = tmp_path / "memory.jsonl"
    rc = main(["bench", "memory", "gan_digits", f"logging.root={tmp_path}/runs", "trainer.accelerator=cpu",
               "--start", "8", "--multiple", "8", "--memory-gb", "0.01", "--steps", "1", "--warmup", "0",
               "--out", str(out)])
    assert rc == 1
    result = json.loads(out.read_text())
    assert result["largest_batch"] is None and result["smallest_failing"] == 8
    [probe] = result["probes"]
    assert probe["batch"] == 8 and probe["fits"] is False and probe["steps"] == 1
    assert 0.05 < probe["peak_host_gb"] < 16 and probe["images_per_s"] > 0  # it ran, then was judged
    assert probe["error"] == f"peak resident memory {probe['peak_host_gb']:.2f} GB > 0.01 GB"
    assert "optim.accumulate=1" in probe["overrides"] and "trainer.devices=1" in probe["overrides"]
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("no batch fits (0.01 GB limit; batch 8 does not)")


def test_refusals_cost_no_probe(capsys):
    assert main(["bench", "memory", "gan_digits", "trainer.accelerator=cpu"]) == 2
    assert "on the CPU nothing runs out of memory: give --memory-gb G" in capsys.readouterr().err
    # --check, the dry run, says so too (it answered ok, and the real command then failed)
    assert main(["bench", "memory", "gan_digits", "trainer.accelerator=cpu", "--check"]) == 2
    assert "give --memory-gb G" in capsys.readouterr().err
    assert main(["bench", "memory", "gan_digits", "trainer.accelerator=cpu", "--check", "--memory-gb", "2"]) == 0
    assert main(["bench", "memory", "gan_digits", "optim.bogus=1", "--memory-gb", "1"]) == 2
    assert "Unknown config key 'optim.bogus'" in capsys.readouterr().err
    assert main(["bench", "memory", "gan_digits", "--memory-gb", "1", "--multiple", "64", "--max", "32"]) == 2
    assert "need 1 <= multiple <= maximum" in capsys.readouterr().err
    assert main(["bench", "train", "gan_digits", "--memory-gb", "2"]) == 2
    assert "there is no CUDA device here" in capsys.readouterr().err
