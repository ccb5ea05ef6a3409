"""Stage `evaluate`: every query against the whole database, both directions, both protocols.

reads   stages/extract/{query,retrieval}.pkl, stages/fusion/model.pt, stages/hash/<bits>/model.pt
writes  (under metrics/, git-tracked; key names are stable and documented in docs/evaluation.md)
        map.json                   all of the below in one file: {"<bits>": ..., "tie_aware": {"<bits>": ...},
                                   "real_valued": ..., "chance": ...}, what `dvc metrics diff` compares
        map/<bits>.json            MAP of the Hamming ranking (ties by database index)
        map/tie_aware/<bits>.json  tie-aware MAP (expected over the orders of tied items)
        map/real_valued.json       task-0 cosine MAP
        map/chance.json            expected MAP of a random ranking
        map/baselines.json         the baselines stage's methods, strict protocol:
                                   {method: {"<bits>" | "float": {"strict": {direction: {...}}}}}
                                   (clip_cosine ranks float features: "float", no code length)
            each {protocol: {direction: {"map@K", ..., "map@all"}}}: the same numbers as map.json, one
            row per file in `dvc metrics show metrics/map`, the same columns in every row (a paper table)
        recall.json                Recall@K of the paired item, K in `evaluate.recall_at`, within the query split:
                                   {"<bits>": {protocol: {direction: {"recall@K"}}}, "real_valued": ...,
                                   "baselines": {method: {"<bits>" | "float": {"strict": ...}}}}
        evaluate.json              what was scored: features, item counts, the random-init note
        curves/pr/<protocol>-<direction>.json              precision and recall within Hamming
                                                           radius 0..bits, rows tagged with `bits`
        curves/precision_at_n/<protocol>-<direction>.json  precision@N, N in `evaluate.precision_at`
        <bits> in map/ is zero-padded to 3 digits so files and rows sort by code length.
        Also stages/evaluate/<protocol>/<bits>.npz (the packed codes it scored), the baselines' as
        stages/evaluate/baselines/<method>/<bits>.npz, and stages/evaluate/labels.npz, so anyone
        can recompute the numbers.
        An unlabelled collection (features with no label columns) gets recall.json only: map.json is
        {"map_skipped": reason}, map/ holds skipped.json, curves/ is empty (PR and P@N need labels too).

Protocols: `strict` encodes the image query from the image alone and the text from the text
alone (real cross-modal retrieval); `paired` encodes both from the whole pair, as the public
reference does, for comparison with published numbers only.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console

from cmhash.config.options import ParamsOption
from cmhash.config.schema import Params, load_params
from cmhash.config.stages import EvaluateSettings
from cmhash.evaluation.curves import pr_curve, precision_at_n
from cmhash.evaluation.ranking import Scores, chance_map, cosine_map, mean_average_precision, tie_aware_map
from cmhash.evaluation.recall import group_ids, paired_recall
from cmhash.evaluation.tables import DIRECTIONS, MapTable, baseline_table, file_stem, paper_tables, recall_table
from cmhash.io import all_or_nothing, atomic_dir, save_npz, write_json

if TYPE_CHECKING:
    import torch

RANDOM_INIT_NOTE = "random-init CLIP features on synthetic data: these numbers test the pipeline, not the method"
NO_LABELS = "collection has no labels: MAP needs them; see recall.json"


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return EvaluateSettings.of(p).reads()


def hamming_map(device: torch.device) -> Callable[..., Scores]:
    """MAP@K / MAP@all of the Hamming ranking: numpy on CPU (the reference path, so a CPU run's
    numbers never move), torch on the GPU for a CUDA device (the same numbers, see ranking_torch)."""
    if device.type != "cuda":
        return mean_average_precision
    from cmhash.evaluation.ranking_torch import mean_average_precision_torch

    return functools.partial(mean_average_precision_torch, device=device)


def _named(scores: dict[int | None, float]) -> dict[str, float]:
    return {f"map@{'all' if k is None else k}": float(v) for k, v in scores.items()}


def replace_dir(path: Path, files: dict[str, Any]) -> None:
    """Make `files` (relative path -> JSON object) the whole content of `path`, so no file of an
    earlier run (other code lengths) stays."""
    with atomic_dir(path) as tmp:
        for name, content in files.items():
            write_json(tmp / name, content)


def one_file(tables: dict[str, MapTable], bits: list[int]) -> dict[str, Any]:
    """metrics/map.json: code lengths first (unpadded), then tie-aware, real-valued, chance and the baselines."""
    return {**{str(b): tables[file_stem(b)] for b in bits}, "tie_aware": {str(b): tables[f"tie_aware/{file_stem(b)}"] for b in bits},
            "real_valued": tables["real_valued"], "chance": tables["chance"],
            **({"baselines": tables["baselines"]} if "baselines" in tables else {})}


def baseline_scores(baselines_dir: Path, bits_list: list[int], q_label: np.ndarray, db_label: np.ndarray, topk: tuple,
                    hamming: Callable[..., Scores], recall: Callable[..., dict]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The baselines stage's codes (and float features), scored as cmhash's are: the strict
    protocol, both directions; MAP only for a labelled collection. Returns the MAP table, the
    Recall@K table and the files to save beside cmhash's codes."""
    from cmhash.errors import DataError

    maps: dict[str, Any] = {}
    recalls: dict[str, Any] = {}
    files: dict[str, dict[str, np.ndarray]] = {}
    for folder in sorted(p for p in baselines_dir.iterdir() if p.is_dir()):
        names = ["float"] if (folder / "float.npz").is_file() else [str(b) for b in bits_list]
        for name in names:
            path = folder / f"{name}.npz"
            if not path.is_file():
                raise DataError(f"{path} not found: the baselines were made for other code lengths; re-run `cmhash baselines`")
            with np.load(path, allow_pickle=False) as saved:
                arrays = {side: saved[side] for side in ("query_image", "query_text", "retrieval_image", "retrieval_text")}
            if len(arrays["query_image"]) != len(q_label) or len(arrays["retrieval_image"]) != len(db_label):
                raise DataError(f"{path} holds {len(arrays['query_image'])} query / {len(arrays['retrieval_image'])} retrieval items but the "
                                f"features have {len(q_label)} / {len(db_label)}: made from other features; re-run `cmhash baselines`")
            if name == "float":  # unhashed features: cosine, as the real-valued reference is scored
                sides, score, kind = arrays, cosine_map, "cosine"
            else:  # the packed codes back to ±1, scored by the ranking cmhash's codes get
                sides = {side: np.where(np.unpackbits(packed, axis=1, count=int(name)) > 0, 1, -1).astype(np.int8)
                         for side, packed in arrays.items()}
                score, kind = hamming, "hamming"
            if q_label.shape[1]:
                maps.setdefault(folder.name, {})[name] = {"strict": {
                    direction: _named(score(sides[q], sides[d], q_label, db_label, topk=topk)) for direction, (q, d) in DIRECTIONS.items()}}
            recalls.setdefault(folder.name, {})[name] = {"strict": recall(sides["query_image"], sides["query_text"], kind)}
            files[f"{folder.name}/{name}.npz"] = arrays
    return maps, recalls, files


