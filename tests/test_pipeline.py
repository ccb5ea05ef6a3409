"""The whole pipeline on a tiny config through the CLI, exactly as `dvc repro` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cmhash.cli import app
from cmhash.config import load_params

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = {"prepare": "prepare", "extract": "extract", "train_fusion": "train_fusion", "train_hash": "train_hash", "evaluate": "evaluate"}


class Recorder(dict):
    """A params dict that records every dotted key read from it."""

    def __init__(self, data: dict, reads: set[str], prefix: str = "") -> None:
        super().__init__({k: Recorder(v, reads, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self._reads, self._prefix = reads, prefix

    def __getitem__(self, key):
        self._reads.add(self._prefix + key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def ap(ranked_relevance: np.ndarray) -> float:
    """Straightforward AP of one ranking (DESIGN.md §6); 0 when nothing relevant is retrieved."""
    hits = np.cumsum(ranked_relevance)
    ranks = np.flatnonzero(ranked_relevance) + 1
    return float(np.mean(hits[ranks - 1] / ranks)) if len(ranks) else 0.0


def map_by_loop(q: np.ndarray, db: np.ndarray, q_label: np.ndarray, db_label: np.ndarray, k: int | None) -> float:
    scores = []
    for code, label in zip(q, q_label):
        dist = (q.shape[1] - db.astype(int) @ code.astype(int)) / 2
        order = np.argsort(dist, kind="stable")[:k]  # ties by database index
        scores.append(ap((db_label[order] @ label) > 0))
    return float(np.mean(scores))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1


@pytest.mark.slow
def test_whole_pipeline_end_to_end(params_file, monkeypatch):
    reads: dict[str, set[str]] = {}
    for stage, module in STAGE_MODULES.items():  # record which params each stage reads
        reads[stage] = set()
        monkeypatch.setattr(f"cmhash.pipeline.{module}.load_params", lambda p, r=reads[stage]: Recorder(load_params(p), r))
    for command in ("prepare", "extract", "train-fusion", "train-hash", "evaluate"):
        result = CliRunner().invoke(app, [command, "--params", str(params_file)])
        assert result.exit_code == 0, f"{command}: {result.output}"

    # every param a stage reads is listed under its params: in dvc.yaml (or DVC would skip it)
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, keys in reads.items():
        listed = [str(p) for p in dvc_stages[stage]["params"]]
        for key in keys:
            covered = any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in listed)
            assert covered, f"stage {stage} reads `{key}` but dvc.yaml does not list it"

    metrics = json.loads(Path("metrics/map.json").read_text())
    assert metrics["features"]["random_init"] is True and "random-init" in metrics["note"]
    assert set(metrics["chance"]) == {"map@50", "map@all"}
    for protocol in ("strict", "paired"):
        for direction in ("i2t", "t2i"):
            assert set(metrics["real_valued"][protocol][direction]) == {"map@50", "map@all"}
            assert set(metrics[protocol][direction]) == {"16", "32"}

    # the saved codes reproduce the reported numbers with an independent implementation
    labels = np.load("stages/evaluate/labels.npz")
    for protocol in ("strict", "paired"):
        for bits in (16, 32):
            codes = np.load(f"stages/evaluate/{protocol}/{bits}.npz")
            assert int(codes["bits"]) == bits
            q_img, q_txt, db_img, db_txt = (unpack(codes[n], bits) for n in ("query_image", "query_text", "retrieval_image", "retrieval_text"))
            assert len(q_img) == 12 and len(db_txt) == 60  # every query and database item scored
            reported = metrics[protocol]
            for k, name in ((50, "map@50"), (None, "map@all")):
                assert reported["i2t"][str(bits)][name] == pytest.approx(map_by_loop(q_img, db_txt, labels["query"], labels["retrieval"], k))
                assert reported["t2i"][str(bits)][name] == pytest.approx(map_by_loop(q_txt, db_img, labels["query"], labels["retrieval"], k))

    curves = json.loads(Path("metrics/fusion/metrics.json").read_text())
    assert {"train", "val", "lr", "best_val_map", "best_epoch"} <= set(curves)
    assert Path("stages/fusion/model.pt").is_file() and Path("stages/hash/32/model.pt").is_file()
