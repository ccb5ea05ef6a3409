"""`data.features.format: clip_retrieval`: the embeddings clip-retrieval's `clip inference` writes,
under `data.root` (docs/features.md):

    img_emb/img_emb_<n>.npy          float16/float32 [rows, D] image embeddings of part n
    text_emb/text_emb_<n>.npy        [rows, D] caption embeddings, row-aligned with img_emb_<n>
    metadata/metadata_<n>.parquet    one row per pair: image_path (or url), caption, and any other columns

Parts are read in the order of their number n (its zero padding varies), and must be the same
set in all three folders with the same row counts. The collection has no labels (Recall@K) and no
splits: query, train and val are carved out with the seed as for any image dataset. Captions and
image paths (or urls) are kept for search.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cmhash.config.choices.datasets import Precomputed
from cmhash.data.datasets.common import require_root
from cmhash.data.manifest import make_splits
from cmhash.data.precomputed import FeatureSet, SplitArrays
from cmhash.errors import DataError
from cmhash.io import file_sha256

FOLDERS = {"image": ("img_emb", ".npy"), "text": ("text_emb", ".npy"), "metadata": ("metadata", ".parquet")}
PATH_COLUMNS = ("image_path", "url")  # where the image is: a local path, or the url img2dataset fetched


def build_clip_retrieval(root: Path, opts: Precomputed, seed: int) -> FeatureSet:
    require_root(root, "the clip-retrieval embeddings")
    parts = {role: _parts(root, folder, suffix) for role, (folder, suffix) in FOLDERS.items()}
    if len({tuple(sorted(p)) for p in parts.values()}) > 1:
        numbers = {role: sorted(p) for role, p in parts.items()}
        raise DataError(f"{root}: img_emb/, text_emb/ and metadata/ hold different parts ({numbers}); each part n needs all three files")
    image, text, captions, paths, ids = [], [], [], [], []
    for n in sorted(parts["image"]):
        img, txt = (_embeddings(parts[role][n]) for role in ("image", "text"))
        if img.shape[1] != txt.shape[1]:
            raise DataError(f"{parts['image'][n]} is {img.shape[1]} wide but {parts['text'][n]} {txt.shape[1]}: both must come from one CLIP model")
        if len(img) != len(txt):
            raise DataError(f"{parts['image'][n]} has {len(img)} rows but {parts['text'][n]} {len(txt)}: the parts must be row-aligned")
        caption, path = _metadata(parts["metadata"][n], len(img))
        image.append(img)
        text.append(txt)
        captions += caption
        paths += path
        ids += [f"{n}/{row}" for row in range(len(img))]  # part/row: stable when parts are added
    widths = {a.shape[1] for a in image}
    if len(widths) > 1:
        raise DataError(f"{root}: the parts' embeddings differ in width ({sorted(widths)}); all must come from one CLIP model")
    with np.errstate(over="ignore"):
        features = SplitArrays(np.concatenate(image).astype(np.float32), np.concatenate(text).astype(np.float32),
                               np.zeros((len(ids), 0), np.uint8), ids, captions, paths)
    if not (np.isfinite(features.image).all() and np.isfinite(features.text).all()):
        raise DataError(f"{root}: the embeddings contain NaN or inf")
    n = len(captions)
    if opts.query + opts.train + opts.val > n:
        raise DataError(f"split sizes data.features.query {opts.query} + train {opts.train} + val {opts.val} exceed the {n} pairs in {root}; "
                        "make them smaller")
    splits = {split: features.rows(rows) for split, rows in make_splits(n, query=opts.query, train=opts.train, val=opts.val,
                                                                          seed=seed).items()}
    files = [path for role in parts.values() for path in role.values()]
    sources = {path.relative_to(root).as_posix(): file_sha256(path) for path in files}
    return FeatureSet(splits, [], "clip_retrieval", sources, "carved, seeded")


def _parts(root: Path, folder: str, suffix: str) -> dict[int, Path]:
    """{part number: file} of one folder."""
    where = root / folder
    if not where.is_dir():
        raise DataError(f"clip-retrieval folder not found: {where} (expected img_emb/, text_emb/ and metadata/ under data.root)")
    pattern = re.compile(rf"{folder}_(\d+){re.escape(suffix)}")
    parts: dict[int, Path] = {}
    for path in where.iterdir():
        if match := pattern.fullmatch(path.name):
            if int(match[1]) in parts:
                raise DataError(f"{path} and {parts[int(match[1])]} are both part {int(match[1])}")
            parts[int(match[1])] = path
    if not parts:
        raise DataError(f"no {folder}_<n>{suffix} files in {where}")
    return parts


def _embeddings(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc})") from None
    if array.dtype.kind != "f":
        raise DataError(f"{path} holds {array.dtype} values; embeddings must be float16 or float32")
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{path} has shape {array.shape}; embeddings must be a non-empty 2-D array [rows, D]")
    return np.asarray(array)


def _metadata(path: Path, rows: int) -> tuple[list[str], list[str]]:
    """(captions, image paths or urls) of one part's parquet, which must have `rows` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})") from None
    if table.num_rows != rows:
        raise DataError(f"{path} has {table.num_rows} rows but its embeddings {rows}: the parts must be row-aligned")
    if "caption" not in table.column_names:
        raise DataError(f"{path} has no 'caption' column (it has {', '.join(table.column_names)})")
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    captions = [c or "" for c in table.column("caption").to_pylist()]
    paths = [p or "" for p in table.column(column).to_pylist()] if column else [""] * rows
    return [str(c) for c in captions], [str(p) for p in paths]
