"""launch/compile_cache.py: torch.compile's caches packed on one machine turn the next machine's
compiles into loads (here inductor's C++ backend; on the GPU machines the same folders hold Triton's
kernels), the parts stay within the device tool's limits, and a bad part costs a recompile, never the run."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from launch.compile_cache import cache_files, pack, split_parts, unpack

REPO = Path(__file__).resolve().parents[2]

COMPILE = """
import json, torch
from trainer.speed import compile_cache_counts  # what each `genscale bench train` row records
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 4, 3))
x = torch.randn(2, 3, 12, 12, requires_grad=True)
torch.compile(net)(x).square().sum().backward()
print(json.dumps(compile_cache_counts()))
"""


def compile_once(cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_packed_cache_makes_the_next_machines_compile_a_load(tmp_path):
    cache = tmp_path / "inductor"
    cold = compile_once(cache)
    assert cold == {"fx_hit": 0, "fx_miss": 2, "aot_hit": 0, "aot_miss": 1}  # forward and backward graphs
    parts = pack(str(cache), str(tmp_path / "out" / "cc"), part_mb=15, parts=3, log=lambda m: None)
    assert parts and all(os.path.getsize(p) <= 15 * 2 ** 20 for p in parts)
    # The next machine: nothing but the parts, unpacked at the same path.
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    assert unpack(str(cache), [str(tmp_path / "out")], log=lambda m: None) > 0
    warm = compile_once(cache)
    assert warm == {"fx_hit": 2, "fx_miss": 0, "aot_hit": 1, "aot_miss": 0}


def _fake_cache(root: Path, kernels: int = 6, size: int = 100_000) -> None:
    """Triton-like kernel folders of incompressible bytes: a cubin, its PTX, two IRs and metadata."""
    for k in range(kernels):
        d = root / "triton" / "0" / f"k{k:02d}"
        d.mkdir(parents=True)
        for ext, n in ((".cubin", size), (".ptx", size), (".ttir", size), (".llir", size), (".json", 100)):
            (d / f"kern{ext}").write_bytes(os.urandom(n))
        (d / "__grp__kern.json").write_text(json.dumps({"child_paths": {}}))
    (root / "locks").mkdir()
    (root / "locks" / "x.lock").write_text("")
    (root / "fxgraph").mkdir()
    (root / "fxgraph" / "entry").write_bytes(os.urandom(1000))


def _names(parts) -> set:
    names = set()
    for p in parts:
        with tarfile.open(p, "r:xz") as t:
            names |= {m.name for m in t.getmembers()}
    return names


def test_files_being_written_are_left_out_and_a_vanished_one_is_skipped(tmp_path):
    from launch.compile_cache import _write_part

    cache = tmp_path / "c"
    (cache / "triton" / "0" / "tmp.5f2a").mkdir(parents=True)  # TritonBundler's folder before its rename
    (cache / "triton" / "0" / "tmp.5f2a" / "k.cubin").write_bytes(b"x")
    (cache / "triton" / "0" / "k1").mkdir()
    for n in ("k.cubin", "k.cubin.tmp.pid_7_1234", ".7.140.tmp", "__grp__k.json"):
        (cache / "triton" / "0" / "k1" / n).write_bytes(b"x")
    assert {f for fs in cache_files(cache).values() for f, _ in fs} == {"triton/0/k1/k.cubin",
                                                                      "triton/0/k1/__grp__k.json"}
    out = tmp_path / "p.tar.xz"
    _write_part((str(cache), ["triton/0/k1/k.cubin", "triton/0/k1/gone.cubin"], str(out), 0, ("m.json", {})))
    assert _names([out]) == {"triton/0/k1/k.cubin", "m.json"}


def test_parts_keep_each_folder_whole_and_balance_the_bytes():
    folders = {f"d{i}": [(f"d{i}/a", s), (f"d{i}/b", 1)] for i, s in enumerate([50, 40, 30, 20, 10, 10])}
    groups = split_parts(folders, 3)
    assert len(groups) == 3 and sorted(sum(groups, [])) == sorted(f for fs in folders.values() for f, _ in fs)
    for g in groups:  # a folder's files never straddle two parts
        assert len({n.split("/")[0] for n in g}) * 2 == len(g)
    sizes = sorted(sum(s for fs in folders.values() for f, s in fs if f in g) for g in groups)
    assert sizes == [52, 52, 62]  # largest first into the smallest: 51+11 | 41+11 | 31+21, by hand
    assert split_parts({"d": [("d/a", 5)]}, 3) == [["d/a"]]  # no empty parts


def test_pack_drops_the_ir_then_the_ptx_until_the_parts_fit_or_writes_nothing(tmp_path):
    cache = tmp_path / "c"
    _fake_cache(cache)  # 6 kernels x (4 x 100 kB) = 2.4 MB, incompressible
    files = cache_files(cache)
    assert "locks" not in files and sum(len(v) for v in files.values()) == 6 * 6 + 1
    log: list = []
    # 2 parts of 0.75 MiB hold 3 kernels' cubins and PTX each (600 kB) but not their IR as well (1.2 MB)
    parts = pack(str(cache), str(tmp_path / "a"), part_mb=0.75, parts=2, log=log.append)
    names = _names(parts)
    assert len(parts) == 2 and all(os.path.getsize(p) <= 0.75 * 2 ** 20 for p in parts)
    assert {n.rsplit(".", 1)[-1] for n in names if n.startswith("triton")} == {"cubin", "ptx", "json"}
    assert "fxgraph/entry" in names and not any("lock" in n for n in names)
    assert "left out .ttir" in log[-1]
    # 2 x 0.35 MiB: only the cubins (300 kB a part) fit. Without the IR alone (1.2 MB at the measured
    # ratio of about 1) they could not, so that tier is not even compressed.
    log.clear()
    parts = pack(str(cache), str(tmp_path / "b"), part_mb=0.35, parts=2, log=log.append)
    assert {n.rsplit(".", 1)[-1] for n in _names(parts) if n.startswith("triton")} == {"cubin", "json"}
    assert log[1].startswith("compile cache: 1.1 MiB without .ttir") and "over 2 x 0.35 MiB" in log[1]
    assert "left out" in log[2]
    # 1 x 0.25 MiB: not even the cubins (600 kB) fit; nothing is left behind
    log.clear()
    assert pack(str(cache), str(tmp_path / "z"), part_mb=0.25, parts=1, log=log.append) == []
    assert "not packed" in log[-1] and not list(tmp_path.glob("z.*"))
    assert len(log) == 4 and log[1].count("would compress") == log[2].count("would compress") == 1


def test_unpack_skips_a_bad_part_and_says_what_will_miss(tmp_path):
    cache = tmp_path / "c"
    _fake_cache(cache, kernels=4, size=1000)
    parts = pack(str(cache), str(tmp_path / "p" / "cc"), parts=2, log=lambda m: None)
    assert len(parts) == 2
    Path(parts[1]).write_bytes(Path(parts[1]).read_bytes()[:100])  # truncated in transfer
    log: list = []
    n = unpack(str(tmp_path / "elsewhere"), [str(tmp_path / "p")], log=log.append)
    text = "\n".join(log)
    assert 0 < n < 4 * 6 + 1 and "cc.01.tar.xz unreadable" in text
    assert "was packed from" in text and "compile again" in text  # another path: Triton's groups miss
    assert unpack(str(tmp_path / "x"), [str(tmp_path / "none")], log=log.append) == 0
    assert "none to unpack" in log[-1]


def test_the_command_line_packs_and_unpacks(tmp_path):
    cache = tmp_path / "c"
    _fake_cache(cache, kernels=2, size=1000)
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.compile_cache", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True)
    out = run("pack", str(cache), str(tmp_path / "cc"), "--parts", "1")
    assert out.returncode == 0 and "packed 13 files" in out.stdout, out.stdout + out.stderr
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    out = run("unpack", str(cache), str(tmp_path / "cc.00.tar.xz"))
    assert out.returncode == 0 and "unpacked 13 files from 1 part" in out.stdout
    assert "packed from" not in out.stdout  # same path: nothing to warn about
    assert (cache / "triton" / "0" / "k01" / "kern.cubin").stat().st_size == 1000
    bad = run("pack", str(cache), str(tmp_path / "x"), "--parts", "0")
    assert bad.returncode == 2 and "--parts must be at least 1" in bad.stderr
