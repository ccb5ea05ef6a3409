"""`data.name: features`: precomputed features (pickle, npz, MATLAB v5 and v7.3, per-split files or
one file) through `cmhash prepare` and `cmhash extract` into the pipeline's feature files, equal to
the source arrays; the val carve; the sources' SHA-256s; every bad file refused in one line (a
malicious pickle not executed); search and serve without a CLIP encoder; and, with one named,
text search through it."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import yaml
from fastapi.testclient import TestClient

from cmhash.data.manifest import read_split
from cmhash.features.store import load_features
from cmhash.search.engine import Searcher
from cmhash.search.index import CodeIndex, pack_codes
from cmhash.serve.app import create_app

SPLITS = ("train", "val", "query", "retrieval")
SIZES = {"train": 24, "val": 6, "query": 8, "retrieval": 40}
WIDTH, CLASSES = 8, 4
NAMES = {"train": "tr", "val": "va", "query": "te", "retrieval": "db"}  # I_tr, T_tr, L_tr ...
TRAINING = ("train-fusion", "train-hash", "evaluate")


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def make_splits(seed: int = 0, sizes: dict[str, int] = SIZES, width: int = WIDTH) -> dict[str, dict[str, np.ndarray]]:
    """Features as papers ship them: float16 images, float64 captions, float 0/1 labels."""
    rng = np.random.default_rng(seed)
    return {split: {"image": rng.standard_normal((n, width)).astype(np.float16),
                    "text": rng.standard_normal((n, width)),
                    "label": (rng.random((n, CLASSES)) < 0.4).astype(np.float64)} for split, n in sizes.items()}


def one_file_names(splits: dict) -> dict[str, np.ndarray]:
    return {f"{role[0].upper()}_{NAMES[split]}": a for split, arrays in splits.items() for role, a in arrays.items()}


def write_v73(path: Path, arrays: dict[str, np.ndarray], matlab_order: bool = True) -> None:
    """An HDF5 .mat as MATLAB -v7.3 writes it (a 512-byte header, arrays column-major: h5py sees
    [D, N]); matlab_order=False: as h5py writes [N, D] arrays itself."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, a in arrays.items():
            f[name] = a.T if matlab_order else a
    with path.open("r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(128))


def per_split(write: Callable[[Path, dict], None], ext: str) -> Callable[[Path, dict], list[str]]:
    def layout(root: Path, splits: dict) -> list[str]:
        for split, arrays in splits.items():
            write(root / f"{split}{ext}", arrays)
        return [f"{split}{ext}" for split in splits]
    return layout


def one_file(write: Callable[[Path, dict], None], name: str) -> Callable[[Path, dict], list[str]]:
    def layout(root: Path, splits: dict) -> list[str]:
        write(root / name, one_file_names(splits))
        return [name]
    return layout


def pickled(protocol: int) -> Callable[[Path, dict], None]:
    return lambda path, arrays: path.write_bytes(pickle.dumps(arrays, protocol=protocol))


def npz(path: Path, arrays: dict) -> None:
    np.savez(path, **arrays)


LAYOUTS = {  # name -> writes the splits under a root, returns the files it wrote
    "pickle-protocol-2": per_split(pickled(2), ".pkl"),  # the reference's era: arrays through _codecs.encode
    "pickle": per_split(pickled(pickle.HIGHEST_PROTOCOL), ".pkl"),
    "npz": per_split(npz, ".npz"),
    "npz-one-file": one_file(npz, "features.npz"),
    "mat-v5": per_split(scipy.io.savemat, ".mat"),
    "mat-v5-one-file": one_file(scipy.io.savemat, "mirflickr.mat"),
    "mat-v5-per-split-one-file-names": per_split(lambda path, arrays: scipy.io.savemat(path, one_file_names({path.stem: arrays})), ".mat"),
    "mat-v7.3-one-file": one_file(write_v73, "mirflickr.mat"),
    "mat-v7.3-written-by-h5py": one_file(lambda path, arrays: write_v73(path, arrays, matlab_order=False), "h5py.mat"),
}


@pytest.fixture
def features_params(params_file: Path, params: dict) -> Callable[..., Path]:
    """params.yaml choosing data.name: features on tmp_path/feat, with `options` in data.features."""
    def write(**options) -> Path:
        params["data"].update(name="features", root="feat")
        params["data"]["features"].update({"val": 6, **options})
        params_file.write_text(yaml.safe_dump(params))
        return params_file
    (params_file.parent / "feat").mkdir()
    return write


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- every layout, prepare + extract


@pytest.mark.parametrize("with_val", [True, False], ids=["val-given", "val-carved"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_becomes_feature_files_equal_to_its_arrays(layout, with_val, features_params, invoke):
    splits = make_splits()
    if not with_val:
        del splits["val"]
    files = LAYOUTS[layout](Path("feat"), splits)
    params_file = features_params()
    for stage in ("prepare", "extract"):
        ok(invoke(stage, "--params", params_file))

    digests = {name: sha256(Path("feat") / name) for name in files}
    for split in SPLITS:
        feats = load_features(f"stages/extract/{split}.pkl")
        source_split = "train" if split == "val" and not with_val else split  # a carved val row keeps its train id
        source = splits[source_split]
        rows = [int(i.removeprefix(f"{source_split}/")) for i in feats.meta["ids"]]
        if with_val or split in ("query", "retrieval"):
            assert rows == list(range(SIZES[split]))  # every row, in file order
        np.testing.assert_array_equal(feats.image.numpy(), source["image"][rows].astype(np.float32))
        np.testing.assert_array_equal(feats.text.numpy(), source["text"][rows].astype(np.float32))
        np.testing.assert_array_equal(feats.label.numpy(), source["label"][rows])
        meta = feats.meta
        assert meta["dataset"] == "features" and meta["split"] == split
        assert meta["label_names"] == ["label0", "label1", "label2", "label3"]
        assert (meta["clip_model"], meta["pretrained"], meta["random_init"]) == (None, None, False)
        assert meta["source_files"] == digests
        assert meta["val_split"] == ("given" if with_val else "carved from train")
    raw = pickle.loads(Path("stages/extract/train.pkl").read_bytes())
    assert raw["image"].dtype == raw["text"].dtype == np.float32 and raw["label"].dtype == np.uint8  # as CLIP-extracted ones
    metrics = json.loads(Path("metrics/extract.json").read_text())
    assert metrics["source_files"] == digests
    assert metrics["items"] == {"train": 24 - 6 * (not with_val), "val": 6, "query": 8, "retrieval": 40}
    assert metrics["dataset"] == "features" and metrics["clip_model"] is None


def test_val_carve_is_disjoint_complete_and_seeded(features_params, invoke, params):
    """Without a val split, data.features.val train rows become val: disjoint from train, together
    every train row once, the same rows for the same seed and others for another."""
    splits = make_splits()
    del splits["val"]
    LAYOUTS["npz"](Path("feat"), splits)

    def carve(seed: int) -> tuple[list[str], list[str]]:
        params["seed"] = seed
        ok(invoke("prepare", "--params", features_params(val=5)))
        with np.load("stages/prepare/features/train.npz") as t, np.load("stages/prepare/features/val.npz") as v:
            return list(t["ids"]), list(v["ids"])

    train, val = carve(7)
    assert len(val) == 5 and len(train) == 19 and not set(train) & set(val)
    assert sorted(train + val, key=lambda i: int(i.split("/")[1])) == [f"train/{r}" for r in range(24)]
    assert train == sorted(train, key=lambda i: int(i.split("/")[1]))  # file order kept
    assert carve(7) == (train, val)
    assert carve(8)[1] != val


def test_label_names_and_the_clip_model_are_recorded(features_params, invoke):
    LAYOUTS["npz"](Path("feat"), make_splits(width=32))  # cmhash-tiny's width
    params_file = features_params(label_names=["sky", "dog", "car", "sea"], clip_model="cmhash-tiny", pretrained="none")
    ok(invoke("prepare", "--params", params_file))
    ok(invoke("extract", "--params", params_file))
    meta = load_features("stages/extract/query.pkl").meta
    assert meta["label_names"] == ["sky", "dog", "car", "sea"]
    assert (meta["clip_model"], meta["pretrained"], meta["random_init"], meta["seed"]) == ("cmhash-tiny", "none", True, 2023)


# ---------------------------------------------------------------- refusals


def drop(split: str, role: str | None = None) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        if role is None:
            del splits[split]
        else:
            del splits[split][role]
    return change


def set_array(split: str, role: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        splits[split][role] = make(splits[split][role])
    return change


def with_value(value: float, role: str = "image") -> Callable[[np.ndarray], np.ndarray]:
    def make(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        a[3, 1] = value
        return a
    return make


# (id, how the good npz splits are changed, message the one line must contain)
BAD_ARRAYS = [
    ("query-missing", drop("query"), "required split 'query' missing: no query.npz in feat (found train.npz, val.npz, retrieval.npz)"),
    ("label-missing", drop("train", "label"), "feat/train.npz has no array 'label' or 'L_tr' for the train label "
                                              "(data.features.names.train.label); it holds: image, text"),
    ("rows-differ", set_array("train", "text", lambda a: a[:-1]), "feat/train.npz: train image (24, 8), text (23, 8) and label (24, 4) differ in N"),
    ("not-2d", set_array("query", "label", lambda a: a[:, 0]), "feat/query.npz: query image (8, 8), text (8, 8) and label (8,) must each be 2-D"),
    ("width-between-splits", lambda s: s["query"].update(image=s["query"]["image"][:, :6], text=s["query"]["text"][:, :6]),
     "feature widths differ between splits (train 8, val 8, query 6, retrieval 8)"),
    ("label-columns-between-splits", set_array("retrieval", "label", lambda a: a[:, :3]),
     "label columns differ between splits (train 4, val 4, query 4, retrieval 3)"),
    ("image-vs-text-width", set_array("val", "text", lambda a: a[:, :5]), "feat/val.npz: val image features are 8 wide but text features 5"),
    ("nan", set_array("train", "image", with_value(np.nan)), "feat/train.npz: train features contain NaN or inf"),
    ("inf", set_array("retrieval", "text", with_value(-np.inf)), "feat/retrieval.npz: retrieval features contain NaN or inf"),
    ("beyond-float32", set_array("retrieval", "text", with_value(1e300)), "feat/retrieval.npz: retrieval features contain NaN or inf"),
    ("label-2", set_array("query", "label", with_value(2.0)), "feat/query.npz: query label holds 2.0: labels must be 0/1"),
    ("label-nan", set_array("query", "label", with_value(np.nan)), "feat/query.npz: query label holds nan: labels must be 0/1"),
    ("empty", lambda s: s.update(val={k: a[:0] for k, a in s["val"].items()}), "feat/val.npz: val is empty: image (0, 8), label (0, 4)"),
    ("strings", set_array("train", "label", lambda a: a.astype(str)), "feat/train.npz: train label holds <U32 values, not numbers"),
]


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in BAD_ARRAYS], ids=[case[0] for case in BAD_ARRAYS])
def test_bad_arrays_are_refused_in_one_line(change, message, features_params, invoke, one_line_error):
    splits = make_splits()
    change(splits)
    LAYOUTS["npz"](Path("feat"), splits)
    line = one_line_error(invoke("prepare", "--params", features_params()))
    assert message in line
    assert not Path("stages").exists()  # nothing written


class Payload:
    """Unpickling calls open(marker, "w"): the file appears if the pickle is ever executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_files(files: dict[str, bytes | Callable[[Path], None]]) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        for name, content in files.items():
            content(root / name) if callable(content) else (root / name).write_bytes(content)
    return write


def good(ext: str) -> dict[str, Callable[[Path], None]]:
    writers = {".npz": npz, ".mat": scipy.io.savemat, ".pkl": pickled(4)}
    return {f"{split}{ext}": lambda path, arrays=arrays: writers[ext](path, arrays) for split, arrays in make_splits().items()}


# (id, files under data.root, data.features options, message the one line must contain)
BAD_FILES = [
    ("mat-that-is-text", {**good(".mat"), "query.mat": b"I_te = [1 2 3];\n"}, {}, "feat/query.mat is not a MATLAB .mat file ("),
    ("npz-not-a-zip", {**good(".npz"), "train.npz": b"\x93NUMPY not really"}, {}, "feat/train.npz is not an .npz file (not a zip archive)"),
    ("pkl-not-a-pickle", {**good(".pkl"), "retrieval.pkl": b"image,text,label\n"}, {}, "cannot load feat/retrieval.pkl: not a readable pickle"),
    ("pkl-not-a-dict", {**good(".pkl"), "train.pkl": pickle.dumps([np.zeros((2, 2))])}, {}, "feat/train.pkl holds a list, not a dict of arrays"),
    ("npz-object-array", {**good(".npz"), "val.npz": lambda p: np.savez(p, image=np.array([{}], dtype=object))}, {},
     "feat/val.npz is not a readable .npz file (Object arrays cannot be loaded when allow_pickle=False)"),
    ("name-not-in-one-file", {"cross.mat": lambda p: scipy.io.savemat(p, {k: v for k, v in one_file_names(make_splits()).items() if k != "T_te"})},
     {}, "feat/cross.mat has no array 'T_te' for the query text (data.features.names.query.text); it holds: I_db, I_te, I_tr, I_va, L_db,"),
    ("renamed-array", {"cross.mat": lambda p: scipy.io.savemat(p, one_file_names(make_splits()))},
     {"names": {"train": {"image": "X_train", "text": "T_tr", "label": "L_tr"}}},
     "feat/cross.mat has no array 'X_train' for the train image (data.features.names.train.image); it holds: I_db,"),
    ("no-files", {"notes.txt": b"hello"}, {}, "no feature files in feat: expected train, query, retrieval (and val) .pkl, .npz or .mat files"),
    ("two-formats", {**good(".npz"), "train.mat": b""}, {},
     "feat holds per-split feature files of several formats (npz, mat); set data.features.format"),
    ("two-single-files", {"a.mat": b"", "b.npz": b""}, {}, "feat holds several feature files (a.mat, b.npz) and no train/query/retrieval files"),
    ("file-not-found", good(".npz"), {"file": "all.mat"}, "feature file not found: feat/all.mat (data.features.file)"),
    ("unknown-extension", {"all.h5": b""}, {"file": "all.h5"}, "data.features.file 'all.h5': cannot tell its format from the extension"),
    ("model-without-weights", good(".npz"), {"clip_model": "ViT-B-32"}, "data.features.clip_model and data.features.pretrained go together"),
    ("val-too-large", {k: v for k, v in good(".npz").items() if k != "val.npz"}, {"val": 24},
     "data.features.val 24 would leave no training pairs: feat/train.npz has 24 train pairs; make it smaller"),
    ("label-names-count", good(".npz"), {"label_names": ["a", "b"]}, "data.features.label_names has 2 names but the labels have 4 columns"),
]


@pytest.mark.parametrize(("files", "options", "message"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_files_are_refused_in_one_line(files, options, message, features_params, invoke, one_line_error):
    write_files(files)(Path("feat"))
    line = one_line_error(invoke("prepare", "--params", features_params(**options)))
    assert message in line
    assert not Path("stages").exists()


def test_a_pickle_that_would_run_code_is_refused_not_executed(features_params, invoke, one_line_error, tmp_path):
    splits = make_splits()
    LAYOUTS["pickle"](Path("feat"), splits)
    marker = tmp_path / "executed"
    bomb = pickle.dumps({**splits["train"], "image": Payload(marker)}, protocol=2)
    Path("feat/train.pkl").write_bytes(bomb)
    line = one_line_error(invoke("prepare", "--params", features_params()))
    assert line == ("error: refused to load feat/train.pkl: it holds a reference to io.open, which was not executed; "
                    "only tensors, arrays and plain containers are accepted")
    assert not marker.exists() and not Path("stages").exists()
    pickle.loads(bomb)["image"].close()  # the payload is live: a plain unpickler does create the file
    assert marker.exists()


def test_a_clip_model_of_another_width_is_refused_by_extract(features_params, invoke, one_line_error):
    LAYOUTS["npz"](Path("feat"), make_splits())  # 8 wide; cmhash-tiny makes 32
    params_file = features_params(clip_model="cmhash-tiny", pretrained="none")
    ok(invoke("prepare", "--params", params_file))
    assert one_line_error(invoke("extract", "--params", params_file)) == (
        "error: the precomputed features are 8 wide but CLIP cmhash-tiny makes 32-wide features (data.features.clip_model); "
        "name the model they were made with, or null")
    assert not Path("stages/extract").exists()
    params_file = features_params(clip_model="ViT-Nope", pretrained="openai")
    ok(invoke("prepare", "--params", params_file))
    assert "unknown CLIP model 'ViT-Nope' (data.features.clip_model)" in one_line_error(invoke("extract", "--params", params_file))


# ---------------------------------------------------------------- the whole pipeline, and search


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_trains_and_evaluates(layout, features_params, invoke):
    splits = make_splits()
    del splits["val"]
    LAYOUTS[layout](Path("feat"), splits)
    params_file = features_params()
    for stage in ("prepare", "extract", *TRAINING):
        ok(invoke(stage, "--params", params_file))
    evaluated = json.loads(Path("metrics/evaluate.json").read_text())
    assert evaluated["features"]["dataset"] == "features" and evaluated["items"] == {"query": 8, "retrieval": 40}
    maps = json.loads(Path("metrics/map.json").read_text())
    assert {"16", "32"} <= set(maps) and all(0 < maps[bits]["strict"]["i2t"]["map@all"] <= 1 for bits in ("16", "32"))


@pytest.fixture(scope="module")
def unknown_clip_pipeline(tmp_path_factory) -> Path:
    """One .mat v7.3 file, no val, clip_model null: the whole pipeline and a split index, once."""
    from typer.testing import CliRunner

    from cmhash.cli import app
    from conftest import tiny_params

    root = tmp_path_factory.mktemp("unknown_clip")
    (root / "feat").mkdir()
    splits = make_splits(seed=1)
    del splits["val"]
    LAYOUTS["mat-v7.3-one-file"](root / "feat", splits)
    params = tiny_params()
    params["data"].update(name="features", root=str(root / "feat"))
    params["data"]["features"]["val"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for command in ("prepare", "extract", *TRAINING):
            ok(runner.invoke(app, [command, "--params", "params.yaml"]))
        ok(runner.invoke(app, ["index", "--split", "retrieval", "--params", "params.yaml"]))
    return root


@pytest.fixture
def in_unknown_clip_pipeline(unknown_clip_pipeline, monkeypatch) -> Path:
    monkeypatch.chdir(unknown_clip_pipeline)
    return Path("stages/index")


def hamming(query: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(db, query[None, :])).sum(axis=1)


@pytest.mark.slow
def test_without_a_clip_model_text_and_image_queries_are_refused(in_unknown_clip_pipeline, invoke, one_line_error, tmp_path):
    expected = ("error: stages/index was built from precomputed features of an unknown CLIP model (data.features.clip_model: null): "
                "a caption or an image cannot be encoded; query an indexed item instead (cmhash search --image-of ID or --text-of ID)")
    assert one_line_error(invoke("search", "--text", "a dog on a beach")) == expected
    picture = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(picture)
    assert one_line_error(invoke("search", "--image", picture)) == expected
    index = CodeIndex.load(in_unknown_clip_pipeline)
    assert index.meta["clip"] == {"clip_model": None, "pretrained": None, "random_init": False}
    assert all(set(item) == {"id", "labels"} for item in index.items)  # no image path, no caption


@pytest.mark.slow
def test_queries_by_indexed_item_rank_like_a_numpy_scan_of_evaluates_codes(in_unknown_clip_pipeline, invoke):
    """--image-of / --text-of take the item's own code from the index: the results are a full
    XOR-popcount scan of evaluate's saved codes (strict protocol) from that row, by (distance, row)."""
    saved = np.load("stages/evaluate/strict/16.npz")
    labels = load_features("stages/extract/retrieval.pkl").label.numpy()
    for option, own, other in (("--image-of", "retrieval_image", "retrieval_text"), ("--text-of", "retrieval_text", "retrieval_image")):
        for row in (0, 7, 39):
            found = json.loads(ok(invoke("search", option, f"retrieval/{row}", "-k", 10, "--json")).stdout)
            distances = hamming(saved[own][row], saved[other])
            order = np.argsort(distances, kind="stable")[:10]
            assert found["query"] == {option[2:].replace("-", "_"): f"retrieval/{row}"}
            assert [r["row"] for r in found["results"]] == order.tolist()
            assert [r["distance"] for r in found["results"]] == distances[order].tolist()
            assert [r["id"] for r in found["results"]] == [f"retrieval/{r}" for r in order]
            assert [r["labels"] for r in found["results"]] == [[f"label{c}" for c in np.flatnonzero(labels[r])] for r in order]
    table = ok(invoke("search", "--image-of", "retrieval/7", "-k", 3)).stdout
    assert "texts nearest to image of 'retrieval/7'" in table and "caption" not in table


@pytest.mark.slow
def test_serve_without_a_clip_model_refuses_text_and_images_and_goes_on(in_unknown_clip_pipeline):
    client = TestClient(create_app(Searcher.load(in_unknown_clip_pipeline)))
    for answer in (client.get("/api/search", params={"text": "a dog"}),
                   client.post("/api/search", json={"text": "a dog"}),
                   client.post("/api/search", files={"image": ("q.png", _png(), "image/png")})):
        assert answer.status_code == 400
        assert answer.json()["error"].endswith("a caption or an image cannot be encoded; query an indexed item instead "
                                               "(cmhash search --image-of ID or --text-of ID)")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/api/items/0/image").status_code == 404  # no images to serve
    info = client.get("/api/info").json()
    assert info["count"] == 40 and info["notice"].startswith("codes come from precomputed features of an unknown CLIP model")


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_an_unknown_item_or_a_missing_modality_is_one_line(in_unknown_clip_pipeline, invoke, one_line_error):
    assert one_line_error(invoke("search", "--image-of", "retrieval/40")) == (
        "error: no item 'retrieval/40' in stages/index (ids as in its items.jsonl, e.g. 'retrieval/0')")
    assert one_line_error(invoke("search", "--text-of", "x", "--text", "y")) == (
        'error: give exactly one of --text "a caption", --image PATH, --image-of ID or --text-of ID')
    assert "images and captions cannot be encoded; index a split (--split)" in one_line_error(
        invoke("index", "--captions", _captions(), "--out-dir", "caption_index"))


def _captions() -> Path:
    path = Path("captions.txt")
    path.write_text("a dog\n")
    return path


@pytest.mark.slow
def test_features_of_a_named_clip_model_are_searched_by_text_with_it(params_file, params, invoke, tmp_path):
    """The tiny demo's CLIP features (cmhash-tiny, random init from seed 2023), exported to .npz and
    imported back with data.features.clip_model/pretrained: `cmhash search --text` encodes a query
    caption with that CLIP, so its code is evaluate's code of that query, and the ranking follows."""
    for stage in ("prepare", "extract"):
        ok(invoke(stage, "--params", params_file))
    captions = [item.caption for item in read_split(Path("stages/prepare/query.jsonl"))]
    (tmp_path / "feat").mkdir()
    for split in SPLITS:
        feats = load_features(f"stages/extract/{split}.pkl")
        assert feats.meta["ids"] == [it.id for it in read_split(Path(f"stages/prepare/{split}.jsonl"))]
        np.savez(tmp_path / "feat" / f"{split}.npz", image=feats.image.numpy(), text=feats.text.numpy(), label=feats.label.numpy())
    shutil.rmtree("stages")
    params["data"].update(name="features", root="feat")
    params["data"]["features"].update(clip_model="cmhash-tiny", pretrained="none")
    params_file.write_text(yaml.safe_dump(params))
    for command in ("prepare", "extract", *TRAINING):
        ok(invoke(command, "--params", params_file))
    ok(invoke("index", "--split", "retrieval", "--params", params_file))

    saved = np.load("stages/evaluate/strict/16.npz")
    for row in (0, 5):
        found = json.loads(ok(invoke("search", "--text", captions[row], "-k", 10, "--json")).stdout)
        assert found["clip"] == {"clip_model": "cmhash-tiny", "pretrained": "none", "random_init": True}
        distances = hamming(saved["query_text"][row], saved["retrieval_image"])
        order = np.argsort(distances, kind="stable")[:10]
        assert [r["row"] for r in found["results"]] == order.tolist()
        assert [r["distance"] for r in found["results"]] == distances[order].tolist()


@pytest.mark.slow
@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("pymilvus", "milvus_lite")),
                    reason="the milvus extra is not installed: pip install -e '.[milvus]'")
def test_milvus_gives_back_a_row_code_as_faiss_does(tmp_path):
    """A query by indexed item reads the item's code back from the store: Milvus returns the bytes stored."""
    from cmhash.search.index import binary_index
    from cmhash.search.milvus import MilvusStore

    codes = pack_codes(np.where(np.random.default_rng(0).random((30, 32)) < 0.5, 1, -1))
    store = MilvusStore()
    backend = store.write(tmp_path, {"image": codes})
    milvus = store.read(tmp_path, backend, ["image"])["image"]
    faiss_codes = binary_index(codes)
    for row in (0, 13, 29):
        np.testing.assert_array_equal(milvus.reconstruct(row), codes[row])
        np.testing.assert_array_equal(faiss_codes.reconstruct(row), codes[row])
    milvus.client.close()
