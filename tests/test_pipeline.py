"""The whole pipeline on a tiny config through the CLI, exactly as `dvc repro` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def ap(ranked_relevance: np.ndarray) -> float:
    """Straightforward AP of one ranking (docs/evaluation.md); 0 when nothing relevant is retrieved."""
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


def curves_by_loop(q: np.ndarray, db: np.ndarray, q_label: np.ndarray, db_label: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean precision and recall within each Hamming radius; an empty lookup has precision 0."""
    bits = q.shape[1]
    precision, recall = np.zeros(bits + 1), np.zeros(bits + 1)
    for code, label in zip(q, q_label):
        dist, relevant = (bits - db.astype(int) @ code.astype(int)) / 2, (db_label @ label) > 0
        for radius in range(bits + 1):
            found = relevant[dist <= radius].sum()
            precision[radius] += found / max((dist <= radius).sum(), 1)
            recall[radius] += found / relevant.sum() if relevant.any() else 0.0
    return list(precision / len(q)), list(recall / len(q))


def precision_at_by_loop(q: np.ndarray, db: np.ndarray, q_label: np.ndarray, db_label: np.ndarray, ns: list[int]) -> list[float]:
    totals = np.zeros(len(ns))
    for code, label in zip(q, q_label):
        order = np.argsort((q.shape[1] - db.astype(int) @ code.astype(int)) / 2, kind="stable")  # ties by database index
        relevant = (db_label[order] @ label) > 0
        totals += [relevant[:n].mean() for n in ns]
    return list(totals / len(q))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1


