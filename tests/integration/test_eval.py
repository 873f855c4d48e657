"""`genscale eval` and `genscale sample` on a tiny trained run (digits, 16 px, 20 iterations)."""
import json
import shutil
import socket
import time

import pytest
import torch
from PIL import Image

from launch.cli import main
from trainer.build import train
from trainer.evaluate import evaluate_checkpoint, load_feature_net, train_feature_net
from trainer.metrics import InceptionUnavailableError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    r = train("gan_digits", ["trainer.max_iters=20", f"logging.root={root}", "logging.wandb=false",
                             "trainer.progress_bar=false", "trainer.checkpoint.every_n_iters=10",
                             "eval.num_samples=200", f"eval.features_dir={root}/features"])
    return r.run_dir, root


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _eval_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_cli_reports_protocol_and_appends_log(run, capsys, no_network):
    run_dir, root = run
    log = run_dir / "eval.jsonl"
    before = log.read_text().splitlines() if log.exists() else []
    res = _eval_json(capsys, ["eval", str(run_dir)])
    for key in ("fid", "kid_mean", "kid_std", "iteration", "kimg", "checkpoint", "protocol", "class_accuracy"):
        assert key in res
    assert res["fid"] > 0 and res["kid_std"] >= 0 and res["class_accuracy"] is None
    assert res["iteration"] == 20 and res["kimg"] == pytest.approx(20 * 32 / 1000)
    assert res["checkpoint"].endswith("last.ckpt")
    p = res["protocol"]
    assert p["features"] == "domain-classifier:digits-16px.pt" and p["feature_dim"] == 128
    assert (p["num_generated"], p["num_real"], p["real_split"]) == (200, 180, "val")
    assert p["ema"] is True and p["truncation"] is None and p["bn_mode"] == "eval"
    # A 20-iteration generator is far from the data; real train images against val are close.
    assert 0 <= res["fid_train_vs_val"] < res["fid"]
    lines = log.read_text().splitlines()
    assert len(lines) == len(before) + 1 and json.loads(lines[-1]) == res
    # ... and metrics.csv gains a row keyed by the iteration, training rows intact
    import csv

    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["eval/fid"]) == pytest.approx(res["fid"]) and rows[-1]["iteration"] == "20"
    assert sum(1 for r in rows if r["g/loss"]) == 3  # iterations 1, 10, 20 from training

    net_file = root / "features" / "digits-16px.pt"
    _, meta = load_feature_net(net_file)
    assert meta["val_accuracy"] > 0.9 and meta["dataset"] == "digits" and meta["resolution"] == 16


def test_eval_is_seeded_and_feature_net_reused(run):
    run_dir, root = run
    net_file = train_feature_net("digits", 16, features_dir=root / "features")
    mtime = net_file.stat().st_mtime_ns
    a = evaluate_checkpoint(run_dir, num_samples=100, seed=3, use_ema=False)
    b = evaluate_checkpoint(run_dir, num_samples=100, seed=3, use_ema=False)
    assert a["fid"] == b["fid"] and a["kid_mean"] == b["kid_mean"] and a["protocol"]["ema"] is False
    assert net_file.stat().st_mtime_ns == mtime  # not retrained


def test_sample_cli_writes_png(run, tmp_path, capsys):
    run_dir, _ = run
    outs = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    for out, seed in zip(outs, (0, 0, 1)):
        res = _eval_json(capsys, ["sample", str(run_dir), "--num", "16", "--out", str(out), "--seed", str(seed)])
        assert res["out"] == str(out) and out.exists()
    img = Image.open(outs[0])
    side = 4 * (16 + 2) + 2  # 4x4 tiles of 16 px with 2 px padding, then upscaled by an integer
    assert img.mode == "L" and img.width == img.height and img.width % side == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() != outs[2].read_bytes()
    assert res["ema"] is True


def test_sample_says_raw_g_for_a_run_without_ema(tmp_path, capsys):
    """ema.enabled=false: the checkpoint has no G_ema, so the grid is the raw G's, and the line says so."""
    run = train("gan_digits", [f"logging.root={tmp_path}", "logging.wandb=false", "trainer.progress_bar=false",
                               "trainer.max_iters=2", "ema.enabled=false", "model.g_width=8", "model.d_width=8"])
    capsys.readouterr()
    res = _eval_json(capsys, ["sample", str(run.run_dir), "--num", "4", "--out", str(tmp_path / "s.png")])
    assert res["ema"] is False


def test_eval_truncated_checkpoint(run, tmp_path, capsys):
    run_dir, _ = run
    bad = tmp_path / "cut.ckpt"
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["eval", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_eval_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"a": 1}, foreign)
    capsys.readouterr()
    assert main(["eval", str(foreign)]) == 2
    assert "not a genscale checkpoint" in capsys.readouterr().err


def test_inception_without_local_weights_fails_fast(run, tmp_path, monkeypatch, capsys, no_network):
    run_dir, _ = run
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    t0 = time.perf_counter()
    with pytest.raises(InceptionUnavailableError) as e:
        evaluate_checkpoint(run_dir, num_samples=50, features="inception")
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert "genscale[inception]" in msg and "hub/checkpoints" in msg and "eval.features=domain" in msg

    # The same through the CLI, with eval.features=inception saved in the checkpoint's config.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["genscale"]["config"]["eval"]["features"] = "inception"
    edited = tmp_path / "inception.ckpt"
    torch.save(ckpt, edited)
    capsys.readouterr()
    assert main(["eval", str(edited)]) == 2
    err = capsys.readouterr().err
    assert "Inception-v3 features are not available" in err and "--features domain" in err
    assert not (tmp_path / "eval.jsonl").exists()
    # the fix the message names works on that same checkpoint
    assert main(["eval", str(edited), "--features", "domain", "--num", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["features"].startswith("domain-classifier")


def test_copied_run_dir_without_config_gets_no_log(run, tmp_path):
    run_dir, _ = run
    shutil.copytree(run_dir / "checkpoints", tmp_path / "x" / "checkpoints")
    res = evaluate_checkpoint(tmp_path / "x" / "checkpoints" / "last.ckpt", num_samples=20)
    assert res["protocol"]["num_generated"] == 20 and not (tmp_path / "x" / "eval.jsonl").exists()


def test_periodic_eval_logs_a_curve_and_ranks_checkpoints(tmp_path):
    import csv as _csv
    import json as _json

    from trainer.build import train

    run = train("gan_digits", [f"logging.root={tmp_path}", "logging.wandb=false", "trainer.progress_bar=false",
                               "trainer.max_iters=12", "eval.every_n_iters=4", "eval.at_start=true",
                               "eval.num_samples=200", f"eval.features_dir={tmp_path}/features",
                               "trainer.checkpoint.every_n_iters=4", "trainer.checkpoint.monitor=eval/fid",
                               "trainer.checkpoint.save_top_k=1", "trainer.sample_every=0"])
    lines = [_json.loads(x) for x in (run.run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 4, 8, 12]
    assert all(r["protocol"]["ema"] and r["protocol"]["num_generated"] == 200 for r in lines)
    with open(run.run_dir / "metrics.csv") as fh:
        logged = {int(float(r["iteration"])): float(r["eval/fid"]) for r in _csv.DictReader(fh) if r["eval/fid"]}
    assert logged == {r["iteration"]: r["fid"] for r in lines}
    best = min((4, 8, 12), key=lambda it: logged[it])
    kept = sorted(p.name for p in (run.run_dir / "checkpoints").glob("iter-*.ckpt"))
    assert kept == sorted({f"iter-{best:07d}.ckpt", "iter-0000012.ckpt"})  # the best, and the newest
