"""The `baselines` stage and what `evaluate` makes of it, through the CLI on tiny synthetic
features: the files it writes and the codes in them (recomputed from the saved linear hash), the
val report and that its knobs never see the query set, the baselines' MAP in evaluate's metrics
(recomputed from the saved codes) leaving cmhash's own tables untouched, the comparison table,
and bad inputs as one line with nothing written. The methods themselves: tests/test_baselines.py."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from cmhash.evaluation.ranking import cosine_map, mean_average_precision
from cmhash.evaluation.tables import baseline_table, best_baseline
from cmhash.io import load_pickle, save_pickle
from conftest import SYNTHETIC_DIM, synthetic, tiny_params
from test_pipeline import map_by_loop

BITS = [8, 16]
HASHING = ("lsh", "pca_itq", "cca_itq")
SIDES = ("query_image", "query_text", "retrieval_image", "retrieval_text")
FAST_KNOBS = {"cca_itq": {"ridge": [1e-3, 1e-1], "scale_power": [0.0, 1.0], "n_iter": 5}, "pca_itq": {"n_iter": 5}}
SIZES = {"train": (48, 1), "val": (16, 2), "query": (12, 3), "retrieval": (40, 4)}  # pairs, seed


def baseline_params(**top) -> dict:
    """The tests' params with small code lengths and fast baseline knobs; `top` overrides top-level keys."""
    p = tiny_params()
    p["bits"] = list(BITS)
    for method, knobs in FAST_KNOBS.items():
        p["baselines"][method] = copy.deepcopy(knobs)
    p.update(top)
    return p


@pytest.fixture
def splits(features_dir: Path) -> Path:
    """conftest's train.pkl and val.pkl, plus query.pkl and retrieval.pkl of the same kind."""
    for name in ("query", "retrieval"):
        n, seed = SIZES[name]
        save_pickle(features_dir / f"{name}.pkl", synthetic(n, seed))
    return features_dir