@pytest.mark.slow
def test_whole_pipeline_end_to_end(params, params_file, invoke):
    # (that dvc.yaml lists every param a stage reads is tests/test_stage_params.py's)
    params["hash_head"]["init"] = "cca_itq"  # params.yaml's default: the heads start from the baselines stage's CCA-ITQ
    params_file.write_text(yaml.safe_dump(params))
    for command in ("prepare", "extract", "baselines", "train-fusion", "train-hash", "evaluate"):
        result = invoke(command, "--params", params_file)
        assert result.exit_code == 0, f"{command}: {result.output}"
    # evaluate ends with the paper table, one per protocol: rows bits, real-valued, chance
    assert "MAP, strict protocol" in result.output and "MAP, paired protocol" in result.output
    assert "real-valued" in result.output and "chance" in result.output and "random-init" in result.output

    info = json.loads(Path("metrics/evaluate.json").read_text())
    assert info["features"]["random_init"] is True and "random-init" in info["note"]
    assert info["items"] == {"query": 12, "retrieval": 60}
    tables = {p.relative_to("metrics/map").with_suffix("").as_posix(): json.loads(p.read_text())
              for p in Path("metrics/map").rglob("*.json")}
    assert set(tables) == {"016", "032", "tie_aware/016", "tie_aware/032", "real_valued", "chance", "baselines"}
    assert "MAP against training-free baselines" in result.output
    baselines = tables.pop("baselines")
    assert set(baselines) == {"clip_cosine", "lsh", "pca_itq", "cca_itq"} and set(baselines["cca_itq"]) == {"16", "32"}
    for table in tables.values():  # the same columns in every row of `dvc metrics show metrics/map`
        assert {(p, d, m) for p in table for d in table[p] for m in table[p][d]} == {
            (p, d, m) for p in ("strict", "paired") for d in ("i2t", "t2i") for m in ("map@50", "map@all")}

    # the saved codes reproduce the reported numbers with an independent implementation
    labels = np.load("stages/evaluate/labels.npz")
    pr_files = {name: json.loads(Path(f"metrics/curves/pr/{name}.json").read_text())
                for name in ("strict-i2t", "strict-t2i", "paired-i2t", "paired-t2i")}
    pn_files = {name: json.loads(Path(f"metrics/curves/precision_at_n/{name}.json").read_text()) for name in pr_files}
    for protocol in ("strict", "paired"):
        for bits in (16, 32):
            codes = np.load(f"stages/evaluate/{protocol}/{bits}.npz")
            assert int(codes["bits"]) == bits
            q_img, q_txt, db_img, db_txt = (unpack(codes[n], bits)
                                            for n in ("query_image", "query_text", "retrieval_image", "retrieval_text"))
            assert len(q_img) == 12 and len(db_txt) == 60  # every query and database item scored
            for direction, (q, db) in {"i2t": (q_img, db_txt), "t2i": (q_txt, db_img)}.items():
                reported = tables[f"{bits:03d}"][protocol][direction]
                for k, name in ((50, "map@50"), (None, "map@all")):
                    assert reported[name] == pytest.approx(map_by_loop(q, db, labels["query"], labels["retrieval"], k))
                pr = [r for r in pr_files[f"{protocol}-{direction}"] if r["bits"] == bits]
                assert [r["radius"] for r in pr] == list(range(bits + 1))
                expected_p, expected_r = curves_by_loop(q, db, labels["query"], labels["retrieval"])
                assert [r["precision"] for r in pr] == pytest.approx(expected_p)
                assert [r["recall"] for r in pr] == pytest.approx(expected_r)
                pn = [r for r in pn_files[f"{protocol}-{direction}"] if r["bits"] == bits]
                assert [r["n"] for r in pn] == [1, 5, 10, 20, 50, 60]  # params' 100..1000 capped at the database
                expected_pn = precision_at_by_loop(q, db, labels["query"], labels["retrieval"], [1, 5, 10, 20, 50, 60])
                assert [r["precision"] for r in pn] == pytest.approx(expected_pn)

    # every curve plot in dvc.yaml reads files evaluate wrote, with the fields the plot names
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_stages = dvc_yaml["stages"]
    curve_plots = {target: spec for entry in dvc_yaml["plots"] if isinstance(entry, dict) for target, spec in entry.items()
                   if target.startswith("metrics/curves")}
    assert set(curve_plots) == {"metrics/curves/pr", "metrics/curves/precision_at_n"}
    for target, spec in curve_plots.items():
        template = json.loads((REPO / ".dvc" / "plots" / f"{spec['template']}.json").read_text())
        assert template["encoding"]["color"]["field"] == "bits"
        files = sorted(Path(target).glob("*.json"))
        assert [f.stem for f in files] == ["paired-i2t", "paired-t2i", "strict-i2t", "strict-t2i"]
        for f in files:
            rows = json.loads(f.read_text())
            assert {r["bits"] for r in rows} == {16, 32} and all({"bits", spec["x"], spec["y"]} <= set(r) for r in rows)
    evaluate_outs = {next(iter(o)) if isinstance(o, dict) else o
                     for o in dvc_stages["evaluate"]["outs"] + dvc_stages["evaluate"]["metrics"]}
    assert {"metrics/map.json", "metrics/map", "metrics/curves", "metrics/evaluate.json"} <= evaluate_outs

    # metrics/map.json holds the same tables in one file, code lengths unpadded
    one_file = json.loads(Path("metrics/map.json").read_text())
    assert list(one_file) == ["16", "32", "tie_aware", "real_valued", "chance", "baselines"]
    assert one_file["32"] == tables["032"] and one_file["tie_aware"]["16"] == tables["tie_aware/016"]
    assert (one_file["real_valued"], one_file["chance"]) == (tables["real_valued"], tables["chance"])

    # train-hash: one dvclive folder, curves per code length each from step 0, summary per code length
    hash_summary = json.loads(Path("metrics/hash/metrics.json").read_text())
    for bits in ("16", "32"):
        assert {"train", "val", "lr", "best_val_map", "best_epoch"} <= set(hash_summary[bits])
        rows = Path(f"metrics/hash/plots/metrics/{bits}/train/loss.tsv").read_text().splitlines()
        assert rows[1].split("\t")[0] == "0" and len(rows) == 1 + params["train"]["hash"]["epochs"]
    declared = {next(iter(e)) if isinstance(e, dict) else e for e in dvc_yaml["metrics"] + dvc_yaml["plots"]}
    assert {"metrics/fusion/metrics.json", "metrics/hash/metrics.json", "metrics/hash/plots/metrics"} <= declared

    curves = json.loads(Path("metrics/fusion/metrics.json").read_text())
    assert {"train", "val", "lr", "best_val_map", "best_epoch"} <= set(curves)
    assert Path("stages/fusion/model.pt").is_file() and Path("stages/hash/32/model.pt").is_file()
