"""`genscale report RUN_DIR [RUN_DIR ...] --out report.html`: one self-contained HTML file per set of runs.

Everything comes from the run directories (config.yaml, metrics.csv, samples/*.png), so a report
works without W&B and on clusters without internet. Plots are matplotlib PNGs and sample grids are
the run's PNGs, both embedded as base64 data URIs: the file can be mailed or attached as it is.

Several runs (or a sweep directory, or a directory of runs) give overlaid curves and a table ranked
by --metric: its last logged value, lower is better unless --higher-better.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

# Columns that are axes or bookkeeping, not curves.
_NOT_CURVES = {"step", "epoch", "iteration", "progress/kimg", "train/nonfinite_skipped"}
# Default ranking metrics, best first: sample quality when evaluated, else the training objective.
DEFAULT_METRICS = ("eval/fid", "eval/bpd", "eval/kid", "train/bpd", "g/loss")
MAX_GRIDS = 6  # sample grids shown per run


class ReportError(ValueError):
    """Bad report input (not a run, no runs, unknown metric); the message says what is expected."""


@dataclass
class RunData:
    path: Path
    name: str
    config: dict
    rows: List[Dict[str, float]]
    samples: List[Path] = field(default_factory=list)
    config_file: str = "config.yaml"

    def series(self, key: str):
        pts = [(r["progress/kimg"], r[key]) for r in self.rows if key in r and "progress/kimg" in r]
        if key.startswith("perf/"):  # 0 marks "no interval measured yet" (the first row), not a speed
            pts = [p for p in pts if p[1] > 0]
        return [p[0] for p in pts], [p[1] for p in pts]

    def final(self, key: str) -> Optional[float]:
        vals = [r[key] for r in self.rows if key in r]
        return vals[-1] if vals else None

    def keys(self) -> List[str]:
        return sorted({k for r in self.rows for k in r} - _NOT_CURVES)


# ---- finding and reading runs ---------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def _sweep_runs(sweep_dir: Path) -> List[Path]:
    """Run directories of a `genscale sweep` record: trials.jsonl names each trial's run id; the runs live
    under the trial's logging.root (from its command), ./runs, or the sweep's own root."""
    found = []
    for line in (sweep_dir / "trials.jsonl").read_text().splitlines():
        trial = json.loads(line)
        roots = [a.split("=", 1)[1] for a in trial.get("command", []) if a.startswith("logging.root=")]
        roots += ["runs", str(sweep_dir.parent.parent), str(sweep_dir.parent.parent / "runs")]
        hits = [p for r in roots for p in sorted(Path(r).glob(f"*/{trial['run_id']}")) if is_run_dir(p)]
        if hits:
            found.append(hits[0])
    return found


def find_runs(paths: List[str]) -> List[Path]:
    runs: List[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"'{p}' is not a directory. Give run directories (runs/<experiment>/<run_id>/ "
                              "with config.yaml and metrics.csv), a sweep directory (runs/sweeps/<id>/) or a "
                              "directory holding runs.")
        if is_run_dir(p):
            runs.append(p)
        elif (p / "trials.jsonl").is_file():
            runs += _sweep_runs(p) or _fail(p, "its trials.jsonl names no run directory that exists yet")
        else:
            runs += sorted(c.parent for c in p.glob("*/config.yaml")) or sorted(
                c.parent for c in p.glob("*/*/config.yaml")) or _fail(p, "it has no config.yaml")
    return list(dict.fromkeys(r.resolve() for r in runs))


def _fail(p: Path, why: str):
    raise ReportError(f"'{p}' is not a run directory ({why}). A run directory is what `genscale train` "
                      "writes: runs/<experiment>/<run_id>/ with config.yaml, metrics.csv and samples/; a sweep "
                      "directory has trials.jsonl.")


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """metrics.csv rows as floats, empty cells dropped (rows are sparse: training and eval rows differ)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def fill_kimg(rows: List[Dict[str, float]]) -> None:
    """Rows logged by callbacks (eval, data, knowledge) carry the iteration but not kimg: interpolated
    from the training rows, which carry both."""
    import numpy as np

    known = sorted((r["iteration"], r["progress/kimg"]) for r in rows if "iteration" in r and "progress/kimg" in r)
    if not known:
        return
    its, kimgs = zip(*known)
    for r in rows:
        it = r.get("iteration", r.get("step"))
        if "progress/kimg" not in r and it is not None:
            inside = its[0] <= it <= its[-1]  # outside: images per iteration of the nearest end
            r["progress/kimg"] = float(np.interp(it, its, kimgs)) if inside else it * (
                kimgs[-1] / its[-1] if it > its[-1] else kimgs[0] / max(its[0], 1.0))


