"""`cmhash report`: the MAP-against-code-length rows from a hand-written map.json, the page and the
SVG files from hand-written metrics, missing inputs said on the page, and (slow) the report of the
tiny pipeline's run, whose training charts mark the epoch each stage kept. The page in a browser
is tests/test_browser_report.py's."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from cmhash.report import charts
from cmhash.report.inputs import read_results
from conftest import tiny_params

SCORES = lambda a, b: {"i2t": {"map@50": a, "map@all": b}, "t2i": {"map@50": b, "map@all": a}}  # noqa: E731
MAP = {
    "16": {"strict": SCORES(0.5, 0.3), "paired": SCORES(0.6, 0.4)},
    "32": {"strict": SCORES(0.55, 0.35), "paired": SCORES(0.65, 0.45)},
    "tie_aware": {},
    "real_valued": {"strict": SCORES(0.45, 0.25), "paired": SCORES(0.7, 0.5)},
    "chance": {"strict": SCORES(0.2, 0.1), "paired": SCORES(0.2, 0.1)},
    "baselines": {"lsh": {"16": {"strict": SCORES(0.25, 0.15)}, "32": {"strict": SCORES(0.26, 0.16)}},
                  "clip_cosine": {"float": {"strict": SCORES(0.3, 0.2)}}},
}
EVALUATE = {"features": {"dataset": "demo", "clip_model": "cmhash-tiny", "pretrained": "none", "random_init": True},
            "items": {"query": 12, "retrieval": 60}}


def write_metrics(root: Path, *, baselines: bool = True, hash_curves: bool = True) -> Path:
    """A metrics/ folder as evaluate and the training stages write it, by hand."""
    metrics = root / "metrics"
    (metrics / "curves/pr").mkdir(parents=True)
    (metrics / "curves/precision_at_n").mkdir(parents=True)
    table = dict(MAP) if baselines else {k: v for k, v in MAP.items() if k != "baselines"}
    (metrics / "map.json").write_text(json.dumps(table))
    (metrics / "evaluate.json").write_text(json.dumps(EVALUATE))
    for name in ("strict-i2t", "strict-t2i", "paired-i2t", "paired-t2i"):
        pr = [{"bits": b, "radius": r, "recall": r / b, "precision": 1 - r / (2 * b)} for b in (16, 32) for r in range(b + 1)]
        pn = [{"bits": b, "n": n, "precision": 0.5 + b / 1000 - n / 1000} for b in (16, 32) for n in (1, 5, 10)]
        (metrics / f"curves/pr/{name}.json").write_text(json.dumps(pr))
        (metrics / f"curves/precision_at_n/{name}.json").write_text(json.dumps(pn))
    runs = {"fusion": [("", None)], **({"hash": [("16/", 16), ("32/", 32)]} if hash_curves else {})}
    for task, prefixes in runs.items():
        summary = {}
        for prefix, bits in prefixes:
            plots = metrics / task / "plots/metrics" / prefix
            for name, values in {"train/loss": [3.0, 2.0, 1.5], "val/loss": [3.1, 2.2, 1.9], "val/map": [0.3, 0.5, 0.4],
                                 "val/map_i2t": [0.3, 0.5, 0.4], "val/map_t2i": [0.3, 0.5, 0.4], "lr/fusion": [1e-4] * 3}.items():
                (plots / name).parent.mkdir(parents=True, exist_ok=True)
                leaf = name.split("/")[-1]
                (plots / f"{name}.tsv").write_text(f"step\t{leaf}\n" + "".join(f"{s}\t{v}\n" for s, v in enumerate(values)))
            run = {"best_val_map": 0.5, "best_epoch": 2}
            summary.update({str(bits): run} if bits else run)
        (metrics / task / "metrics.json").write_text(json.dumps(summary))
    return metrics


@pytest.fixture
def project(tmp_path, params, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    params["bits"] = [16, 32]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def rows(results, **where) -> list[dict]:
    return [r for r in charts.map_rows(results) if all(r[k] == v for k, v in where.items())]


def test_map_rows_put_each_method_at_its_code_lengths(tmp_path):
    results = read_results(write_metrics(tmp_path))
    strict_i2t = dict(protocol="strict", direction="image → text", metric="MAP@50")
    assert [(r["bits"], r["map"]) for r in rows(results, method="cmhash", **strict_i2t)] == [(16, 0.5), (32, 0.55)]
    assert [(r["bits"], r["map"]) for r in rows(results, method="LSH", **strict_i2t)] == [(16, 0.25), (32, 0.26)]
    # scored once, drawn flat across the code lengths
    assert [(r["bits"], r["map"]) for r in rows(results, method="float CLIP (cosine)", **strict_i2t)] == [(16, 0.3), (32, 0.3)]
    assert [(r["bits"], r["map"]) for r in rows(results, method="chance", **strict_i2t)] == [(16, 0.2), (32, 0.2)]
    assert [r["map"] for r in rows(results, method=charts.TASK0, protocol="paired", direction="text → image", metric="MAP@all")] == [0.7, 0.7]
    # the baselines are scored on the strict protocol only: none in the paired panels
    assert {r["method"] for r in rows(results, protocol="paired")} == {"cmhash", charts.TASK0, "chance"}
    # per protocol 2 directions x 2 metrics; strict: 5 methods, paired: 3; each at 2 code lengths
    assert len(charts.map_rows(results)) == 2 * 2 * (5 + 3) * 2
    assert charts.subtitle(results)[0].startswith("random-init CLIP (cmhash-tiny)")


def test_the_training_chart_marks_the_kept_epoch_of_each_run(tmp_path):
    results = read_results(write_metrics(tmp_path))
    spec = charts.training_chart(results, "hash")
    marks = {(r["bits"], r["quantity"], r["epoch"]) for r in spec["data"]["values"] if r["series"] == "selected epoch"}
    assert marks == {(b, q, 2) for b in (16, 32) for q in ("loss", "val MAP@K", "learning rate")}
    train = [(r["epoch"], r["value"]) for r in spec["data"]["values"] if r["bits"] == 16 and r["series"] == "train"]
    assert train == [(1, 3.0), (2, 2.0), (3, 1.5)]  # dvclive step s is epoch s + 1


def test_the_report_writes_the_page_the_template_and_the_images(project, invoke):
    write_metrics(project)
    result = invoke("report", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    page = (project / "stages/report/index.html").read_text()
    assert "random-init CLIP (cmhash-tiny)" in page and "Missing inputs" not in page
    assert page.count('<div class="chart"') == 2 + 2 + 2  # MAP@50, MAP@all; PR, P@N; fusion, hash
    assert "window.vegaEmbed" in page or "vegaEmbed" in page
    assert not any(f'{attr}="http' in page for attr in ("src", "href"))  # nothing loaded from elsewhere
    for name in ("map_at_50", "map_at_all", "pr", "precision_at_n"):
        svg = ET.parse(project / f"plots/{name}.svg").getroot()
        assert svg.tag.endswith("svg") and len(list(svg.iter())) > 100, name
    assert "random-init" in (project / "plots/map_at_50.svg").read_text()
    template = (project / "stages/report/dvc-plots.html").read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template and "vegaEmbed" in template


def test_missing_inputs_are_said_on_the_page(project, invoke):
    write_metrics(project, baselines=False, hash_curves=False)
    result = invoke("report", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    page = (project / "stages/report/index.html").read_text()
    assert "Missing inputs" in page and "no baselines in map.json" in page
    assert "metrics/hash/metrics.json not found" in page and "no hash training curves" in page
    assert page.count('<div class="chart"') == 2 + 2 + 1  # no hash chart; the others drawn
    assert "LSH" not in page


def test_a_broken_curve_file_is_said_on_the_page_and_the_rest_drawn(project, invoke):
    metrics = write_metrics(project)
    (metrics / "hash/plots/metrics/32/val/map.tsv").write_text("step\tmap\n0\tnot-a-number\n")
    result = invoke("report", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    page = (project / "stages/report/index.html").read_text()
    assert "metrics/hash/plots/metrics/32 unreadable" in page
    assert page.count('<div class="chart"') == 2 + 2 + 2  # the hash chart holds 16 bits' curves
    hash_spec = charts.training_chart(read_results(metrics), "hash")
    assert {r["bits"] for r in hash_spec["data"]["values"]} == {16}


def test_with_no_metrics_at_all_the_page_says_what_to_run(project, invoke):
    result = invoke("report", "--params", "params.yaml")
    assert result.exit_code == 0, result.output
    page = (project / "stages/report/index.html").read_text()
    assert "metrics/map.json not found: no MAP (run `cmhash evaluate`)" in page
    assert '<div class="chart"' not in page and "<script>" not in page  # nothing to draw, no scripts
    assert list((project / "plots").iterdir()) == []


def test_a_failed_report_keeps_the_previous_outputs(project, invoke, monkeypatch):
    write_metrics(project)
    assert invoke("report", "--params", "params.yaml").exit_code == 0
    before = (project / "stages/report/index.html").read_text()
    from cmhash.report import render

    monkeypatch.setattr(render, "to_svg", lambda spec: (_ for _ in ()).throw(OSError(28, "No space left on device", "plots/x.svg")))
    shutil.rmtree(project / "metrics/hash")
    result = invoke("report", "--params", "params.yaml")
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert (project / "stages/report/index.html").read_text() == before
    assert sorted(p.name for p in (project / "plots").iterdir()) == ["map_at_50.svg", "map_at_all.svg", "pr.svg", "precision_at_n.svg"]


# ------------------------------------------------------------------ the tiny pipeline's run (slow)

STAGES = ("prepare", "extract", "baselines", "train-fusion", "train-hash", "evaluate", "report")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """Every stage of dvc.yaml on the tests' tiny params, in order; the folder and each command's output."""
    from typer.testing import CliRunner

    from cmhash.cli import app

    root = tmp_path_factory.mktemp("tiny_run")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in STAGES:
            result = CliRunner().invoke(app, [stage, "--params", "params.yaml"])
            assert result.exit_code == 0, f"{stage}: {result.output}"
            outputs[stage] = result.output
    return root, outputs


@pytest.mark.slow
def test_the_report_of_the_tiny_run_marks_each_kept_epoch(tiny_run):
    root, _ = tiny_run
    page = (root / "stages/report/index.html").read_text()
    assert "Missing inputs" not in page and "random-init CLIP (cmhash-tiny)" in page
    specs = [json.loads(part.split(">", 1)[1].split("</script>", 1)[0])
             for part in page.split('<script type="application/json"')[1:]]
    hash_spec = next(s for s in specs if s["title"]["text"] == "training: task 1 (hash)")
    summary = json.loads((root / "metrics/hash/metrics.json").read_text())
    kept = {(r["bits"], r["epoch"]) for r in hash_spec["data"]["values"] if r["series"] == "selected epoch"}
    assert kept == {(b, summary[str(b)]["best_epoch"]) for b in (16, 32)}
    map_spec = next(s for s in specs if s["title"]["text"] == "MAP@50 against code length")
    cmhash_strict = {r["bits"]: r["map"] for r in map_spec["data"]["values"]
                     if r["method"] == "cmhash" and r["protocol"] == "strict" and r["direction"] == "image → text"}
    table = json.loads((root / "metrics/map.json").read_text())
    assert cmhash_strict == {b: table[str(b)]["strict"]["i2t"]["map@50"] for b in (16, 32)}
    assert {r["method"] for r in map_spec["data"]["values"]} >= {"LSH", "PCA-ITQ", "CCA-ITQ", "float CLIP (cosine)", "chance"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train-fusion", "train-hash"])
def test_the_stage_prints_a_line_per_epoch_with_the_summary_numbers(tiny_run, stage):
    from test_training import epoch_lines

    root, outputs = tiny_run
    task = stage.removeprefix("train-")
    lines = epoch_lines(outputs[stage])
    summary = json.loads((root / f"metrics/{task}/metrics.json").read_text())
    runs = {None: summary} if task == "fusion" else {str(b): summary[str(b)] for b in (16, 32)}
    assert [(line["bits"], line["epoch"]) for line in lines] == [(bits, e) for bits in runs for e in ("1", "2")]
    for bits, run in runs.items():
        last = [line for line in lines if line["bits"] == bits][-1]  # epoch 2, the numbers metrics.json holds
        assert float(last["train_loss"]) == pytest.approx(run["train"]["loss"], abs=5e-5)
        assert float(last["val_loss"]) == pytest.approx(run["val"]["loss"], abs=5e-5)
        assert float(last["map"]) == pytest.approx(run["val"]["map"], abs=5e-5)
        lrs = last["lrs"].split()
        assert dict(zip(lrs[::2], map(float, lrs[1::2]))) == {f"lr/{k}": pytest.approx(v, rel=5e-3) for k, v in run["lr"].items()}