def write_params(root: Path, p: dict, name: str = "params.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(p))
    return path


def run_baselines(invoke, params_path: Path, features: Path, out: Path, metrics: Path):
    return invoke("baselines", "--params", params_path, "--features-dir", features, "--out-dir", out, "--metrics", metrics)


def baselines_ok(invoke, root: Path, features: Path, p: dict | None = None, tag: str = "") -> tuple[Path, dict]:
    """Run the stage into root/baselines<tag>; its out dir and the parsed val report."""
    out, metrics = root / f"baselines{tag}", root / f"metrics{tag}" / "baselines_val.json"
    result = run_baselines(invoke, write_params(root, p or baseline_params(), f"params{tag}.yaml"), features, out, metrics)
    assert result.exit_code == 0, result.output
    return out, json.loads(metrics.read_text())


def unit(x: np.ndarray) -> np.ndarray:
    """Rows to unit L2 norm, float32 (as the model normalises its inputs)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bits_of(projected: np.ndarray) -> np.ndarray:
    """0/1 bits of sign(projected), 0 counted as positive."""
    return (projected >= 0).astype(np.uint8)


def pm1(bits01: np.ndarray) -> np.ndarray:
    return bits01.astype(np.int8) * 2 - 1


def features(folder: Path) -> dict[str, dict]:
    return {name: load_pickle(folder / f"{name}.pkl") for name in SIZES}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cosine_map_by_loop(q: np.ndarray, db: np.ndarray, q_label: np.ndarray, db_label: np.ndarray, k: int | None) -> float:
    """Straightforward cosine-ranked MAP@k (the tiny features have no ties)."""
    from test_pipeline import ap

    sims = unit(q).astype(np.float64) @ unit(db).astype(np.float64).T
    return float(np.mean([ap((db_label[np.argsort(-s, kind="stable")[:k]] @ label) > 0) for s, label in zip(sims, q_label)]))


# ----------------------------------------------------------------------------------- the stage's files


def test_every_method_and_length_is_written_and_its_codes_follow_from_the_saved_hash(tmp_path, splits, invoke):
    out, _ = baselines_ok(invoke, tmp_path, splits)
    expected = {"clip_cosine", "clip_cosine/float.npz"} | set(HASHING) | {f"{m}/{b}.npz" for m in HASHING for b in BITS}
    assert tree(out) == expected
    feats = features(splits)
    data = {"query": (feats["query"]["image"], feats["query"]["text"]), "retrieval": (feats["retrieval"]["image"], feats["retrieval"]["text"])}
    train_image, train_text = unit(feats["train"]["image"]), unit(feats["train"]["text"])

    for method, bits in itertools.product(HASHING, BITS):
        with np.load(out / method / f"{bits}.npz", allow_pickle=False) as saved:
            assert set(saved.files) == {*SIDES, "bits", "image_mean", "image_projection", "text_mean", "text_projection"}
            assert int(saved["bits"]) == bits
            for modality in ("image", "text"):
                assert saved[f"{modality}_projection"].shape == (SYNTHETIC_DIM, bits)
            # each modality centred by its own (unit-row) train mean
            np.testing.assert_allclose(saved["image_mean"], train_image.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(saved["text_mean"], train_text.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
            for side in SIDES:
                split, modality = side.split("_")
                x = unit(data[split][modality == "text"])
                packed = saved[side]
                assert packed.dtype == np.uint8 and packed.shape == (SIZES[split][0], -(-bits // 8))
                expected_bits = bits_of((x - saved[f"{modality}_mean"]) @ saved[f"{modality}_projection"])
                np.testing.assert_array_equal(np.unpackbits(packed, axis=1, count=bits), expected_bits, err_msg=f"{method} {bits} {side}")
            if method == "lsh":  # one seeded Gaussian, shared by both modalities
                gaussian = np.random.default_rng(tiny_params()["seed"]).standard_normal((SYNTHETIC_DIM, bits))
                np.testing.assert_array_equal(saved["image_projection"], gaussian)
                np.testing.assert_array_equal(saved["text_projection"], gaussian)
            if method == "pca_itq":  # shared, orthonormal columns spanning the top-`bits` PCA subspace of both modalities
                p = saved["image_projection"]
                np.testing.assert_array_equal(p, saved["text_projection"])
                np.testing.assert_allclose(p.T @ p, np.eye(bits), atol=1e-8)
                stacked = np.vstack([train_image - train_image.mean(axis=0, dtype=np.float64),
                                     train_text - train_text.mean(axis=0, dtype=np.float64)])
                top = np.linalg.eigh(stacked.T @ stacked)[1][:, ::-1][:, :bits]
                np.testing.assert_allclose(p @ p.T, top @ top.T, atol=1e-6)

    with np.load(out / "clip_cosine" / "float.npz", allow_pickle=False) as saved:
        assert set(saved.files) == set(SIDES)
        for side in SIDES:
            split, modality = side.split("_")
            assert saved[side].dtype == np.float32
            np.testing.assert_allclose(saved[side], unit(data[split][modality == "text"]), rtol=1e-6, atol=1e-7)


def test_the_val_report_has_every_candidate_and_keeps_the_best(tmp_path, splits, invoke):
    out, report = baselines_ok(invoke, tmp_path, splits)
    p = baseline_params()
    assert list(report) == p["baselines"]["methods"]
    feats = features(splits)
    train, val = feats["train"], feats["val"]
    topk = p["baselines"]["select_topk"]
    for method in p["baselines"]["methods"]:
        knobs = p["baselines"][method]
        assert list(report[method]) == (["float"] if method == "clip_cosine" else [str(b) for b in BITS])
        grid = [dict(zip(knobs, combo)) for combo in itertools.product(*(v if isinstance(v, list) else [v] for v in knobs.values()))]
        for name, entry in report[method].items():
            assert set(entry) == {"chosen", "val"}
            rows = entry["val"]
            assert [row["knobs"] for row in rows] == grid  # every combination, in list order
            for row in rows:
                assert row["map"] == pytest.approx((row["i2t"] + row["t2i"]) / 2)
            best = max(row["map"] for row in rows)
            assert entry["chosen"] == next(row["knobs"] for row in rows if row["map"] == best)  # first of the best
            chosen_row = next(row for row in rows if row["knobs"] == entry["chosen"])

            # the chosen row's val MAP, recomputed from the saved hash: val pairs vs train pairs, strict
            if method == "clip_cosine":
                i2t = cosine_map_by_loop(val["image"], train["text"], val["label"], train["label"], topk)
                t2i = cosine_map_by_loop(val["text"], train["image"], val["label"], train["label"], topk)
            else:
                with np.load(out / method / f"{name}.npz", allow_pickle=False) as saved:
                    code = {m: lambda x, m=m: pm1(bits_of((unit(x) - saved[f"{m}_mean"]) @ saved[f"{m}_projection"]))
                            for m in ("image", "text")}
                    i2t = map_by_loop(code["image"](val["image"]), code["text"](train["text"]), val["label"], train["label"], topk)
                    t2i = map_by_loop(code["text"](val["text"]), code["image"](train["image"]), val["label"], train["label"], topk)
            assert (chosen_row["i2t"], chosen_row["t2i"]) == pytest.approx((i2t, t2i)), f"{method} {name}"
    # more than one candidate, and the candidates do not all score alike: the choice is a real one
    assert len({row["map"] for row in report["cca_itq"]["8"]["val"]}) == 4


# ----------------------------------------------------------------------------------- chosen on val only


def test_knobs_are_chosen_on_val_never_on_the_query_or_retrieval_sets(tmp_path, splits, invoke):
    first_out, first = baselines_ok(invoke, tmp_path, splits, tag="-a")
    for name, seed in (("query", 31), ("retrieval", 41)):  # other pairs, other sizes
        save_pickle(splits / f"{name}.pkl", synthetic(SIZES[name][0] + 5, seed))
    second_out, second = baselines_ok(invoke, tmp_path, splits, tag="-b")
    assert (tmp_path / "metrics-a/baselines_val.json").read_bytes() == (tmp_path / "metrics-b/baselines_val.json").read_bytes()
    assert first == second
    for method, bits in itertools.product(HASHING, BITS):  # the same fitted hash, new codes
        with np.load(first_out / method / f"{bits}.npz") as a, np.load(second_out / method / f"{bits}.npz") as b:
            for key in ("image_mean", "image_projection", "text_mean", "text_projection"):
                np.testing.assert_array_equal(a[key], b[key])
            assert len(b["query_image"]) == SIZES["query"][0] + 5 and not np.array_equal(a["query_image"], b["query_image"][:12])

    # while another val set does change the val table (the check above is not vacuous)
    save_pickle(splits / "val.pkl", synthetic(SIZES["val"][0], seed=99))
    _, third = baselines_ok(invoke, tmp_path, splits, tag="-c")
    assert third["cca_itq"]["8"]["val"] != first["cca_itq"]["8"]["val"]


# ----------------------------------------------------------------------------------- evaluate


def checkpoints(root: Path, p: dict, bits: list[int]) -> tuple[Path, Path]:
    """Random-weight task-0 and task-1 checkpoints for `p`'s model on the synthetic features (no training)."""
    import torch

    from cmhash.config.schema import parse_params
    from cmhash.models import CrossModalHasher, ModelConfig, save_checkpoint

    parsed = parse_params(p)
    torch.manual_seed(0)
    for b in (None, *bits):
        config = ModelConfig(arch=parsed.model.arch, knobs=parsed.model.knobs.model_dump(), feature_dim=SYNTHETIC_DIM, bits=b,
                             hash_head=parsed.hash_head if b else None, loss=parsed.loss)
        save_checkpoint(root / "fusion.pt" if b is None else root / "hash" / str(b) / "model.pt", CrossModalHasher(config))
    return root / "fusion.pt", root / "hash"


def run_evaluate(invoke, params_path: Path, features: Path, fusion: Path, hash_dir: Path, baselines: Path, out: Path, metrics: Path):
    return invoke("evaluate", "--params", params_path, "--features-dir", features, "--fusion", fusion, "--hash-dir", hash_dir,
                  "--baselines-dir", baselines, "--out-dir", out, "--metrics-dir", metrics)


def test_evaluate_scores_the_baselines_codes_as_it_scores_cmhash_and_leaves_its_tables_alone(tmp_path, splits, invoke):
    baselines, _ = baselines_ok(invoke, tmp_path, splits)
    params_path = tmp_path / "params.yaml"
    fusion, hash_dir = checkpoints(tmp_path, baseline_params(), BITS)
    with_b = run_evaluate(invoke, params_path, splits, fusion, hash_dir, baselines, tmp_path / "eval-a", tmp_path / "m-a")
    assert with_b.exit_code == 0, with_b.output
    assert "MAP against training-free baselines, strict protocol" in with_b.output
    table = json.loads((tmp_path / "m-a/map/baselines.json").read_text())
    assert json.loads((tmp_path / "m-a/map.json").read_text())["baselines"] == table

    feats = features(splits)
    q_label, db_label = feats["query"]["label"], feats["retrieval"]["label"]
    assert set(table) == {"clip_cosine", *HASHING}
    assert set(table["clip_cosine"]) == {"float"} and all(set(table[m]) == {str(b) for b in BITS} for m in HASHING)
    scored = tmp_path / "eval-a" / "baselines"
    assert tree(scored) == tree(baselines)
    for method, lengths in table.items():
        for name, protocols in lengths.items():
            assert list(protocols) == ["strict"]
            with np.load(scored / method / f"{name}.npz") as saved, np.load(baselines / method / f"{name}.npz") as made:
                assert set(saved.files) == set(SIDES)
                for side in SIDES:  # what evaluate saved is what the stage made
                    np.testing.assert_array_equal(saved[side], made[side])
                if name == "float":
                    sides, score = {s: saved[s] for s in SIDES}, cosine_map
                else:
                    sides, score = {s: pm1(np.unpackbits(saved[s], axis=1, count=int(name))) for s in SIDES}, mean_average_precision
            for direction, (q, db) in {"i2t": ("query_image", "retrieval_text"), "t2i": ("query_text", "retrieval_image")}.items():
                expected = score(sides[q], sides[db], q_label, db_label, topk=(50, None))
                assert protocols["strict"][direction] == {"map@50": expected[50], "map@all": expected[None]}, f"{method} {name} {direction}"
    # one independent spot check of the ranking itself
    lsh = {s: pm1(np.unpackbits(np.load(scored / "lsh/16.npz")[s], axis=1, count=16)) for s in SIDES}
    assert table["lsh"]["16"]["strict"]["i2t"]["map@all"] == pytest.approx(
        map_by_loop(lsh["query_image"], lsh["retrieval_text"], q_label, db_label, None))

    # without baselines (their folder absent): cmhash's tables are byte for byte the same, and no baselines table
    without = run_evaluate(invoke, params_path, splits, fusion, hash_dir, tmp_path / "absent", tmp_path / "eval-b", tmp_path / "m-b")
    assert without.exit_code == 0, without.output
    assert "training-free baselines" not in without.output
    files_a, files_b = tree(tmp_path / "m-a/map"), tree(tmp_path / "m-b/map")
    assert files_a - files_b == {"baselines.json"} and files_b <= files_a
    for name in files_b:
        path_a, path_b = tmp_path / "m-a/map" / name, tmp_path / "m-b/map" / name
        if path_a.is_file():
            assert path_a.read_bytes() == path_b.read_bytes(), name
    assert {f"{b:03d}.json" for b in BITS} <= files_b
    one_a, one_b = (json.loads((tmp_path / m / "map.json").read_text()) for m in ("m-a", "m-b"))
    assert list(one_a) == [*list(one_b), "baselines"] and {k: v for k, v in one_a.items() if k != "baselines"} == one_b
    assert not (tmp_path / "eval-b" / "baselines").exists()


def test_evaluate_refuses_baselines_made_for_other_code_lengths(tmp_path, splits, invoke, one_line_error):
    baselines, _ = baselines_ok(invoke, tmp_path, splits)
    params_path = write_params(tmp_path, baseline_params(bits=[8, 16, 32]), "params-32.yaml")
    fusion, hash_dir = checkpoints(tmp_path, baseline_params(), [8, 16, 32])
    before = tree(tmp_path)
    result = run_evaluate(invoke, params_path, splits, fusion, hash_dir, baselines, tmp_path / "eval", tmp_path / "m")
    line = one_line_error(result)
    assert "32.npz" in line and "cmhash baselines" in line
    assert tree(tmp_path) == before


def test_evaluate_refuses_baselines_of_other_features(tmp_path, splits, invoke, one_line_error):
    """Codes made from an earlier query set (another size) are refused, not scored against the new labels."""
    baselines, _ = baselines_ok(invoke, tmp_path, splits)
    save_pickle(splits / "query.pkl", synthetic(SIZES["query"][0] - 2, seed=5))
    fusion, hash_dir = checkpoints(tmp_path, baseline_params(), BITS)
    before = tree(tmp_path)
    result = run_evaluate(invoke, tmp_path / "params.yaml", splits, fusion, hash_dir, baselines, tmp_path / "eval", tmp_path / "m")
    one_line_error(result)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------------- the comparison table


def scores(i2t50: float, i2t_all: float, t2i50: float, t2i_all: float) -> dict:
    return {"i2t": {"map@50": i2t50, "map@all": i2t_all}, "t2i": {"map@50": t2i50, "map@all": t2i_all}}


HAND_MADE = {
    # at 8 bits lsh has the single highest number but pca_itq the highest mean; at 16 lsh wins
    "lsh": {"8": {"strict": scores(0.95, 0.10, 0.10, 0.10)}, "16": {"strict": scores(0.60, 0.60, 0.60, 0.60)}},
    "pca_itq": {"8": {"strict": scores(0.40, 0.40, 0.40, 0.40)}, "16": {"strict": scores(0.50, 0.50, 0.50, 0.50)}},
    "cca_itq": {"8": {"strict": scores(0.35, 0.35, 0.35, 0.35)}},
    "clip_cosine": {"float": {"strict": scores(0.99, 0.99, 0.99, 0.99)}},  # unhashed: never "the best baseline"
}


def test_best_baseline_is_the_highest_mean_hashing_method():
    assert best_baseline(HAND_MADE, 8) == "pca_itq"
    assert best_baseline(HAND_MADE, 16) == "lsh"
    assert best_baseline(HAND_MADE, 32) is None
    assert best_baseline({"clip_cosine": HAND_MADE["clip_cosine"]}, 8) is None


def rows(text: str) -> list[list[str]]:
    """The body rows of a rendered Rich table, as stripped cells."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def test_the_baseline_table_has_cmhash_and_the_best_baseline_per_length_then_clip_and_chance():
    tables = {"008": {"strict": scores(0.11, 0.12, 0.13, 0.14), "paired": scores(0.9, 0.9, 0.9, 0.9)},
              "016": {"strict": scores(0.21, 0.22, 0.23, 0.24), "paired": scores(0.9, 0.9, 0.9, 0.9)},
              "032": {"strict": scores(0.31, 0.32, 0.33, 0.34), "paired": scores(0.9, 0.9, 0.9, 0.9)},
              "chance": {"strict": scores(0.05, 0.06, 0.07, 0.08), "paired": scores(0.05, 0.06, 0.07, 0.08)},
              "baselines": HAND_MADE}
    console = Console(record=True, width=200)
    console.print(baseline_table(tables, [8, 16, 32], "a note"))
    text = console.export_text()
    assert "MAP against training-free baselines, strict protocol" in text and "a note" in text
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["bits", "method", "i2t MAP@50", "i2t MAP@all", "t2i MAP@50", "t2i MAP@all"]
    assert rows(text) == [
        ["8", "cmhash", "0.1100", "0.1200", "0.1300", "0.1400"],
        ["", "pca_itq (best)", "0.4000", "0.4000", "0.4000", "0.4000"],
        ["16", "cmhash", "0.2100", "0.2200", "0.2300", "0.2400"],
        ["", "lsh (best)", "0.6000", "0.6000", "0.6000", "0.6000"],
        ["32", "cmhash", "0.3100", "0.3200", "0.3300", "0.3400"],  # no baseline at 32 bits: no best row
        ["-", "clip_cosine", "0.9900", "0.9900", "0.9900", "0.9900"],
        ["", "chance", "0.0500", "0.0600", "0.0700", "0.0800"],
    ]

    # without clip_cosine: no clip row, chance still there
    console = Console(record=True, width=200)
    console.print(baseline_table({**tables, "baselines": {"lsh": HAND_MADE["lsh"]}}, [8], None))
    assert [r[1] for r in rows(console.export_text())] == ["cmhash", "lsh (best)", "chance"]


# ----------------------------------------------------------------------------------- bad input


def with_baselines(**changes) -> dict:
    p = baseline_params()
    p["baselines"].update(changes)
    return p


@pytest.mark.parametrize(("p", "words"), [
    (with_baselines(methods=["lsh", "lsh"]), ["baselines.methods", "once"]),
    (with_baselines(methods=["lsh", "sh"]), ["baselines.methods[1]", "'sh'", "pca_itq"]),
    (with_baselines(methods=[]), ["baselines.methods"]),
    (with_baselines(cca_itq={"ridge": [0.0], "scale_power": [0.0], "n_iter": 5}), ["baselines.cca_itq.ridge[0]"]),
    (with_baselines(lsh={"n_iter": 5}), ["baselines.lsh.n_iter"]),
    (with_baselines(select_topk=0), ["baselines.select_topk"]),
], ids=["duplicate", "unknown", "none", "zero-ridge", "knob-lsh-lacks", "topk-0"])
def test_a_bad_baselines_setting_is_one_line_naming_the_key_and_writes_nothing(tmp_path, splits, invoke, one_line_error, p, words):
    params_path = write_params(tmp_path, p)
    before = tree(tmp_path)
    line = one_line_error(run_baselines(invoke, params_path, splits, tmp_path / "out", tmp_path / "metrics" / "val.json"))
    assert all(w in line for w in words), line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def last_error_line(result) -> str:
    """Exit code 1, no traceback, exactly one `error:` line and it comes last (the stage's progress
    log of the methods fitted before the failure may precede it)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    return lines[-1]


def too_many_bits(method: str) -> dict:
    p = with_baselines(methods=["clip_cosine", "lsh", method])
    p["bits"] = [8, SYNTHETIC_DIM * 2]  # lsh takes any length; PCA and CCA give at most the feature dims
    return p


@pytest.mark.parametrize("method", ["pca_itq", "cca_itq"])
def test_more_bits_than_feature_dims_is_an_error_line_and_writes_nothing(tmp_path, splits, invoke, method):
    params_path = write_params(tmp_path, too_many_bits(method))
    before = tree(tmp_path)
    line = last_error_line(run_baselines(invoke, params_path, splits, tmp_path / "out", tmp_path / "metrics" / "val.json"))
    assert "bits" in line and str(SYNTHETIC_DIM * 2) in line and str(SYNTHETIC_DIM) in line, line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def narrower_query(folder: Path) -> None:
    save_pickle(folder / "query.pkl", synthetic(SIZES["query"][0], seed=3, dim=SYNTHETIC_DIM // 2))


def test_query_features_of_another_width_are_an_error_line_and_write_nothing(tmp_path, splits, invoke):
    narrower_query(splits)
    params_path = write_params(tmp_path, baseline_params())
    before = tree(tmp_path)
    line = last_error_line(run_baselines(invoke, params_path, splits, tmp_path / "out", tmp_path / "metrics" / "val.json"))
    assert str(SYNTHETIC_DIM // 2) in line and str(SYNTHETIC_DIM) in line, line
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda root, folder: write_params(root, too_many_bits("pca_itq")), ["32", "pca_itq"]),
    (lambda root, folder: write_params(root, too_many_bits("cca_itq")), ["32", "cca_itq"]),
    (lambda root, folder: narrower_query(folder), ["query.pkl", "8", "16"]),
], ids=["pca_itq-bits", "cca_itq-bits", "query-width"])
def test_what_the_features_cannot_take_is_refused_before_any_method_is_fitted(tmp_path, splits, invoke, one_line_error, mutate, words):
    write_params(tmp_path, with_baselines(methods=["clip_cosine", "lsh", "pca_itq", "cca_itq"]))
    mutate(tmp_path, splits)
    line = one_line_error(run_baselines(invoke, tmp_path / "params.yaml", splits, tmp_path / "out", tmp_path / "metrics" / "val.json"))
    assert all(w in line for w in words), line


def test_a_missing_features_dir_is_one_line_and_writes_nothing(tmp_path, invoke, one_line_error):
    params_path = write_params(tmp_path, baseline_params())
    before = tree(tmp_path)
    line = one_line_error(run_baselines(invoke, params_path, tmp_path / "absent", tmp_path / "out", tmp_path / "metrics" / "val.json"))
    assert str(tmp_path / "absent") in line and "train.pkl" in line
    assert tree(tmp_path) == before


def test_a_failed_run_keeps_the_last_good_outputs_byte_for_byte(tmp_path, splits, invoke):
    out, _ = baselines_ok(invoke, tmp_path, splits)
    metrics = tmp_path / "metrics" / "baselines_val.json"
    snapshot = {name: (out / name).read_bytes() for name in tree(out) if (out / name).is_file()}
    snapshot_metrics = metrics.read_bytes()
    last_error_line(run_baselines(invoke, write_params(tmp_path, too_many_bits("pca_itq"), "bad.yaml"), splits, out, metrics))
    assert {name: (out / name).read_bytes() for name in tree(out) if (out / name).is_file()} == snapshot
    assert metrics.read_bytes() == snapshot_metrics
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".old"))]  # no temporary file left
