"""Stage `report`: the run's results as pictures that need no network.

reads   metrics/map.json, metrics/evaluate.json, metrics/curves/ (evaluate), metrics/fusion/ and
        metrics/hash/ (the training stages' dvclive folders); each is optional: the page says
        what is missing instead of failing
writes  stages/report/index.html      one self-contained page (vega's scripts inlined, the data in
                                      the specs): MAP@50 and MAP@all against code length per method,
                                      PR and precision@N per code length, the training curves with
                                      the kept epoch, the key params, the CLIP model and the commit
        stages/report/dvc-plots.html  a template for `dvc plots show --html-template`, so DVC's own
                                      vega plots draw offline too (docs/report.md)
        plots/<name>.svg              the headline charts as images (dvc.yaml `plots:`, the README)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer

from cmhash.config.options import ParamsOption
from cmhash.config.schema import Params, load_params
from cmhash.config.stages import ReportSettings

# plots/<name>.svg: the charts DVC and the README show as images
IMAGES = {"map_at_50": ("map", "MAP@50"), "map_at_all": ("map", "MAP@all"), "pr": ("curve", "pr"),
          "precision_at_n": ("curve", "precision_at_n")}


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return ReportSettings.of(p).reads()


def commit() -> str:
    """The checkout's commit, with a mark when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} + uncommitted changes" if dirty.strip() else head


def run_facts(settings: ReportSettings, results) -> list[tuple[str, str]]:
    def shown(value: Any) -> str:
        if hasattr(value, "model_dump"):
            return ", ".join(f"{k}={v}" for k, v in value.model_dump().items())
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    features = (results.evaluate or {}).get("features")
    if features:
        weights = "random-init weights: the numbers test the pipeline, not the method" if features.get("random_init") else \
            f"weights {features.get('pretrained')}"
        clip = f"{features.get('clip_model')} ({weights})"
    else:
        clip = "unknown (no metrics/evaluate.json)"
    facts = [("commit", commit()), ("CLIP model", clip), ("dataset", (features or {}).get("dataset", settings.data_name))]
    items = (results.evaluate or {}).get("items")
    if items:
        facts.append(("items scored", f"{items['query']} queries, {items['retrieval']} database"))
    for task, picked in results.selected.items():
        for s in picked:
            run = f"{task} {s['bits']} bits" if s["bits"] else task
            facts.append((f"kept epoch ({run})", f"{s['epoch']}, val MAP@{settings.select_topk} {s['val_map']:.4f}"))
    return facts + [(key, shown(value)) for key, value in settings.reads().items()]


def run(settings: ReportSettings, metrics_dir: Path, out_dir: Path, plots_dir: Path) -> dict[str, Any]:
    from cmhash.io import all_or_nothing, atomic_dir, atomic_write_text
    from cmhash.report import charts, render
    from cmhash.report.inputs import read_results

    results = read_results(metrics_dir)
    missing = list(results.missing)
    have_map = bool(charts.map_rows(results))
    specs = {"map": {m: charts.map_vs_bits(results, m) for m in charts.METRICS.values()} if have_map else {},
             "curve": {kind: charts.curve_chart(results, kind) for kind in charts.CURVES if results.curves.get(kind)}}
    absent = [str(b) for b in settings.bits if results.map is not None and str(b) not in results.map]
    if absent:
        missing.append(f"map.json has no {', '.join(absent)}-bit results though params.yaml's bits lists them: re-run `cmhash evaluate`")
    sections = [
        ("MAP against code length", [*specs["map"].values()] or [f"no MAP to draw: {metrics_dir / 'map.json'} is missing"]),
        ("Precision–recall and precision@N", [*specs["curve"].values()] or [f"no curves to draw: {metrics_dir / 'curves'} holds none"]),
        ("Training", [charts.training_chart(results, t) if results.training.get(t) else f"no {t} training curves: {metrics_dir / t} is missing"
                      for t in ("fusion", "hash")]),
        ("Run", [run_facts(settings, results)]),
    ]
    if missing:
        sections.insert(0, ("Missing inputs", missing))
    images = {name: specs[group].get(key) for name, (group, key) in IMAGES.items()}
    with all_or_nothing():
        with atomic_dir(out_dir) as tmp:
            random_init = (results.evaluate or {}).get("features", {}).get("random_init")
            banner = charts.subtitle(results)[0] if random_init else None  # the demo's warning, atop the page
            atomic_write_text(tmp / "index.html", render.page("cmhash report", banner, sections))
            atomic_write_text(tmp / "dvc-plots.html", render.dvc_template())
        with atomic_dir(plots_dir) as tmp:
            for name, spec in images.items():
                if spec is not None:
                    atomic_write_text(tmp / f"{name}.svg", render.to_svg(spec))
    return {"missing": missing, "images": sorted(n for n, s in images.items() if s is not None)}


def command(
    params: ParamsOption = Path("params.yaml"),
    metrics_dir: Annotated[Path, typer.Option(help="metrics from evaluate and the training stages.")] = Path("metrics"),
    out_dir: Annotated[Path, typer.Option(help="writes <out-dir>/index.html and <out-dir>/dvc-plots.html.")] = Path("stages/report"),
    plots_dir: Annotated[Path, typer.Option(help="writes the headline charts as <plots-dir>/<name>.svg (git-tracked).")] = Path("plots"),
) -> None:
    """A self-contained HTML report (MAP against code length, PR and P@N curves, training curves) and SVG charts, drawn offline."""
    out = run(ReportSettings.of(load_params(params)), metrics_dir, out_dir, plots_dir)
    typer.echo(f"{out_dir / 'index.html'}: {len(out['images'])} images in {plots_dir}" +
               (f"; {len(out['missing'])} inputs missing (see the page)" if out["missing"] else ""))
