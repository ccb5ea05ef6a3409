"""`features`: precomputed CLIP features, as papers distribute them, instead of images and captions.

Layouts under `data.root` (docs/features.md):

    per-split files   train.<ext>, query.<ext>, retrieval.<ext>[, val.<ext>], ext .pkl/.pickle, .npz or .mat;
                      arrays `image`, `text`, `label` (or the split's names from data.features.names)
    one file          every split in one .mat/.npz (or .pkl): data.features.file, or the only such
                      file in data.root; arrays named per split by data.features.names (I_tr, T_tr, L_tr ...)
    clip_retrieval    img_emb/, text_emb/, metadata/ as clip-retrieval writes them (cmhash.data.datasets.clip_retrieval)

Every split is checked (2-D arrays, one row per pair, finite features, 0/1 labels, one width) and
becomes float32 features and uint8 labels; ids are `<split>/<row>` of the source file. Without a
val split, `val` pairs are carved out of train (seeded, disjoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmhash.config.choices.datasets import Precomputed
from cmhash.data.array_files import FORMATS, ArrayFile, format_of, read_array_file
from cmhash.data.datasets.clip_retrieval import build_clip_retrieval
from cmhash.data.datasets.common import require_root
from cmhash.data.manifest import SPLITS
from cmhash.data.precomputed import FeatureSet, SplitArrays
from cmhash.errors import ConfigError, DataError
from cmhash.io import file_sha256

REQUIRED = ("train", "query", "retrieval")
ROLES = ("image", "text", "label")


def build_precomputed(root: Path, opts: Precomputed, out_dir: Path, seed: int) -> FeatureSet:
    root = Path(root)
    if (opts.clip_model is None) != (opts.pretrained is None):
        raise ConfigError("data.features.clip_model and data.features.pretrained go together: give both "
                          "(the open_clip model and weights the features were made with) or leave both null")
    if opts.format == "clip_retrieval":
        return build_clip_retrieval(root, opts, seed)
    if opts.file is None or not Path(opts.file).is_absolute():
        require_root(root, "the feature files")
    fmt, paths, one_file = _locate(root, opts)
    files = {path: read_array_file(path, fmt) for path in dict.fromkeys(paths.values())}
    splits = {}
    for split, path in paths.items():
        names = getattr(opts.names, split)
        if one_file and split == "val" and not any(getattr(names, role) in files[path].arrays for role in ROLES):
            continue  # a one-file layout without val: carved below
        # per-split files: the generic name first, then the split's configured one
        candidates = {role: (getattr(names, role),) if one_file else (role, getattr(names, role)) for role in ROLES}
        splits[split] = _checked(files[path], split, *(_array(files[path], split, role, candidates[role]) for role in ROLES))
    _same_widths(splits)
    val = "given" if "val" in splits else "carved from train"
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(splits["train"], opts.val, seed, paths["train"])
    n_labels = splits["train"].label.shape[1]
    label_names = opts.label_names or [f"label{i}" for i in range(n_labels)]
    if len(label_names) != n_labels:
        raise DataError(f"data.features.label_names has {len(label_names)} names but the labels have {n_labels} columns")
    sources = {_shown(path, root): file_sha256(path) for path in files}
    return FeatureSet({split: splits[split] for split in SPLITS}, label_names, fmt, sources, val)


def _locate(root: Path, opts: Precomputed) -> tuple[str, dict[str, Path], bool]:
    """(format, the file of each split found, whether one file holds every split)."""
    formats = list(FORMATS) if opts.format == "auto" else [opts.format]
    if opts.file is not None:
        path = root / opts.file
        if not path.is_file():
            raise DataError(f"feature file not found: {path} (data.features.file)")
        fmt = format_of(path) if opts.format == "auto" else opts.format
        if fmt is None:
            raise ConfigError(f"data.features.file {opts.file!r}: cannot tell its format from the extension; "
                              f"set data.features.format ({', '.join(FORMATS)})")
        return fmt, dict.fromkeys(SPLITS, path), True
    per_split = {fmt: {split: p for split in SPLITS if (p := _split_file(root, split, fmt))} for fmt in formats}
    found = {fmt: files for fmt, files in per_split.items() if files}
    if len(found) > 1:
        raise ConfigError(f"{root} holds per-split feature files of several formats ({', '.join(found)}); set data.features.format")
    if found:
        (fmt, files), = found.items()
        if missing := [split for split in REQUIRED if split not in files]:
            raise DataError(f"required split '{missing[0]}' missing: no {missing[0]}{'/'.join(FORMATS[fmt])} in {root} "
                            f"(found {', '.join(p.name for p in files.values())})")
        return fmt, files, False
    singles = sorted(p for p in root.iterdir() if p.is_file() and format_of(p) in formats)
    if len(singles) > 1:
        raise ConfigError(f"{root} holds several feature files ({', '.join(p.name for p in singles)}) and no train/query/retrieval "
                          "files; set data.features.file to the one holding every split")
    if not singles:
        raise DataError(f"no feature files in {root}: expected train, query, retrieval (and val) .pkl, .npz or .mat files, "
                        "or one .mat/.npz file holding every split (docs/features.md)")
    return format_of(singles[0]), dict.fromkeys(SPLITS, singles[0]), True


def _split_file(root: Path, split: str, fmt: str) -> Path | None:
    return next((p for suffix in FORMATS[fmt] if (p := root / f"{split}{suffix}").is_file()), None)


def _array(file: ArrayFile, split: str, role: str, names: tuple[str, ...]) -> np.ndarray:
    for name in names:
        if name in file.arrays:
            return np.asarray(file.arrays[name])
    held = ", ".join(sorted(file.arrays)) or "nothing"
    raise DataError(f"{file.path} has no array {' or '.join(map(repr, names))} for the {split} {role} "
                    f"(data.features.names.{split}.{role}); it holds: {held}")


def _rows_agree(arrays: list[np.ndarray]) -> bool:
    return all(a.ndim == 2 for a in arrays) and len({a.shape[0] for a in arrays}) == 1


def _checked(file: ArrayFile, split: str, image: np.ndarray, text: np.ndarray, label: np.ndarray) -> SplitArrays:
    where = f"{file.path}: {split}"
    arrays = [image, text, label]
    for role, a in zip(ROLES, arrays, strict=True):
        if a.dtype.kind not in "biuf":
            raise DataError(f"{where} {role} holds {a.dtype} values, not numbers")
    # A v7.3 file written by h5py itself (not MATLAB) is already [N, D]: take it as stored.
    if file.matlab_order and not _rows_agree(arrays) and _rows_agree([a.T for a in arrays]):
        image, text, label = arrays = [a.T for a in arrays]
    if not all(a.ndim == 2 for a in arrays):
        raise DataError(f"{where} image {image.shape}, text {text.shape} and label {label.shape} must each be 2-D: [N, D], [N, D], [N, C]")
    if not _rows_agree(arrays):
        raise DataError(f"{where} image {image.shape}, text {text.shape} and label {label.shape} differ in N (one row per pair)")
    if image.shape[1] != text.shape[1]:
        raise DataError(f"{where} image features are {image.shape[1]} wide but text features {text.shape[1]}: "
                        "both must come from one CLIP model")
    if 0 in image.shape or 0 in label.shape:
        raise DataError(f"{where} is empty: image {image.shape}, label {label.shape}")
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, refused just below
        image, text = image.astype(np.float32), text.astype(np.float32)
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise DataError(f"{where} features contain NaN or inf (or values beyond float32)")
    if not np.isin(label, (0, 1)).all():
        bad = label[~np.isin(label, (0, 1))].flat[0].item()
        raise DataError(f"{where} label holds {bad}: labels must be 0/1 (multi-hot, one column per class)")
    return SplitArrays(image, text, label.astype(np.uint8), [f"{split}/{row}" for row in range(len(image))])


def _same_widths(splits: dict[str, SplitArrays]) -> None:
    for what, width in (("feature widths", lambda a: a.image.shape[1]), ("label columns", lambda a: a.label.shape[1])):
        widths = {split: width(arrays) for split, arrays in splits.items()}
        if len(set(widths.values())) > 1:
            raise DataError(f"{what} differ between splits ({', '.join(f'{s} {w}' for s, w in widths.items())}); all splits must be one feature set")


def _carve(train: SplitArrays, n_val: int, seed: int, path: Path) -> tuple[SplitArrays, SplitArrays]:
    """(train without val, val): `n_val` train rows drawn with `seed`, both in file order."""
    n = len(train.ids)
    if n_val >= n:
        raise DataError(f"data.features.val {n_val} would leave no training pairs: {path} has {n} train pairs; make it smaller")
    order = np.random.default_rng(seed).permutation(n)
    return train.rows(np.sort(order[n_val:])), train.rows(np.sort(order[:n_val]))


def _shown(path: Path, root: Path) -> str:
    """A source file as metadata names it: relative to data.root when it lies there."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
