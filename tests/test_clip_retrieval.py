"""`data.features.format: clip_retrieval`: the embeddings clip-retrieval's `clip inference` writes
(img_emb/, text_emb/, metadata/ parts), written here with numpy and pyarrow, read in part-number
order with captions and image paths kept, a malformed layout refused in one line, and an unlabelled
collection through prepare -> extract -> baselines -> train -> evaluate to Recall@K (MAP absent,
with the reason)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cmhash.features.store import load_features

WIDTH = 8
PARTS = {0: 40, 1: 25, 10: 15}  # part number -> rows; 10 after 1 (by number, not by name)


def write_layout(root: Path, parts: dict[int, int] = PARTS, width: int = WIDTH, dtype=np.float16, pad: int = 2) -> dict[str, list]:
    """clip inference's output: zero-padded part numbers, L2-normalised float embeddings, the
    metadata parquet with image_path, caption and an extra column. Returns what it wrote, in part order."""
    rng = np.random.default_rng(0)
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    wrote: dict[str, list] = {"image": [], "text": [], "caption": [], "image_path": []}
    for n, rows in sorted(parts.items()):
        shared = rng.normal(size=(rows, width))  # paired rows are near each other, so training has signal
        image, text = shared + 0.3 * rng.normal(size=(rows, width)), shared + 0.3 * rng.normal(size=(rows, width))
        image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
        name = str(n).zfill(pad)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", image.astype(dtype))
        np.save(root / "text_emb" / f"text_emb_{name}.npy", text.astype(dtype))
        captions = [f"caption {n}-{r}" for r in range(rows)]
        paths = [f"images/{n:05d}{r:04d}.jpg" for r in range(rows)]
        pq.write_table(pa.table({"image_path": paths, "caption": captions, "similarity": rng.random(rows)}),
                       root / "metadata" / f"metadata_{name}.parquet")
        wrote["image"].append(image.astype(dtype).astype(np.float32))
        wrote["text"].append(text.astype(dtype).astype(np.float32))
        wrote["caption"] += captions
        wrote["image_path"] += paths
    return wrote


@pytest.fixture
def clip_retrieval_params(params_file: Path, params: dict) -> Callable[..., Path]:
    def write(**options) -> Path:
        params["data"].update(name="features", root="emb")
        params["data"]["features"].update({"format": "clip_retrieval", "query": 16, "train": 40, "val": 12, **options})
        params_file.write_text(yaml.safe_dump(params))
        return params_file
    return write


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_the_layout_is_read_in_part_order_with_captions_and_paths(clip_retrieval_params, invoke):
    wrote = write_layout(Path("emb"))
    params_file = clip_retrieval_params()
    ok(invoke("prepare", "--params", params_file))
    ok(invoke("extract", "--params", params_file))
    image, text = np.concatenate(wrote["image"]), np.concatenate(wrote["text"])
    ids = [f"{n}/{r}" for n, rows in sorted(PARTS.items()) for r in range(rows)]
    row_of = {i: row for row, i in enumerate(ids)}
    seen = []
    for split in ("train", "val", "query", "retrieval"):
        feats = load_features(f"stages/extract/{split}.pkl")
        rows = [row_of[i] for i in feats.meta["ids"]]
        assert feats.label.shape == (len(rows), 0)  # no labels
        np.testing.assert_array_equal(feats.image.numpy(), image[rows])
        np.testing.assert_array_equal(feats.text.numpy(), text[rows])
        assert feats.meta["captions"] == [wrote["caption"][r] for r in rows]
        assert feats.meta["images"] == [wrote["image_path"][r] for r in rows]
        seen.append(set(rows))
    train, val, query, retrieval = seen
    assert (len(query), len(train), len(val)) == (16, 40, 12)
    assert not query & retrieval and query | retrieval == set(range(80)) and train | val <= retrieval and not train & val
    labels = json.loads(Path("stages/prepare/labels.json").read_text())
    assert labels["precomputed"]["format"] == "clip_retrieval"
    assert set(labels["precomputed"]["sources"]) == {f"{f}/{f}_{str(n).zfill(2)}{ext}" for n in PARTS for f, ext in
                                                     (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet"))}


def remove(path: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        target = root / path
        if target.is_dir():
            for child in target.iterdir():
                child.unlink()
            target.rmdir()
        else:
            target.unlink()
    return change


def overwrite_npy(path: str, make: Callable[[], np.ndarray]) -> Callable[[Path], None]:
    return lambda root: np.save(root / path, make())


def short_metadata(root: Path) -> None:
    pq.write_table(pa.table({"image_path": ["a.jpg"], "caption": ["one"]}), root / "metadata" / "metadata_01.parquet")


@pytest.mark.parametrize(("change", "message"), [
    (remove("text_emb"), "clip-retrieval folder not found: emb/text_emb"),
    (remove("metadata/metadata_10.parquet"), "hold different parts"),
    (overwrite_npy("img_emb/img_emb_01.npy", lambda: np.zeros((25, 4), np.float16)),
     "img_emb_01.npy is 4 wide but emb/text_emb/text_emb_01.npy 8"),
    (overwrite_npy("img_emb/img_emb_01.npy", lambda: np.zeros((24, 8), np.float16)),
     "img_emb_01.npy has 24 rows but emb/text_emb/text_emb_01.npy 25"),
    (overwrite_npy("text_emb/text_emb_00.npy", lambda: np.zeros((40, 8), np.int32)), "holds int32 values; embeddings must be float"),
    (overwrite_npy("text_emb/text_emb_00.npy", lambda: np.zeros(40, np.float32)), "has shape (40,); embeddings must be a non-empty 2-D"),
    (short_metadata, "metadata_01.parquet has 1 rows but its embeddings 25"),
])
def test_a_malformed_layout_is_refused_in_one_line(change, message, clip_retrieval_params, invoke, one_line_error):
    write_layout(Path("emb"))
    change(Path("emb"))
    line = one_line_error(invoke("prepare", "--params", clip_retrieval_params()))
    assert message in line
    assert not Path("stages/prepare/labels.json").exists()  # nothing half-written


def test_split_sizes_past_the_collection_are_refused(clip_retrieval_params, invoke, one_line_error):
    write_layout(Path("emb"))
    assert "exceed the 80 pairs" in one_line_error(invoke("prepare", "--params", clip_retrieval_params(query=50)))


@pytest.mark.slow
def test_an_unlabelled_collection_trains_and_reports_recall(clip_retrieval_params, invoke, params):
    write_layout(Path("emb"), width=32, dtype=np.float32)  # CCA and PCA give at most 32 bits on 32-wide features
    params["hash_head"]["init"] = "cca_itq"  # the default: the baselines stage runs before train-hash
    params["train"]["select_topk"] = 5
    params["baselines"]["select_topk"] = 5
    params_file = clip_retrieval_params()
    for stage in ("prepare", "extract", "baselines", "train-fusion", "train-hash", "evaluate"):
        ok(invoke(stage, "--params", params_file))
    maps = json.loads(Path("metrics/map.json").read_text())
    assert maps == {"map_skipped": "collection has no labels: MAP needs them; see recall.json"}
    recall = json.loads(Path("metrics/recall.json").read_text())
    keys = {"recall@1", "recall@5", "recall@10"}
    for name in ("16", "32", "real_valued"):
        for protocol in ("strict", "paired"):
            for direction in ("i2t", "t2i"):
                scores = recall[name][protocol][direction]
                assert set(scores) == keys and 0 <= scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= 1
    assert set(recall["baselines"]) == set(params["baselines"]["methods"])
    assert set(recall["baselines"]["cca_itq"]) == {"16", "32"}
    # paired features near each other: cosine on the raw features finds far more than chance (10/16 at K=10)
    assert recall["baselines"]["clip_cosine"]["float"]["strict"]["i2t"]["recall@1"] > 0.5
    # the training stages selected on val Recall@K (no MAP without labels)
    curves = Path("metrics/hash/plots/metrics/16/val")
    assert (curves / "recall_i2t.tsv").is_file() and not (curves / "map_i2t.tsv").exists()
    selected = json.loads(Path("metrics/baselines_val.json").read_text())
    assert all("recall" in row and "map" not in row for row in selected["cca_itq"]["16"]["val"])
    assert json.loads(Path("metrics/evaluate.json").read_text())["map_skipped"].startswith("collection has no labels")
