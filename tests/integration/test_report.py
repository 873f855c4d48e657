"""`genscale report`: one self-contained HTML file with the plots and sample grids of two runs, a
table ranked by the chosen metric (checked against metrics.csv read here), sweep directories, clear
errors, and a real headless browser (Debian's chromium) that renders every embedded image."""
import base64
import csv
import io
import json
import re
from pathlib import Path
import shutil
import subprocess

import pytest
from PIL import Image

from launch.cli import main
from tests.conftest import tiny
from trainer.build import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    dirs = []
    for name, lr in (("a", "0.0002"), ("b", "0.002")):
        run = train("gan_digits", tiny(tmp, "trainer.max_iters=4", "trainer.log_every=1", "trainer.sample_every=2",
                                       "trainer.cpu_threads=1", f"logging.run_id={name}", f"optim.g.lr={lr}"))
        dirs.append(run.run_dir)
    return tmp, dirs


def last_value(run_dir, key):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)][-1]


def ranked_runs(page):
    table = page.split('id="ranking"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>\d+</td><td>([^<]+)</td>", table)


def report(tmp, *args):
    out = tmp / f"report-{len(list(tmp.glob('report-*')))}.html"
    assert main(["report", *map(str, args), "--out", str(out)]) == 0
    return out.read_text(), out


def test_report_embeds_plots_and_grids_of_both_runs_and_ranks_the_better_first(two_runs, capsys):
    tmp, dirs = two_runs
    page, _ = report(tmp, *dirs, "--metric", "g/loss")
    info = json.loads(capsys.readouterr().out)
    images = re.findall(r'<img class="(\w+)" alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    for _, _, b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()  # real PNGs
    assert sum(c == "plot" for c, _, _ in images) == 2  # curves, throughput
    for name in ("gan_digits/a", "gan_digits/b"):
        assert [a for c, a, _ in images if c == "grid" and a.startswith(name)] == [
            f"{name} iteration 2, 0.064 kimg", f"{name} iteration 4, 0.128 kimg"]
    expected = sorted(["a", "b"], key=lambda n: last_value(tmp / "runs" / "gan_digits" / n, "g/loss"))
    assert ranked_runs(page) == [f"gan_digits/{n}" for n in expected]
    assert info["best"].endswith(expected[0]) and info["order"] == "lower is better"
    assert "(lower is better)" in page and "optim.g.lr" in page  # the settings that differ
    assert "http" not in re.sub(r"data:image/png;base64,[^\"]+", "", page)  # self-contained
    flipped, _ = report(tmp, *dirs, "--metric", "g/loss", "--higher-better")
    assert ranked_runs(flipped) == [f"gan_digits/{n}" for n in reversed(expected)]


def test_sweep_directory_and_directory_of_runs(two_runs, capsys):
    tmp, dirs = two_runs
    sweep = tmp / "sweeps" / "s1"
    sweep.mkdir(parents=True)
    with open(sweep / "trials.jsonl", "w") as fh:
        for d in dirs:
            fh.write(json.dumps({"trial": 0, "run_id": d.name, "command": [f"logging.root={tmp}/runs"]}) + "\n")
    for source in (sweep, tmp / "runs" / "gan_digits"):
        page, _ = report(tmp, source)
        assert sorted(ranked_runs(page)) == ["gan_digits/a", "gan_digits/b"]
        assert json.loads(capsys.readouterr().out)["metric"] == "g/loss"  # no eval metric logged: G's loss


def test_a_run_without_rows_yet_is_listed_not_shown_and_keeps_no_one_out(two_runs, tmp_path, capsys):
    tmp, dirs = two_runs
    starting = tmp_path / "runs" / "gan_digits" / "c"  # a trial that has written its config, no rows yet
    starting.mkdir(parents=True)
    shutil.copy(dirs[0] / "config.yaml", starting / "config.yaml")
    page, _ = report(tmp, *dirs, starting)
    assert sorted(ranked_runs(page)) == ["gan_digits/a", "gan_digits/b"]
    assert "Not shown (no metrics.csv rows yet): c." in page
    assert "skipping" in capsys.readouterr().err
    assert main(["report", str(starting), "--out", str(tmp_path / "r.html")]) == 2  # alone: nothing to show
    assert "no metrics.csv rows yet" in capsys.readouterr().err


def test_not_a_run_and_unknown_metric_are_clear_errors(two_runs, tmp_path, capsys):
    _, dirs = two_runs
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(dirs[0]), "--metric", "eval/nope", "--out", str(tmp_path / "r.html")]) == 2
    assert "Available: d/fake" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def rendered_images(path):
    """Loads the page in headless chromium; the page's load script writes '<decoded>/<total>' images."""
    chromium = shutil.which("chromium")
    if chromium is None:  # as the SLURM fixture starts its cluster: install it (root and apt-get, as on CI)
        script = Path(__file__).resolve().parents[1] / "report" / "install_chromium.sh"
        subprocess.run(["bash", str(script)], check=False, capture_output=True, timeout=900)
        chromium = shutil.which("chromium")
    assert chromium, "chromium is missing and tests/report/install_chromium.sh could not install it (needs root and apt-get)"
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'data-images-ok="(\d+)/(\d+)"', res.stdout)
    assert found, f"the page's load script did not run:\n{res.stdout[:500]}"
    return int(found[1]), int(found[2])