def curve_rows(bits: int, query_codes: np.ndarray, db_codes: np.ndarray, q_label: np.ndarray, db_label: np.ndarray,
               ns: list[int]) -> dict[str, list[dict]]:
    """One code length's PR (radius 0..bits) and P@N rows, each tagged with `bits`: a file holds
    every code length, and the `code_lengths` plot template draws one line per `bits`."""
    precision, recall = pr_curve(query_codes, db_codes, q_label, db_label)
    pr = [{"bits": bits, "radius": r, "recall": float(rc), "precision": float(p)} for r, (p, rc) in enumerate(zip(precision, recall))]
    at_n = precision_at_n(query_codes, db_codes, q_label, db_label, ns=ns)
    return {"pr": pr, "precision_at_n": [{"bits": bits, "n": n, "precision": float(p)} for n, p in zip(ns, at_n)]}


def run(settings: EvaluateSettings, features_dir: Path, fusion_path: Path, hash_dir: Path, out_dir: Path,
        metrics_dir: Path, baselines_dir: Path | None = None) -> dict[str, Any]:
    from cmhash.features.store import check_width, load_features
    from cmhash.models import PROTOCOLS, encode, load_checkpoint, to_codes
    from cmhash.runtime.device import resolve_device

    device = resolve_device(settings.device)
    bits_list, topk, precision_at = settings.bits, (*settings.evaluate.topk, None), settings.evaluate.precision_at
    query, db = load_features(features_dir / "query.pkl", device), load_features(features_dir / "retrieval.pkl", device)
    # every model is loaded and checked against the features before any output is written
    checkpoints = {None: fusion_path, **{bits: hash_dir / str(bits) / "model.pt" for bits in bits_list}}
    models = {bits: load_checkpoint(path, device)[0] for bits, path in checkpoints.items()}
    for bits, model in models.items():
        for name, features in (("query.pkl", query), ("retrieval.pkl", db)):
            check_width(features, features_dir / name, checkpoints[bits], model.config.feature_dim)
    q_label, db_label = query.label.cpu().numpy(), db.label.cpu().numpy()
    labelled = q_label.shape[1] > 0
    ns = sorted({min(n, len(db_label)) for n in precision_at})  # N beyond the database = all of it
    groups = group_ids(query.meta.get("groups"), len(q_label))

    info: dict[str, Any] = {
        "features": {k: query.meta.get(k) for k in ("dataset", "clip_model", "pretrained", "random_init")},
        "items": {"query": len(q_label), "retrieval": len(db_label)},
        "recall": {"database": "the query split (each query's paired item is there)", "images": int(groups.max()) + 1,
                   "captions": len(groups)},
    }
    if not labelled:
        info["map_skipped"] = NO_LABELS
    note = RANDOM_INIT_NOTE if query.meta.get("random_init") else None
    if note:
        info["note"] = note

    def outputs(model, protocol: str, to_numpy) -> dict[str, np.ndarray]:
        q_image, q_text = encode(model, query.image, query.text, protocol)
        db_image, db_text = encode(model, db.image, db.text, protocol)
        named = {"query_image": q_image, "query_text": q_text, "retrieval_image": db_image, "retrieval_text": db_text}
        return {name: to_numpy(x) for name, x in named.items()}

    def table(per_protocol: dict[str, dict[str, np.ndarray]], score) -> MapTable:
        return {protocol: {direction: _named(score(out[q], out[d])) for direction, (q, d) in DIRECTIONS.items()}
                for protocol, out in per_protocol.items()}

    def recall(image: np.ndarray, text: np.ndarray, kind: str) -> dict[str, dict[str, float]]:
        return paired_recall(image, text, groups, settings.evaluate.recall_at, kind)

    def recalls(per_protocol: dict[str, dict[str, np.ndarray]], kind: str) -> MapTable:
        return {protocol: recall(out["query_image"], out["query_text"], kind) for protocol, out in per_protocol.items()}

    hamming = hamming_map(device)
    tables: dict[str, MapTable] = {}
    embeddings = {p: outputs(models[None], p, lambda x: x.float().cpu().numpy()) for p in PROTOCOLS}
    recall_tables: dict[str, Any] = {"real_valued": recalls(embeddings, "cosine")}
    if labelled:
        chance = _named(chance_map(q_label, db_label, topk=topk))  # depends on the labels only
        tables["chance"] = {p: dict.fromkeys(DIRECTIONS, chance) for p in PROTOCOLS}
        tables["real_valued"] = table(embeddings, lambda q, d: cosine_map(q, d, q_label, db_label, topk=topk))

    curves: dict[str, list[dict]] = defaultdict(list)  # <kind>/<protocol>-<direction>.json -> rows
    packed: dict[int, dict[str, dict[str, np.ndarray]]] = {}  # bits -> protocol -> packed codes
    for bits in bits_list:
        codes = {p: outputs(models[bits], p, lambda x: to_codes(x).cpu().numpy()) for p in PROTOCOLS}
        recall_tables[str(bits)] = recalls(codes, "hamming")
        if labelled:
            stem = file_stem(bits)
            tables[stem] = table(codes, lambda q, d: hamming(q, d, q_label, db_label, topk=topk))
            tables[f"tie_aware/{stem}"] = table(codes, lambda q, d: tie_aware_map(q, d, q_label, db_label, topk=topk))
            for protocol, out in codes.items():
                for direction, (q, d) in DIRECTIONS.items():
                    for kind, rows in curve_rows(bits, out[q], out[d], q_label, db_label, ns).items():
                        curves[f"{kind}/{protocol}-{direction}.json"] += rows
        packed[bits] = {p: {n: np.packbits(c > 0, axis=1) for n, c in named.items()} for p, named in codes.items()}
    baseline_files: dict[str, dict[str, np.ndarray]] = {}
    if baselines_dir is not None and baselines_dir.is_dir():
        baseline_map, recall_tables["baselines"], baseline_files = baseline_scores(
            baselines_dir, bits_list, q_label, db_label, topk, hamming, recall)
        if labelled:
            tables["baselines"] = baseline_map
    recall_file = {**{str(b): recall_tables[str(b)] for b in bits_list},
                   **{k: recall_tables[k] for k in ("real_valued", "baselines") if k in recall_tables}}
    map_files = {f"{name}.json": content for name, content in tables.items()} if labelled else {"skipped.json": {"map_skipped": NO_LABELS}}

    with all_or_nothing():  # a failure part-way keeps every previous output, not a mix
        save_npz(out_dir / "labels.npz", query=q_label.astype(np.uint8), retrieval=db_label.astype(np.uint8))
        save_npz(out_dir / "groups.npz", query=groups)
        for bits, per_protocol in packed.items():
            for protocol, named in per_protocol.items():
                save_npz(out_dir / protocol / f"{bits}.npz", bits=np.array(bits), **named)
        if baseline_files:  # the codes scored this run, and no other
            with atomic_dir(out_dir / "baselines") as tmp:
                for name, arrays in baseline_files.items():
                    save_npz(tmp / name, **arrays)
        write_json(metrics_dir / "map.json", one_file(tables, bits_list) if labelled else {"map_skipped": NO_LABELS})
        write_json(metrics_dir / "recall.json", recall_file)
        replace_dir(metrics_dir / "map", map_files)
        replace_dir(metrics_dir / "curves", curves)
        write_json(metrics_dir / "evaluate.json", info)
    console = Console()
    if labelled:
        console.print(*paper_tables(tables, bits_list, note))
        if "baselines" in tables:
            console.print(baseline_table(tables, bits_list, note))
    else:
        console.print(NO_LABELS)
    console.print(recall_table(recall_file, bits_list, note))
    return {"map": tables, "recall": recall_file, "evaluate": info, "curves": dict(curves)}


def command(
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract`.")] = Path("stages/extract"),
    fusion: Annotated[Path, typer.Option(help="task-0 checkpoint (real-valued numbers).")] = Path("stages/fusion/model.pt"),
    hash_dir: Annotated[Path, typer.Option(help="task-1 checkpoints, <hash-dir>/<bits>/model.pt.")] = Path("stages/hash"),
    baselines_dir: Annotated[Path, typer.Option(help="codes from `cmhash baselines` (skipped when absent).")] = Path("stages/baselines"),
    out_dir: Annotated[Path, typer.Option(help="where the scored codes are saved.")] = Path("stages/evaluate"),
    metrics_dir: Annotated[Path, typer.Option(help="where map.json, map/, recall.json, curves/, evaluate.json go (git-tracked).")] = Path("metrics"),
) -> None:
    """MAP@K, MAP@all, Recall@K, PR and precision@N curves: image->text and text->image, every code length, both protocols."""
    run(EvaluateSettings.of(load_params(params)), features_dir, fusion, hash_dir, out_dir, metrics_dir, baselines_dir)