def latest_config(path: Path) -> Path:
    """The config the run last trained with: a resume writes config.resume-<time>.yaml beside the first
    (the names sort by time), and may have changed trainer.max_iters and other settings."""
    return max(path.glob("config.resume-*.yaml"), default=path / "config.yaml")


def load_run(path: Path) -> RunData:
    config_file = latest_config(path)
    cfg = yaml.safe_load(config_file.read_text()) or {}
    rows = read_metrics(path / "metrics.csv")
    fill_kimg(rows)
    if not rows:
        _fail(path, "it has no metrics.csv rows yet")
    name = f"{cfg.get('experiment') or path.parent.name}/{path.name}"
    return RunData(path, name, cfg, rows, sorted((path / "samples").glob("iter_*.png")), config_file.name)


# ---- pieces of the page ----------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def curves_plot(runs: List[RunData], keys: List[str], title: str) -> str:
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            x, y = run.series(key)
            if x:
                ax.plot(x, y, marker="." if len(x) < 30 else None, label=run.name)
        ax.set_title(key)
        ax.set_xlabel("kimg (thousands of images seen)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _img(_png(fig), title)


def evenly_spaced(items: list, k: int) -> list:
    """At most k of the items, evenly spaced, always the first and the last (the run's start and end)."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def sample_strip(run: RunData) -> str:
    """Up to MAX_GRIDS of the run's sample grids, evenly spaced from first to last, shrunk to 256 px."""
    from PIL import Image

    grids = evenly_spaced(run.samples, MAX_GRIDS)
    kimg = {int(r["iteration"]): r["progress/kimg"] for r in run.rows if "iteration" in r and "progress/kimg" in r}
    cells = []
    for p in grids:
        it = int(p.stem.split("_")[-1])
        img = Image.open(p)
        img.thumbnail((256, 256))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        label = f"iteration {it}" + (f", {kimg[it]:g} kimg" if it in kimg else "")
        cells.append(f"<figure>{_img(base64.b64encode(buf.getvalue()).decode(), f'{run.name} {label}', 'grid')}"
                     f"<figcaption>{label}</figcaption></figure>")
    return "".join(cells) or "<p>No sample grids (samples/iter_*.png) in this run.</p>"


def ranking(runs: List[RunData], metric: str, higher_better: bool) -> List[RunData]:
    """Runs by their last value of `metric`, best first; runs without it last."""
    def key(r):
        v = r.final(metric)
        return (v is None or math.isnan(v), 0.0 if v is None else (-v if higher_better else v))
    return sorted(runs, key=key)


def choose_metric(runs: List[RunData], metric: Optional[str]) -> str:
    have = set().union(*(r.keys() for r in runs))
    if metric:
        if metric not in have:
            raise ReportError(f"--metric {metric} is not in these runs' metrics.csv. Available: {', '.join(sorted(have))}.")
        return metric
    return next((m for m in DEFAULT_METRICS if m in have), sorted(have)[0] if have else "g/loss")


def metrics_table(runs: List[RunData], metric: str, higher_better: bool) -> str:
    ranked = ranking(runs, metric, higher_better)
    keys = [metric] + [k for k in sorted(set().union(*(r.keys() for r in runs))) if k != metric]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["rank", "run", "iteration", "kimg", *keys])
    body = []
    for i, r in enumerate(ranked, 1):
        cells = [str(i), html.escape(r.name), f"{r.final('iteration') or 0:g}", f"{r.final('progress/kimg') or 0:g}"]
        cells += ["" if r.final(k) is None else f"{r.final(k):.4g}" for k in keys]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    order = "higher" if higher_better else "lower"
    return (f'<p>Ranked by the last logged <b>{html.escape(metric)}</b> ({order} is better).</p>'
            f'<table id="ranking"><tr>{head}</tr>{"".join(body)}</table>')


def config_section(runs: List[RunData]) -> str:
    parts = []
    if len(runs) > 1:
        diff = config_diff(runs)
        if diff:
            head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
            rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals)
                           + "</tr>" for k, vals in diff.items())
            parts.append(f"<h3>Settings that differ</h3><table><tr><th>key</th>{head}</tr>{rows}</table>")
    for r in runs:
        text = yaml.safe_dump(r.config, sort_keys=False)
        parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>{html.escape(r.name)}: {r.config_file}"
                     f"</summary><pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