def test_report_renders_in_headless_chromium_with_no_missing_image(two_runs):
    tmp, dirs = two_runs
    page, path = report(tmp, *dirs)
    n = page.count("<img ")
    assert rendered_images(path) == (n, n) and n == 6
    # The check can fail: one image made undecodable is counted as missing.
    broken = tmp / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    assert rendered_images(broken) == (n - 1, n)


def test_rows_without_kimg_are_placed_by_iteration():
    from launch.report import fill_kimg

    rows = [{"iteration": 0.0, "eval/fid": 9.0}, {"iteration": 2.0, "progress/kimg": 0.064},
            {"iteration": 4.0, "progress/kimg": 0.128}, {"iteration": 3.0, "eval/fid": 5.0},
            {"iteration": 6.0, "eval/fid": 4.0}]
    fill_kimg(rows)
    assert [r["progress/kimg"] for r in rows] == pytest.approx([0.0, 0.064, 0.128, 0.096, 0.192])


def test_a_resumed_run_shows_the_config_it_last_trained_with(tmp_path, capsys):
    """A resume to a larger trainer.max_iters writes config.resume-<time>.yaml: the report shows that
    config (it showed the first, max_iters 2, beside iteration 4)."""
    run = train("gan_digits", tiny(tmp_path, "trainer.max_iters=2", "logging.run_id=r", "trainer.log_every=1"))
    train(None, [f"resume={run.run_dir}", "trainer.max_iters=4"])
    (resumed,) = run.run_dir.glob("config.resume-*.yaml")
    page, _ = report(tmp_path, run.run_dir)
    shown = page.split(f"{resumed.name}</summary><pre>", 1)[1].split("</pre>", 1)[0]
    assert "max_iters: 4" in shown and "max_iters: 2" not in shown


def test_ranking_uses_the_last_value_and_puts_nan_last():
    from pathlib import Path

    from launch.report import RunData, ranking

    def run(name, values):
        return RunData(Path(name), name, {}, [{"eval/fid": v} for v in values])

    runs = [run("good", [50.0, 10.0]), run("diverged", [float("nan")]), run("late", [5.0, 20.0]), run("none", [])]
    assert [r.name for r in ranking(runs, "eval/fid", False)] == ["good", "late", "diverged", "none"]
    assert [r.name for r in ranking(runs, "eval/fid", True)][:2] == ["late", "good"]


def test_the_sample_strip_spans_the_run_from_first_to_last_grid():
    from launch.report import evenly_spaced

    assert evenly_spaced(list(range(10)), 4) == [0, 3, 6, 9]
    assert evenly_spaced(list(range(100)), 6) == [0, 20, 40, 59, 79, 99]
    assert evenly_spaced([1, 2], 6) == [1, 2]
