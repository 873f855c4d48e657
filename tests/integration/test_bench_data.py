"""`genscale bench data` on a tiny workload: the JSON has its fields and every number is positive.

Speed is not asserted (the machine is shared); the real numbers are in BENCHMARKS.md.
"""
import json

from launch.cli import main


def test_bench_data_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "data", "--resolution", "32", "--encoding", "raw", "png", "--workers", "0",
               "--images", "24", "--batch", "8", "--seconds", "0.2", "--repeats", "2", "--warmup", "1",
               "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| photos | 32 | files" in table and "shards-raw" in table
    res = json.loads(out.read_text())
    assert res["benchmark"] == "data" and res["settings"]["workers"] == 0
    assert res["machine"]["cpus"] >= 1 and "warm" in res["settings"]["page_cache"]
    cases = {(s["group"], s["case"]) for s in res["results"]}
    assert cases == {("photos32", "files"), ("photos32", "files-presized"), ("photos32", "shards-raw"),
                     ("photos32", "shards-png"), ("mnist5k32", "files"), ("mnist5k32", "shards-raw"),
                     ("mnist5k32", "shards-png")}
    for s in res["results"]:
        assert s["repeats"] == 2 and len(s["runs"]) == 2
        for key in ("images_per_s", "images_per_s_min", "images_per_s_max", "cpu_ms_per_image",
                    "cores_for_900_img_s", "ratio_vs_files"):
            assert s[key] > 0, (s["case"], key)
        c = 1 if s["workload"] == "mnist5k" else 3
        assert s["batch_shape"] == [8, c, 32, 32]
    assert all(s["ratio_vs_files"] == 1.0 for s in res["results"] if s["baseline"])
