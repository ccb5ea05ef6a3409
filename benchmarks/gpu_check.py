"""GPU check: the CUDA-only tests, the demo pipeline in fp32, bf16 and fp16, and extraction, training and evaluation speed on one GPU.

    python benchmarks/gpu_check.py                        # `make gpu-check`, on a CUDA machine (a few minutes on an H100/H200)
    python benchmarks/gpu_check.py --device cpu --tiny    # smoke run of the whole script on a CPU, every size shrunk

Each section is a key of the JSON report (--out) and a Markdown table on stdout, ready for
docs/benchmarks.md; every number below is measured on the current device in this run.

cuda_tests  the tests marked `@pytest.mark.cuda` (`pytest -m cuda`, in a subprocess); on a CUDA
            machine each must pass: one skipped there fails the check.
pipeline    the demo pipeline through the `cmhash` stage commands (in this process, with --params
            files and every path in a work folder, never the repository's stages/ or metrics/):
            prepare once, then extract, baselines, train-fusion, train-hash and evaluate for each precision
            (clip.precision = train.precision = fp32, bf16, fp16), --epochs per task. Every strict
            MAP@K and MAP@all (each code length, both directions) must be within --tolerance of
            fp32's, and the MAP the evaluate stage wrote (its torch path on CUDA) must equal numpy's
            on the codes it saved (1e-9).
extraction  pairs/s of open_clip ViT-B-32 with random weights at batch 256, per precision: the model
            alone (image tensors and tokens already on the device) against end to end (JPEGs decoded
            and preprocessed in --workers DataLoader processes, copied to the device, encoded:
            cmhash.features.encoding.Encoder, as `cmhash extract` runs it).
training    engine.fit at MIRFlickr size (5,000 pairs of 512-d random features, batch 128, params.yaml's
            model, loss and optimiser): ms per step and s per epoch, task 0 and task 1 at 16/32/64/128
            bits, per precision; optimiser steps only (no validation, no checkpoints).
evaluation  MAP@50 and MAP@all at NUS-WIDE scale (2,100 queries x 190,000 items, 64-bit random codes):
            the torch path on the device against numpy on the CPU; both MAPs must be equal (1e-9).

Timing: a warm-up first, then the clock, with CUDA synchronised before it stops; best of a few
runs where a run is short. A precision the device cannot run (fp16 on a CPU, bf16 on a GPU
without it) is skipped and the output says why. A section that crashes fails its check and the
others still run. Exit code 0 when every check passes, else 1; without a CUDA device it stops at
once unless asked for the CPU smoke run (--device cpu --tiny).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cmhash.cli import app
from cmhash.config.schema import Params, parse_params
from cmhash.config.stages import TaskSettings
from cmhash.errors import ConfigError
from cmhash.evaluation.ranking import mean_average_precision
from cmhash.evaluation.ranking_torch import mean_average_precision_torch
from cmhash.evaluation.tables import DIRECTIONS
from cmhash.features.clip import load_seeded_clip
from cmhash.features.encoding import Encoder, chunks
from cmhash.features.store import FeatureSplit
from cmhash.io import write_json
from cmhash.runtime.precision import Precision, inference_precision
from cmhash.training.engine import TrainState, fit, full_batch_starts
from cmhash.training.state import build_state, model_config
from timing import best_time

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_BITS = (16, 32, 64, 128)
EQUAL = 1e-9  # "the same MAP": rankings and hits are identical, only float64 sums differ in order (~1e-16)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
# Strict MAP@K / MAP@all of each bf16 or fp16 run against fp32's, absolute. The runs share the
# seed but not the arithmetic: rounding moves every step, so each run ends at its own weights and
# its own best epoch. Measured on a CPU with this script's 10 + 10 epochs (docs/benchmarks.md):
# bf16 moved the demo's strict MAPs by at most 0.014 from fp32, another training seed by at most
# 0.016; 0.03 leaves room for the largest of 16 such differences per precision, while a broken
# precision path (NaN features or losses, collapsed codes) drops MAP towards chance: 0.24 for
# MAP@50 and 0.18 for MAP@all, against the demo's ~0.41 and ~0.27 at these epochs.
TOLERANCE = 0.03


@dataclass(frozen=True)
class Sizes:
    clip_model: str  # extraction: the open_clip model (random weights)
    batch: int  # extraction: pairs per batch
    batches: int  # extraction, model alone: timed batches
    images: int  # extraction, end to end: JPEGs
    image_side: int
    train_pairs: int
    train_dim: int
    train_batch: int
    timed_epochs: int  # training: timed epochs after one warm-up epoch
    eval_query: int
    eval_db: int
    eval_labels: int
    epochs: int  # pipeline: epochs of each training task (params.yaml has 30 + 30)


FULL = Sizes("ViT-B-32", 256, 20, 2560, 256, 5000, 512, 128, 3, 2100, 190000, 21, 10)
TINY = Sizes("cmhash-tiny", 8, 2, 16, 32, 96, 16, 32, 1, 40, 600, 5, 2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unavailable(precision: str, device: torch.device) -> str | None:
    """Why `precision` cannot run on `device` (the project's own rule, cmhash.runtime.precision), or None."""
    try:
        Precision(precision, device)
    except ConfigError as exc:
        return str(exc)
    return None


class Report:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {"checks": []}

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.data["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def section(self, name: str, run: Callable[[], dict[str, Any]]) -> None:
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            self.data[name] = run()
        except Exception as exc:  # one broken section must not hide the others' numbers
            traceback.print_exc()
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.check(name, False, f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        self.data[name]["seconds"] = round(time.perf_counter() - start, 1)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.data["checks"])


# ------------------------------------------------------------------------------ CUDA tests


def junit_outcomes(path: Path) -> dict[str, str]:
    """test id -> passed | failed | skipped, from pytest's --junitxml file (an error counts as failed)."""
    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes


def cuda_tests(report: Report, device: torch.device, work: Path) -> dict[str, Any]:
    junit = work / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", f"--junitxml={junit}", "tests"],
                          cwd=REPO, capture_output=True, text=True)
    outcomes = junit_outcomes(junit) if junit.is_file() else {}
    counts = {kind: sum(o == kind for o in outcomes.values()) for kind in ("passed", "failed", "skipped")}
    if device.type == "cuda":
        ok = bool(outcomes) and counts["passed"] == len(outcomes)
        detail = f"{counts['passed']} of {len(outcomes)} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    else:
        ok = bool(outcomes) and counts["failed"] == 0
        detail = f"{len(outcomes)} found, {counts['skipped']} skipped: no CUDA device in a CPU smoke run"
    if not ok:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    report.check("cuda tests", ok, detail)
    return {"pytest_exit_code": proc.returncode, **counts, "tests": outcomes}


# -------------------------------------------------------------------------------- pipeline


def shrink(p: dict[str, Any]) -> None:
    """Test-sized demo (as tests/conftest.py's tiny_params): seconds per stage on a CPU."""
    p["bits"] = [16, 32]
    p["data"]["demo"].update(n_items=72, image_size=32, query=12, train=36, val=12)
    p["clip"].update(model="cmhash-tiny", batch_size=32, num_workers=0)
    for arch in ("reference", "cross_attention"):
        p["model"][arch].update(nhead=2, num_layers=1, dim_feedforward=64)
    p["hash_head"]["hidden"] = 64
    p["train"]["batch_size"] = 16


def demo_params(device: str, tiny: bool, epochs: int) -> dict[str, Any]:
    """params.yaml on the offline demo (random-init CLIP), on `device`, `epochs` per training task."""
    p = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    p["device"] = device
    p["data"]["name"] = "demo"
    p["clip"].update(model="cmhash-demo", pretrained="none")
    if tiny:
        shrink(p)
    p["train"]["fusion"]["epochs"] = p["train"]["hash"]["epochs"] = epochs
    return p


@contextlib.contextmanager
def working_directory(path: Path):
    """Stages run from the work folder, so nothing relative (dvclive, defaults) lands in the repository."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_stage(log_dir: Path, name: str, *options: object) -> float:
    """`cmhash <name> <options>` in this process; its output goes to <log_dir>/<name>.log. Seconds."""
    start = time.perf_counter()
    result = CliRunner().invoke(app, [name, *map(str, options)])
    seconds = time.perf_counter() - start
    log = result.output
    if result.exit_code and result.exc_info and not isinstance(result.exception, SystemExit):
        log += "".join(traceback.format_exception(*result.exc_info))
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.log").write_text(log, encoding="utf-8")
    if result.exit_code:
        tail = "\n".join(log.strip().splitlines()[-12:])
        raise RuntimeError(f"cmhash {name} exited {result.exit_code} (log: {log_dir / name}.log):\n{tail}")
    print(f"   cmhash {name}: {seconds:.1f} s", flush=True)
    return round(seconds, 2)


def strict_maps(map_json: dict[str, Any], bits: list[int]) -> dict[str, float]:
    """"<bits> <direction> <metric>" -> value, the strict protocol of metrics/map.json."""
    return {f"{b} {direction} {metric}": value for b in bits
            for direction, metrics in map_json[str(b)]["strict"].items() for metric, value in metrics.items()}


def outside_tolerance(reference: dict[str, float], other: dict[str, float], tolerance: float) -> list[str]:
    """The numbers of `other` further than `tolerance` from `reference`'s, or missing."""
    return [f"{key}: {other[key]:.4f} vs {value:.4f}" if key in other else f"{key}: missing"
            for key, value in reference.items() if key not in other or not abs(other[key] - value) <= tolerance]


def numpy_difference(eval_dir: Path, map_json: dict[str, Any], bits: list[int], topk: list[int]) -> float:
    """Largest |MAP the evaluate stage wrote - numpy's MAP| over the codes it saved (both protocols)."""
    labels = np.load(eval_dir / "labels.npz")
    worst = 0.0
    for b in bits:
        for protocol, table in map_json[str(b)].items():
            with np.load(eval_dir / protocol / f"{b}.npz") as packed:
                codes = {name: np.where(np.unpackbits(packed[name], axis=1)[:, :b] > 0, 1, -1) for name in packed.files if name != "bits"}
            for direction, (query, db) in DIRECTIONS.items():
                scores = mean_average_precision(codes[query], codes[db], labels["query"], labels["retrieval"], topk=(*topk, None))
                worst = max(worst, *(abs(table[direction][f"map@{'all' if k is None else k}"] - v) for k, v in scores.items()))
    return worst


def pipeline_run(folder: Path, p: dict[str, Any], prepared: Path) -> dict[str, Any]:
    params = folder / "params.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    params.write_text(yaml.safe_dump(p), encoding="utf-8")
    extract, fusion, hashes, metrics = folder / "extract", folder / "fusion" / "model.pt", folder / "hash", folder / "metrics"
    baselines = folder / "baselines"
    stages = {
        "extract": ["--prepare-dir", prepared, "--out-dir", extract, "--metrics", metrics / "extract.json"],
        "baselines": ["--features-dir", extract, "--out-dir", baselines, "--metrics", metrics / "baselines_val.json"],
        "train-fusion": ["--features-dir", extract, "--out", fusion, "--metrics-dir", metrics / "fusion",
                         "--checkpoints", folder / "checkpoints" / "fusion"],
        "train-hash": ["--features-dir", extract, "--fusion", fusion, "--out-dir", hashes, "--metrics-dir", metrics / "hash",
                       "--checkpoints", folder / "checkpoints" / "hash", "--baselines-dir", baselines],
        "evaluate": ["--features-dir", extract, "--fusion", fusion, "--hash-dir", hashes, "--baselines-dir", baselines,
                     "--out-dir", folder / "evaluate", "--metrics-dir", metrics],
    }
    seconds = {name: run_stage(folder / "logs", name, "--params", params, *options) for name, options in stages.items()}
    map_json = json.loads((metrics / "map.json").read_text(encoding="utf-8"))
    return {"seconds": seconds, "map": strict_maps(map_json, p["bits"]),
            "evaluate_vs_numpy": numpy_difference(folder / "evaluate", map_json, p["bits"], p["evaluate"]["topk"])}


def pipeline(report: Report, device: torch.device, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = demo_params(args.device, args.tiny, args.epochs)
    result: dict[str, Any] = {"epochs": {"fusion": args.epochs, "hash": args.epochs}, "tolerance": args.tolerance,
                              "bits": base["bits"], "demo": base["data"]["demo"], "runs": {}}
    with working_directory(work):
        (work / "prepare.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
        result["prepare_seconds"] = run_stage(work / "logs", "prepare", "--params", work / "prepare.yaml", "--out-dir", work / "prepare")
        for precision in PRECISIONS:
            reason = unavailable(precision, device)
            if reason:
                print(f"   {precision}: skipped ({reason})")
                result["runs"][precision] = {"skipped": reason}
                continue
            print(f"   {precision}:", flush=True)
            p = copy.deepcopy(base)
            p["clip"]["precision"] = p["train"]["precision"] = precision
            try:
                run = result["runs"][precision] = pipeline_run(work / precision, p, work / "prepare")
            except Exception as exc:  # the other precisions still run
                traceback.print_exc()
                result["runs"][precision] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                report.check(f"pipeline {precision}", False, result["runs"][precision]["error"])
                continue
            report.check(f"pipeline {precision}: evaluate = numpy", run["evaluate_vs_numpy"] <= EQUAL,
                         f"max |difference| {run['evaluate_vs_numpy']:.1e}")
    reference = result["runs"].get("fp32", {}).get("map")
    for precision, run in result["runs"].items():
        if precision == "fp32" or "map" not in run or reference is None:
            continue
        run["max_abs_diff_vs_fp32"] = max(abs(run["map"][k] - v) for k, v in reference.items())
        if args.tiny:
            report.check(f"pipeline {precision} MAP vs fp32", True, f"max |difference| {run['max_abs_diff_vs_fp32']:.3f}; "
                         "tolerance not applied at tiny sizes (a dozen queries)")
            continue
        off = outside_tolerance(reference, run["map"], args.tolerance)
        report.check(f"pipeline {precision} MAP vs fp32", not off,
                     f"max |difference| {run['max_abs_diff_vs_fp32']:.4f} (tolerance {args.tolerance})" + (f"; {'; '.join(off)}" if off else ""))
    return result


# ------------------------------------------------------------------------------ extraction


def extraction(device: torch.device, sizes: Sizes, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench_extract import make_pairs  # the same synthetic JPEGs and captions as bench_extract.py

    clip = load_seeded_clip(sizes.clip_model, "none", args.seed, device)
    (work / "images").mkdir(exist_ok=True)
    items = make_pairs(work / "images", sizes.images, sizes.image_side, args.seed)
    paths, captions = [item.image for item in items], [item.caption for item in items]
    with Image.open(paths[0]) as im:
        shape = clip.preprocess(im.convert("RGB")).shape
    images = torch.randn(sizes.batch, *shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    tokens = clip.tokenizer(captions[: sizes.batch]).to(device)
    rows: dict[str, Any] = {}
    for precision in PRECISIONS:
        if reason := unavailable(precision, device):
            rows[precision] = {"skipped": reason}
            continue
        autocast = Precision(precision, device).autocast
        encoder = Encoder(clip, device, sizes.batch, args.workers, Precision(precision, device))

        @torch.no_grad()
        def model_only(autocast: Callable = autocast) -> None:
            for _ in range(sizes.batches):
                with autocast():
                    clip.model.encode_image(images)
                    clip.model.encode_text(tokens)
            synchronize(device)

        def end_to_end(n: int, encoder: Encoder = encoder) -> None:
            for idx, _, bad in encoder.image_batches(paths[:n], chunks(list(range(n)), sizes.batch)):
                if bad:
                    raise RuntimeError(f"synthetic images failed to decode: {bad[:2]}")
                encoder.captions([captions[i] for i in idx])
            synchronize(device)

        model_only()  # warm-up: kernels, allocator, autocast caches
        model_s, _ = best_time(model_only, 3)
        end_to_end(min(2 * sizes.batch, len(paths)))  # warm-up, and the files into the page cache
        e2e_s, _ = best_time(lambda end_to_end=end_to_end: end_to_end(len(paths)), 2)
        rows[precision] = {"model_only_pairs_per_s": round(sizes.batches * sizes.batch / model_s, 1),
                           "end_to_end_pairs_per_s": round(len(paths) / e2e_s, 1)}
        print(f"   {precision}: {rows[precision]}", flush=True)
    return {"model": sizes.clip_model, "pretrained": "none", "batch": sizes.batch, "timed_batches_model_only": sizes.batches,
            "images": len(paths), "image_side": sizes.image_side, "workers": args.workers,
            "clip_precision_auto": inference_precision("auto", device).name, "precisions": rows}


# -------------------------------------------------------------------------------- training


def train_state(p: Params, dim: int, bits: int | None, device: torch.device, precision: str) -> TrainState:
    """What cmhash.training.task.train_task builds for one task, on random-init weights."""
    s = TaskSettings.of(p, "hash" if bits else "fusion")
    torch.manual_seed(p.seed)
    return build_state(s, model_config(s, dim, bits), device, precision=precision)


def training(device: torch.device, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    p = parse_params(demo_params(args.device, args.tiny, args.epochs))  # params.yaml's model, loss, optimiser
    g = torch.Generator().manual_seed(args.seed)
    data = FeatureSplit(*(torch.randn(sizes.train_pairs, sizes.train_dim, generator=g).to(device) for _ in range(2)),
                    label=torch.zeros(sizes.train_pairs, 1, device=device), meta={})
    steps = len(full_batch_starts(sizes.train_pairs, sizes.train_batch))

    def epochs(state: TrainState, n: int) -> None:
        state.epoch = 0
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar, drawn but not shown
            fit(state, data, epochs=n, batch_size=sizes.train_batch, clip_grad_norm=p.train.clip_grad_norm, hooks=[],
                generator=torch.Generator().manual_seed(args.seed))
        synchronize(device)

    rows, skipped = [], {}
    for precision in PRECISIONS:
        if reason := unavailable(precision, device):
            skipped[precision] = reason
            continue
        for bits in (None, *TRAIN_BITS):
            state = train_state(p, sizes.train_dim, bits, device, precision)
            epochs(state, 1)  # warm-up
            seconds, _ = best_time(lambda state=state: epochs(state, sizes.timed_epochs), 1)
            per_epoch = seconds / sizes.timed_epochs
            rows.append({"task": 1 if bits else 0, "bits": bits, "precision": precision,
                         "ms_per_step": round(1e3 * per_epoch / steps, 2), "s_per_epoch": round(per_epoch, 3)})
            print(f"   {rows[-1]}", flush=True)
    return {"pairs": sizes.train_pairs, "dim": sizes.train_dim, "batch": sizes.train_batch, "steps_per_epoch": steps,
            "timed_epochs": sizes.timed_epochs, "arch": p.model.arch, "loss": p.loss, "inputs": p.train.inputs, "rows": rows, "skipped": skipped}


# ------------------------------------------------------------------------------ evaluation


def metric_names(scores: dict[int | None, float]) -> dict[str, float]:
    return {f"map@{'all' if k is None else k}": v for k, v in scores.items()}


def evaluation(report: Report, device: torch.device, sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    from bench_map import BITS, Scale, random_set  # bench_map.py's random codes and labels

    data = random_set(Scale("eval", sizes.eval_query, sizes.eval_db, sizes.eval_labels), args.seed)
    topk = (50, None)
    mean_average_precision_torch(data[0][:16], data[1], data[2][:16], data[3], topk=topk, device=device)  # warm-up
    torch_s, on_device = best_time(lambda: mean_average_precision_torch(*data, topk=topk, device=device), 3)
    numpy_s, on_cpu = best_time(lambda: mean_average_precision(*data, topk=topk), 1)
    difference = max(abs(on_device[k] - on_cpu[k]) for k in topk)
    report.check("evaluation: torch = numpy", difference <= EQUAL, f"max |difference| {difference:.1e}")
    return {"queries": sizes.eval_query, "database": sizes.eval_db, "labels": sizes.eval_labels, "bits": BITS,
            "numpy_cpu_s": round(numpy_s, 3), "torch_device_s": round(torch_s, 3), "speedup": round(numpy_s / torch_s, 1),
            "numpy": metric_names(on_cpu), "torch": metric_names(on_device), "max_abs_difference": difference}


# ---------------------------------------------------------------------------------- report


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    cuda = device.type == "cuda"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit,
            "mode": "tiny" if args.tiny else "full", "sizes": asdict(TINY if args.tiny else FULL)}


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def map_cell(run: dict[str, Any], key: str) -> str:
    if "map" in run:
        return f"{run['map'][key]:.4f}"
    return "skipped" if "skipped" in run else "failed"


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    title = f"{env['gpu'] or env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date'][:10]}"
    lines = [f"### {title}" + (" (--tiny smoke run: sizes shrunk, the numbers mean nothing)" if env["mode"] == "tiny" else ""), ""]
    lines += table(["check", "result", "detail"], [[c["check"], "pass" if c["ok"] else "**FAIL**", c["detail"]] for c in data["checks"]])
    run = data.get("pipeline", {})
    if run.get("runs"):
        runs = run["runs"]
        lines.append(f"Demo pipeline, strict protocol; epochs {run['epochs']['fusion']} (task 0) + {run['epochs']['hash']} (task 1) "
                     f"instead of params.yaml's 30 + 30; each precision within {run['tolerance']} of fp32. Seconds per precision, all stages: "
                     + ", ".join(f"{name} {sum(r['seconds'].values()):.0f}" for name, r in runs.items() if "seconds" in r) + ".")
        lines.append("")
        keys = next((list(r["map"]) for r in runs.values() if "map" in r), [])
        lines += table(["bits", "direction", "metric", *runs], [[*key.split(" "), *(map_cell(r, key) for r in runs.values())] for key in keys])
    ext = data.get("extraction", {})
    if ext.get("precisions"):
        lines.append(f"Extraction, {ext['model']} (random weights), batch {ext['batch']}, {ext['images']} JPEGs of {ext['image_side']} px, "
                     f"{ext['workers']} decoding workers; pairs/s:")
        lines.append("")
        lines += table(["precision", "model alone", "end to end", "end to end / model"],
                       [[name, r["model_only_pairs_per_s"], r["end_to_end_pairs_per_s"],
                         f"{r['end_to_end_pairs_per_s'] / r['model_only_pairs_per_s']:.2f}"] if "skipped" not in r else [name, "skipped", "", ""]
                        for name, r in ext["precisions"].items()])
    train = data.get("training", {})
    if train.get("rows"):
        precisions = list(dict.fromkeys(r["precision"] for r in train["rows"]))
        lines.append(f"Training (engine.fit), {train['pairs']} pairs, {train['dim']}-d, batch {train['batch']} "
                     f"({train['steps_per_epoch']} steps/epoch), {train['arch']}, loss {train['loss']}, inputs {train['inputs']}; "
                     "ms per step (s per epoch):")
        lines.append("")
        by_task: dict[tuple, dict[str, str]] = {}
        for r in train["rows"]:
            by_task.setdefault((r["task"], r["bits"] or "-"), {})[r["precision"]] = f"{r['ms_per_step']:.1f} ({r['s_per_epoch']:.2f})"
        lines += table(["task", "bits", *precisions], [[*key, *(cells.get(p, "") for p in precisions)] for key, cells in by_task.items()])
    ev = data.get("evaluation", {})
    if "torch_device_s" in ev:
        lines.append(f"Evaluation, MAP@50 and MAP@all, {ev['queries']} x {ev['database']} items, {ev['bits']} bits:")
        lines.append("")
        lines += table(["numpy (CPU)", f"torch ({env['device']})", "speed-up", "max abs difference"],
                       [[f"{ev['numpy_cpu_s']:.2f} s", f"{ev['torch_device_s']:.3f} s", f"{ev['speedup']}x", f"{ev['max_abs_difference']:.1e}"]])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny only)")
    parser.add_argument("--tiny", action="store_true", help="shrink every size: a smoke run of the script (under a minute on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; with --tiny, in the temp folder)")
    parser.add_argument("--epochs", type=int, default=None, help="pipeline epochs per training task (default 10; 2 with --tiny)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |MAP - fp32's MAP| for bf16 and fp16 (default %(default)s)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding workers, extraction (default %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the pipeline's outputs and logs here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "cpu" and not args.tiny:
        print("gpu_check: --device cpu runs only with --tiny (full sizes take hours on a CPU)", file=sys.stderr)
        return 1
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; for a CPU smoke run of this script use --device cpu --tiny", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    sizes = TINY if args.tiny else FULL
    args.epochs = args.epochs or sizes.epochs
    out = args.out or (Path(tempfile.gettempdir()) / "cmhash-gpu-check-tiny.json" if args.tiny else DEFAULT_OUT)

    start = time.perf_counter()
    report = Report()
    report.data["environment"] = environment(device, args)
    print(json.dumps(report.data["environment"]), flush=True)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work = work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        sections = {
            "cuda_tests": lambda: cuda_tests(report, device, work),
            "evaluation": lambda: evaluation(report, device, sizes, args),
            "extraction": lambda: extraction(device, sizes, args, work),
            "training": lambda: training(device, sizes, args),
            "pipeline": lambda: pipeline(report, device, args, work),
        }
        for name, run in sections.items():
            report.section(name, run)
            report.data["ok"], report.data["seconds"] = report.ok, round(time.perf_counter() - start, 1)
            write_json(out, report.data)  # after every section: a run stopped part-way keeps what it measured
    print("\n" + markdown(report.data))
    print(f"report: {out}; {report.data['seconds']:.0f} s; {'every check passed' if report.ok else 'SOME CHECKS FAILED'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