def _flat(d: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(runs: List[RunData]) -> Dict[str, list]:
    flats = [_flat(r.config) for r in runs]
    keys = sorted(set().union(*flats) - {"logging.run_id", "resume"})
    return {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1}


# ---- the page ---------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}img.plot{max-width:100%}
img.grid{width:200px;image-rendering:pixelated}figure{display:inline-block;margin:4px;text-align:center}
figcaption{font-size:12px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;
padding:3px 6px;text-align:right}pre{background:#f6f6f6;padding:8px;font-size:12px}"""
# Written into the page on load: how many images decoded (naturalWidth > 0), so a headless browser's
# --dump-dom shows whether every embedded image rendered.
_LOAD_CHECK = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-ok',ok+'/'+im.length);});</script>"""


def _load_runs(dirs: List[Path]) -> tuple:
    """The runs that have metrics rows, and the names of those without (a trial still starting, or one
    that failed at start): one such run must not keep the others out of a sweep's report."""
    if len(dirs) == 1:
        return [load_run(dirs[0])], []
    runs, skipped = [], []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except ReportError as e:
            if "no metrics.csv rows" not in str(e):
                raise
            skipped.append(d.name)
            print(f"genscale report: skipping {d}: it has no metrics.csv rows yet", file=sys.stderr)
    if not runs:
        raise ReportError(f"None of the {len(dirs)} runs has metrics.csv rows yet.")
    return runs, skipped


def build_report(paths: List[str], out: str, metric: Optional[str] = None, higher_better: bool = False) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    runs, skipped = _load_runs(find_runs(paths))
    metric = choose_metric(runs, metric)
    keys = sorted(set().union(*(r.keys() for r in runs)))
    perf = [k for k in keys if k.startswith("perf/")]
    curves = [k for k in keys if not k.startswith("perf/")]
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    body = [f"<h1>genscale report: {html.escape(title)}</h1>",
            "<h2>Final metrics</h2>", metrics_table(runs, metric, higher_better),
            *([f"<p>Not shown (no metrics.csv rows yet): {html.escape(', '.join(skipped))}.</p>"] if skipped else []),
            "<h2>Loss and metric curves</h2>",
            curves_plot(runs, curves, "losses and metrics vs kimg") if curves else "<p>No curves.</p>",
            "<h2>Throughput</h2>",
            curves_plot(runs, perf, "throughput vs kimg") if perf else "<p>No throughput logged.</p>",
            "<h2>Sample grids</h2>"]
    body += [f"<h3>{html.escape(r.name)}</h3><div>{sample_strip(r)}</div>" for r in ranking(runs, metric, higher_better)]
    body += ["<h2>Config</h2>", config_section(runs)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>genscale report: {html.escape(title)}</title>"
            f"<style>{_CSS}</style>{_LOAD_CHECK}</head><body>{''.join(body)}</body></html>")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page)
    best = ranking(runs, metric, higher_better)[0]
    return {"out": str(out), "runs": [str(r.path) for r in runs], "metric": metric,
            "order": "higher is better" if higher_better else "lower is better", "best": str(best.path)}


def cmd_report(args) -> int:
    try:
        print(json.dumps(build_report(args.runs, args.out, args.metric, args.higher_better)))
        return 0
    except ReportError as e:
        print(f"genscale report: error: {e}", file=sys.stderr)
        return 2


def add_parser(sp) -> argparse.ArgumentParser:
    r = sp.add_parser("report", help="one self-contained HTML report (plots, sample grids, config, ranked "
                                     "metrics) of one or several runs", description=__doc__.split("\n\n")[0])
    r.add_argument("runs", nargs="+", help="run directories, sweep directories (runs/sweeps/<id>) or "
                                           "directories holding runs")
    r.add_argument("--out", default="report.html", help="output HTML file")
    r.add_argument("--metric", default=None, help="metric that ranks the runs (default: the first of "
                                                  f"{', '.join(DEFAULT_METRICS)} that was logged)")
    r.add_argument("--higher-better", action="store_true", help="rank higher values of --metric first "
                                                                "(default: lower is better)")
    r.set_defaults(fn=cmd_report)
    return r
