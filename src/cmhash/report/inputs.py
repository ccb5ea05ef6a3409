"""What the report reads: the evaluate stage's metrics files and the training stages' dvclive
folders, each optional. A missing or unreadable input becomes a line in `missing` (the page says
so) instead of an error: the report is for looking at whatever the run has produced so far."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResults:
    map: dict[str, Any] | None = None  # metrics/map.json
    evaluate: dict[str, Any] | None = None  # metrics/evaluate.json
    curves: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # kind -> "<protocol>-<direction>" -> rows
    training: dict[str, list[dict]] = field(default_factory=dict)  # task -> rows (see training_rows)
    selected: dict[str, list[dict]] = field(default_factory=dict)  # task -> [{"bits", "epoch"}]: the kept checkpoints
    missing: list[str] = field(default_factory=list)  # one sentence per input the page cannot show


def read_json(path: Path, missing: list[str], what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        missing.append(f"{path} not found: no {what} yet")
    except (OSError, ValueError) as exc:
        missing.append(f"{path} unreadable ({exc}): no {what}")
    return None


def read_tsv(path: Path) -> list[tuple[int, float]]:
    """A dvclive curve, (step, value) rows."""
    with path.open(encoding="utf-8", newline="") as f:
        return [(int(row["step"]), float(row[path.stem])) for row in csv.DictReader(f, delimiter="\t")]


# The curves the report draws from each dvclive folder: quantity on the page -> {series: file}.
TRAINING_CURVES = {
    "loss": {"train": "train/loss.tsv", "val": "val/loss.tsv"},
    "val MAP@K": {"val (i2t+t2i)/2": "val/map.tsv", "val i2t": "val/map_i2t.tsv", "val t2i": "val/map_t2i.tsv"},
}


def training_rows(plots: Path, bits: int | None) -> list[dict]:
    """Rows {bits, quantity, series, epoch, value} of one run (dvclive step s = epoch s + 1), the
    learning rates included; curves a run did not log are left out."""
    rows = []
    lrs = {f"lr {p.stem}": p.relative_to(plots).as_posix() for p in sorted((plots / "lr").glob("*.tsv"))}
    for quantity, files in {**TRAINING_CURVES, "learning rate": lrs}.items():
        for series, name in files.items():
            if (plots / name).is_file():
                rows += [{"bits": bits, "quantity": quantity, "series": series, "epoch": step + 1, "value": value}
                         for step, value in read_tsv(plots / name)]
    return rows


def read_training(metrics_dir: Path, task: str, results: RunResults) -> None:
    folder = metrics_dir / task
    summary = read_json(folder / "metrics.json", results.missing, f"{task} training curves (run `cmhash train-{task}`)")
    if summary is None:
        return
    runs = [(None, folder / "plots/metrics", summary)] if task == "fusion" else \
        [(int(b), folder / "plots/metrics" / b, summary[b]) for b in sorted((k for k in summary if k.isdigit()), key=int)]
    for bits, plots, run in runs:
        try:
            results.training.setdefault(task, []).extend(training_rows(plots, bits))
        except (OSError, ValueError, KeyError) as exc:  # a curve file cut short or not dvclive's
            results.missing.append(f"{plots} unreadable ({exc!r}): its {task} training curves are left out")
            continue
        if isinstance(run, dict) and run.get("best_epoch") and run.get("best_val_map") is not None:
            results.selected.setdefault(task, []).append({"bits": bits, "epoch": run["best_epoch"], "val_map": run["best_val_map"]})


def read_results(metrics_dir: Path) -> RunResults:
    results = RunResults()
    results.map = read_json(metrics_dir / "map.json", results.missing, "MAP (run `cmhash evaluate`)")
    if results.map is not None and "baselines" not in results.map:
        results.missing.append("no baselines in map.json: run `cmhash baselines`, then `cmhash evaluate`, to draw them")
    results.evaluate = read_json(metrics_dir / "evaluate.json", results.missing, "record of the scored features")
    for kind in ("pr", "precision_at_n"):
        files = sorted((metrics_dir / "curves" / kind).glob("*.json"))
        if not files:
            results.missing.append(f"{metrics_dir / 'curves' / kind} holds no curves: run `cmhash evaluate`")
        for path in files:
            rows = read_json(path, results.missing, f"{kind} curve")
            if rows is not None:
                results.curves.setdefault(kind, {})[path.stem] = rows
    for task in ("fusion", "hash"):
        read_training(metrics_dir, task, results)
    return results
