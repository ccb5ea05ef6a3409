"""Stage `evaluate`: every query against the whole database, both directions, both protocols.

reads   stages/extract/{query,retrieval}.pkl, stages/fusion/model.pt, stages/hash/<bits>/model.pt
writes  metrics/map.json, stages/evaluate/<protocol>/<bits>.npz (the packed codes it scored)
        and stages/evaluate/labels.npz, so anyone can recompute the numbers.

Protocols: `strict` encodes the image query from the image alone and the text from the text
alone (real cross-modal retrieval); `paired` encodes both from the whole pair, as the public
reference does, for comparison with published numbers only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from cmhash.config import get, load_params
from cmhash.evaluation.ranking import chance_map, cosine_map, mean_average_precision, tie_aware_map
from cmhash.features import load_features
from cmhash.io import atomic_path, write_json
from cmhash.models import PROTOCOLS, encode, load_checkpoint, to_codes
from cmhash.pipeline import ParamsOption
from cmhash.training.precision import resolve_device

log = logging.getLogger("cmhash")
RANDOM_INIT_NOTE = "random-init CLIP features on synthetic data: these numbers test the pipeline, not the method"


def _named(scores: dict[int | None, float], prefix: str = "map") -> dict[str, float]:
    return {f"{prefix}@{'all' if k is None else k}": float(v) for k, v in scores.items()}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)


def evaluate_codes(q_codes: np.ndarray, db_codes: np.ndarray, q_label: np.ndarray, db_label: np.ndarray, topk) -> dict[str, float]:
    return {**_named(mean_average_precision(q_codes, db_codes, q_label, db_label, topk=topk)),
            **_named(tie_aware_map(q_codes, db_codes, q_label, db_label, topk=topk), "tie_aware_map")}


def run(params: dict, features_dir: Path, fusion_path: Path, hash_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    device = resolve_device(str(get(params, "device")))
    query, db = load_features(features_dir / "query.pkl", device), load_features(features_dir / "retrieval.pkl", device)
    topk = (*[int(k) for k in get(params, "evaluate.topk")], None)
    q_label, db_label = query.label.cpu().numpy(), db.label.cpu().numpy()
    _save_npz(out_dir / "labels.npz", query=q_label.astype(np.uint8), retrieval=db_label.astype(np.uint8))

    result: dict[str, Any] = {
        "features": {k: query.meta.get(k) for k in ("dataset", "clip_model", "pretrained", "random_init")},
        "chance": _named(chance_map(q_label, db_label, topk=topk)),
    }
    if query.meta.get("random_init"):
        result["note"] = RANDOM_INIT_NOTE

    def outputs(model, protocol: str, to_numpy) -> dict[str, np.ndarray]:
        q_image, q_text = encode(model, query.image, query.text, protocol)
        db_image, db_text = encode(model, db.image, db.text, protocol)
        named = {"query_image": q_image, "query_text": q_text, "retrieval_image": db_image, "retrieval_text": db_text}
        return {name: to_numpy(x) for name, x in named.items()}

    def both_ways(out: dict[str, np.ndarray], score) -> dict[str, Any]:
        return {"i2t": score(out["query_image"], out["retrieval_text"]), "t2i": score(out["query_text"], out["retrieval_image"])}

    fusion, _ = load_checkpoint(fusion_path, device)
    cosine = lambda q, d: _named(cosine_map(q, d, q_label, db_label, topk=topk))  # noqa: E731
    result["real_valued"] = {protocol: both_ways(outputs(fusion, protocol, lambda x: x.float().cpu().numpy()), cosine) for protocol in PROTOCOLS}

    hamming = lambda q, d: evaluate_codes(q, d, q_label, db_label, topk)  # noqa: E731
    for protocol in PROTOCOLS:
        result[protocol] = {"i2t": {}, "t2i": {}}
    for bits in [int(b) for b in get(params, "bits")]:
        model, _ = load_checkpoint(hash_dir / str(bits) / "model.pt", device)
        for protocol in PROTOCOLS:
            codes = outputs(model, protocol, lambda x: to_codes(x).cpu().numpy())
            for direction, scores in both_ways(codes, hamming).items():
                result[protocol][direction][str(bits)] = scores
            _save_npz(out_dir / protocol / f"{bits}.npz", bits=np.array(bits), **{n: np.packbits(c > 0, axis=1) for n, c in codes.items()})
    write_json(metrics_path, result)
    return result


def command(
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract`.")] = Path("stages/extract"),
    fusion: Annotated[Path, typer.Option(help="task-0 checkpoint (real-valued numbers).")] = Path("stages/fusion/model.pt"),
    hash_dir: Annotated[Path, typer.Option(help="task-1 checkpoints, <hash-dir>/<bits>/model.pt.")] = Path("stages/hash"),
    out_dir: Annotated[Path, typer.Option(help="where the scored codes are saved.")] = Path("stages/evaluate"),
    metrics: Annotated[Path, typer.Option(help="MAP table (git-tracked).")] = Path("metrics/map.json"),
) -> None:
    """MAP@K and MAP@all, image->text and text->image, every code length, strict and paired."""
    run(load_params(params), features_dir, fusion, hash_dir, out_dir, metrics)
