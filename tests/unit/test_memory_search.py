"""`genscale bench memory`'s search and verdicts, against brute force (the probes themselves, real
processes, are in tests/integration/test_bench_memory.py and tests/gpu/test_speed_gpu.py)."""
import itertools

import pytest

from trainer.bench_memory import format_memory, predict_largest, run_probe, search_largest


def _brute(limit, multiple, maximum):
    fitting = [b for b in range(multiple, maximum + 1, multiple) if b <= limit]
    return fitting[-1] if fitting else None


@pytest.mark.parametrize("start,multiple,maximum", list(itertools.product([1, 8, 24, 64, 300], [1, 8, 32],
                                                                          [64, 100, 1000])))
def test_search_finds_the_largest_fitting_multiple(start, multiple, maximum):
    """Every memory limit from 0 to past the maximum: the answer is the largest multiple that fits, the
    failure reported is the next multiple (or none when the maximum fits, or the smallest multiple
    when nothing does), no batch is probed twice, and the probe count stays logarithmic."""
    for limit in range(0, 1100, 5):
        probed = []
        good, bad = search_largest(lambda b: probed.append(b) or b <= limit, start, multiple, maximum)
        want = _brute(limit, multiple, maximum)
        assert good == want, (limit, probed)
        assert bad == (None if want == maximum // multiple * multiple else multiple if want is None
                       else want + multiple), (limit, probed)
        assert len(probed) == len(set(probed)), probed
        assert all(b % multiple == 0 and multiple <= b <= maximum for b in probed), probed
        assert len(probed) <= 2 * (maximum // multiple).bit_length() + 2, (limit, probed)


@pytest.mark.parametrize("seed", range(6))
def test_any_prediction_leaves_the_answer_unchanged(seed):
    """The prediction only steers: random ones (absurd, negative, None included) give brute force's
    answer, never a repeated probe, and at most about three times plain bisection's probe count."""
    import random

    rng = random.Random(seed)
    for _ in range(300):
        multiple, maximum = rng.choice([1, 8, 32]), rng.choice([64, 100, 1000, 4096])
        if maximum < multiple:
            continue
        start, limit = rng.randint(1, maximum), rng.randint(0, maximum + 50)
        probed = []
        odd = [None, -5, 0, 1e9, float("inf"), float("nan")]
        guess = lambda: rng.choice(odd + [rng.uniform(0, 2 * maximum)])  # noqa: E731
        good, _ = search_largest(lambda b: probed.append(b) or b <= limit, start, multiple, maximum, guess)
        assert good == _brute(limit, multiple, maximum), (start, multiple, maximum, limit, probed)
        assert len(probed) == len(set(probed)), probed
        assert len(probed) <= 3 * (2 * (maximum // multiple).bit_length() + 2), probed


def test_a_line_through_the_probes_finds_a_linear_limit_in_few_probes():
    """Memory = fixed + per_image * batch, as a training step's nearly is (54 cases: fixed 0.5-8 GB,
    0.01-0.18 GB per image, limits 24-79 GB, starts 64 and 256, multiples of 32). With the line fitted
    to the probes that fit, the answers equal brute force's, in at most 6 probes and 4 on average;
    plain doubling and bisection take up to 15 (8.2 on average)."""
    guided, plain = [], []
    for fixed, per_image, limit, start in itertools.product((0.5, 2.0, 8.0), (0.01, 0.07, 0.18),
                                                            (24.0, 40.0, 79.0), (64, 256)):
        mem = lambda b: fixed + per_image * b  # noqa: E731
        probed, peaks = [], []

        def fits(b):
            probed.append(b)
            if mem(b) <= limit:
                peaks.append((b, mem(b)))
                return True
            return False

        good, _ = search_largest(fits, start, 32, 8192, lambda: predict_largest(peaks, limit))
        assert good == _brute(int((limit - fixed) / per_image), 32, 8192), (fixed, per_image, limit, start, probed)
        guided.append(len(probed))
        counted = []
        search_largest(lambda b: counted.append(b) or mem(b) <= limit, start, 32, 8192)
        plain.append(len(counted))
    assert max(guided) <= 6 and sum(guided) / len(guided) <= 4.0, guided
    assert max(plain) >= 15 and sum(plain) / len(plain) >= 8.0, plain


def test_predict_largest_by_hand():
    assert predict_largest([(256, 47.5)], 79.0) == pytest.approx(256 * 79.0 / 47.5)  # through the origin
    assert predict_largest([(64, 2.5), (128, 4.5)], 10.5) == pytest.approx(320.0)  # 0.5 + b / 32 = 10.5
    assert predict_largest([(64, 2.5), (128, 2.5)], 10.5) is None  # flat: no prediction
    assert predict_largest([], 10.0) is None and predict_largest([(64, 1.0)], 0) is None


def test_search_probe_order_by_hand():
    probed = []
    assert search_largest(lambda b: probed.append(b) or b <= 420, 256, 32, 8192) == (416, 448)
    assert probed == [256, 512, 384, 448, 416]  # up by doubling, then bisection
    probed.clear()
    assert search_largest(lambda b: probed.append(b) or b <= 40, 256, 8, 8192) == (40, 48)
    assert probed == [256, 128, 64, 32, 48, 40]  # down by halving, then bisection


def test_search_refuses_an_empty_range():
    with pytest.raises(ValueError, match="multiple <= maximum"):
        search_largest(lambda b: True, 8, 16, 8)


def _probe_script(tmp_path, row, rc=0):
    """A stand-in probe command that writes ``row`` where --out says (run_probe's parsing, not the bench)."""
    script = tmp_path / "probe.py"
    script.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      + (f"open(out, 'a').write(json.dumps({row!r}) + '\\n')\n" if row else "")
                      + f"print('Traceback: ValueError: bad key', file=sys.stderr)\nsys.exit({rc})\n")
    import sys
    return [sys.executable, str(script), "--out", str(tmp_path / "row.jsonl")]


def test_probe_verdicts(tmp_path):
    cpu_row = {"batch": 64, "peak_host_gb": 1.5, "images_per_s": 10.0}
    assert run_probe(_probe_script(tmp_path, cpu_row), 64, 2.0, False, 30)["fits"]
    (tmp_path / "row.jsonl").unlink()
    over = run_probe(_probe_script(tmp_path, cpu_row), 64, 1.0, False, 30)
    assert not over["fits"] and over["error"] == "peak resident memory 1.50 GB > 1 GB"
    (tmp_path / "row.jsonl").unlink()
    oom = run_probe(_probe_script(tmp_path, {"batch": 64, "error": "out of memory"}), 64, None, True, 30)
    assert not oom["fits"]
    (tmp_path / "row.jsonl").unlink()
    assert run_probe(_probe_script(tmp_path, {"batch": 64, "peak_mem_gb": 70.0}), 64, None, True, 30)["fits"]


def test_probe_without_a_row_is_an_error_with_its_stderr(tmp_path):
    from trainer.bench_memory import ProbeError

    with pytest.raises(ProbeError, match=r"batch 64 failed \(exit 2\) without a result:\nTraceback: ValueError"):
        run_probe(_probe_script(tmp_path, None, rc=2), 64, 1.0, False, 30)


def test_format_memory_verdicts():
    probes = [{"batch": 256, "fits": True, "peak_mem_gb": 47.5, "peak_reserved_gb": 50.0, "peak_host_gb": 3.0,
               "images_per_s": 380.0, "probe_s": 20.0},
              {"batch": 512, "fits": False, "error": "out of memory", "peak_host_gb": 3.1, "probe_s": 9.0}]
    base = {"experiment": "biggan_imagenet128", "device": "NVIDIA H100 80GB HBM3", "memory_limit_gb": None,
            "device_memory_gb": 79.1, "multiple": 32, "probes": probes}
    text = format_memory({**base, "largest_batch": 256, "smallest_failing": 512})
    assert "| 256 | yes | 47.50 GB | 50.00 GB | 3.00 GB | 380.0 | 20 |" in text
    assert "| 512 | no: out of memory |  |  | 3.10 GB |  | 9 |" in text
    assert text.endswith("largest batch per device: 256 (79.1 GB card, multiples of 32; 512 does not fit)")
    text = format_memory({**base, "memory_limit_gb": 40.0, "largest_batch": None, "smallest_failing": 32})
    assert text.endswith("no batch fits (40 GB limit; batch 32 does not)")


def test_out_of_memory_is_told_from_other_errors():
    import torch

    from trainer.bench import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 68719476736 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # not the allocator's type


def test_a_variant_fails_loudly_unless_it_ran_out_of_memory(monkeypatch):
    import trainer.bench as bench

    def boom(message):
        def run(*a, **kw):
            raise RuntimeError(message)
        return run

    monkeypatch.setattr(bench, "release_device_memory", lambda: None)
    monkeypatch.setattr(bench, "run_train_bench", boom("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    row = bench.run_variant("gan_digits", [], "", batch=512, memory_gb=1.5)
    assert row["error"] == "out of memory" and row["batch"] == 512 and row["memory_limit_gb"] == 1.5
    monkeypatch.setattr(bench, "run_train_bench", boom("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bench.run_variant("gan_digits", [], "", batch=512)


def test_probes_start_from_the_experiments_micro_batch_on_one_device():
    from trainer.bench_memory import probe_config

    cfg = probe_config("biggan_imagenet128", ["trainer.devices=4"], None, "bf16-mixed")
    assert (cfg.data.batch_size, cfg.optim.accumulate) == (256, 1)  # 2048 in 8 micro-batches of 256
    assert (str(cfg.trainer.devices), cfg.trainer.num_nodes, cfg.trainer.precision) == ("1", 1, "bf16-mixed")
    assert probe_config("biggan_imagenet128", None, 384, None).data.batch_size == 384
