"""`cmhash index` and `cmhash search`: tools on top of the pipeline's outputs (not dvc.yaml stages).

index   reads   a split (stages/extract/<split>.pkl + stages/prepare/<split>.jsonl), an image folder
                or a captions file; stages/hash/<bits>/model.pt
        writes  stages/index/ (see cmhash.search.index)
search  reads   stages/index/, the hash model it names; prints the nearest codes of the other modality
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
import torch
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from cmhash.config import choose, get, load_params
from cmhash.data.manifest import SPLITS, read_split
from cmhash.errors import ConfigError, DataError
from cmhash.features import load_features
from cmhash.pipeline import ParamsOption
from cmhash.progress import progress_bar
from cmhash.search.encoder import ClipEncoder, HashModel, load_hash_model
from cmhash.search.index import CodeIndex, binary_index, hamming_topk, pack_codes
from cmhash.training.precision import resolve_device

log = logging.getLogger("cmhash")

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
OTHER = {"image": "text", "text": "image"}  # a query of one modality searches the other
SHOWN = {"image": "image", "text": "caption"}  # the item field a result of each modality shows
DEFAULT_BITS = 64
VERIFY_ITEMS = 4  # split items re-encoded at index time to prove the encoder reproduces extract's features
MIN_COSINE = 0.999  # same encoder up to float noise (CPU vs GPU); another random init scores ~0


# ---------------------------------------------------------------- index


@dataclass
class Collection:
    items: list[dict[str, Any]]  # id, image and/or caption, labels (names)
    features: dict[str, np.ndarray]  # modality -> CLIP features [N, D], row i = items[i]


@dataclass
class Sources:
    """What a source may need. CLIP loads on first use, after the source has checked its input."""

    hash_model: HashModel
    clip_settings: dict[str, Any]
    device: torch.device
    batch_size: int
    num_workers: int
    features_dir: Path
    prepare_dir: Path

    @cached_property
    def encoder(self) -> ClipEncoder:
        return ClipEncoder.load(self.clip_settings, self.device, self.batch_size, self.num_workers)


def _from_split(split: str, ctx: Sources) -> Collection:
    """Both modalities of a pipeline split, from extract's features (nothing re-encoded but a check)."""
    choose(split, SPLITS, "--split")
    path = ctx.features_dir / f"{split}.pkl"
    feats = load_features(path)
    made_with = {k: feats.meta.get(k) for k in ("clip_model", "pretrained")}
    trained_on = {k: ctx.hash_model.clip_settings.get(k) for k in made_with}
    if made_with != trained_on:
        raise DataError(f"{path} was made with CLIP {made_with} but {ctx.hash_model.checkpoint} was trained on {trained_on}; re-run `dvc repro`")
    manifest = {it.id: it for it in read_split(ctx.prepare_dir / f"{split}.jsonl")}
    missing = [i for i in feats.meta["ids"] if i not in manifest]
    if missing:
        raise DataError(f"{path} has item {missing[0]} that {ctx.prepare_dir / f'{split}.jsonl'} lacks; re-run `dvc repro`")
    for key in ("seed", "weights_sha256", "checkpoint_sha256"):  # recorded by extract: the encoder must be the same
        if feats.meta.get(key) is not None and feats.meta[key] != ctx.encoder.settings.get(key):
            raise DataError(f"{path} was extracted with CLIP {key} {feats.meta[key]}, the index would encode queries with "
                            f"{ctx.encoder.settings.get(key)}; set params.yaml back to what extract used, or re-run `dvc repro`")
    names = list(feats.meta["label_names"])
    items = [manifest[i] for i in feats.meta["ids"]]
    image, text = feats.image.numpy(), feats.text.numpy()
    _check_encoder_reproduces(ctx.encoder, items[:VERIFY_ITEMS], image, text, path)
    rows = [{"id": it.id, "image": it.image, "caption": it.caption, "labels": [names[c] for c in it.labels]} for it in items]
    return Collection(rows, {"image": image, "text": text})


def _check_encoder_reproduces(encoder: ClipEncoder, items, image: np.ndarray, text: np.ndarray, path: Path) -> None:
    """Queries are encoded at search time by the encoder rebuilt here: it must give extract's features
    (a random-init CLIP differs with the seed; real weights differ with the file)."""
    n = len(items)
    fresh_image, ok, _ = encoder.images([it.image for it in items])  # an image gone since extract is not checked
    fresh = np.concatenate([encoder.captions([it.caption for it in items]), fresh_image[ok] if ok.any() else image[:0]])
    stored = np.concatenate([text[:n], image[:n][ok]])
    cosine = float(np.min(np.sum(_unit(fresh) * _unit(stored), axis=1)))
    if cosine < MIN_COSINE:
        raise DataError(f"CLIP rebuilt from seed {encoder.settings['seed']} does not reproduce {path} (cosine {cosine:.3f}); "
                        "index with the seed and clip settings extract used, or re-run `dvc repro`")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _from_images(folder: Path, ctx: Sources) -> Collection:
    """Image codes of every image file under `folder` (recursive, sorted); unreadable ones are skipped."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) under {folder}")
    with progress_bar("index images", total=len(paths), unit="img") as advance:
        feats, ok, bad = ctx.encoder.images([str(p) for p in paths], advance)
    if feats is None:
        raise DataError(f"none of the {len(paths)} image files under {folder} could be read, first: {paths[bad[0][0]]}: {bad[0][1]}")
    if bad:
        log.warning("skipped %d unreadable image(s), first: %s: %s", len(bad), paths[bad[0][0]], bad[0][1])
    keep = np.flatnonzero(ok)
    return Collection([{"id": paths[i].relative_to(folder).as_posix(), "image": str(paths[i])} for i in keep], {"image": feats[keep]})


def _read_captions(path: Path) -> list[dict[str, Any]]:
    """One caption per line, or JSONL lines holding a string or {"caption", "id"?, "labels"?}."""
    if not path.is_file():
        raise DataError(f"captions file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row: Any = line.strip()
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc})") from None
        row = {"caption": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise DataError(f'{path}:{lineno}: expected a non-empty caption (a string or {{"caption": "...", "id": ..., "labels": [...]}})')
        rows.append({"id": str(row.get("id", lineno)), "caption": row["caption"], "labels": [str(x) for x in row.get("labels", [])]})
    if not rows:
        raise DataError(f"no captions in {path}")
    return rows


def _from_captions(path: Path, ctx: Sources) -> Collection:
    rows = _read_captions(path)
    with progress_bar("index captions", total=len(rows), unit="cap") as advance:
        feats = ctx.encoder.captions([r["caption"] for r in rows], advance)
    return Collection(rows, {"text": feats})


SOURCES: dict[str, Callable[[Any, Sources], Collection]] = {"split": _from_split, "images": _from_images, "captions": _from_captions}


def build_index(params: dict, source: str, value: Any, *, bits: int | None, hash_dir: Path, features_dir: Path,
                prepare_dir: Path, out_dir: Path) -> CodeIndex:
    device = resolve_device(str(get(params, "device")))
    trained = [int(b) for b in get(params, "bits")]
    bits = bits or (DEFAULT_BITS if DEFAULT_BITS in trained else trained[0])
    if bits % 8:
        raise ConfigError(f"--bits {bits}: FAISS binary indexes need a multiple of 8 bits")
    checkpoint = hash_dir / str(bits) / "model.pt"
    if not checkpoint.is_file():
        raise DataError(f"no {bits}-bit hash model: {checkpoint} not found; run `cmhash train-hash` (or `dvc repro`) first")
    hash_model = load_hash_model(checkpoint, device)
    if hash_model.bits != bits:
        raise DataError(f"{checkpoint} makes {hash_model.bits}-bit codes, not {bits}")
    # The seed extract drew a random-init CLIP from: params' `seed`, unless the model recorded its own.
    clip_settings = {"seed": int(get(params, "seed")), **hash_model.clip_settings}
    ctx = Sources(hash_model, clip_settings, device, int(get(params, "clip.batch_size")), int(get(params, "clip.num_workers")),
                  features_dir, prepare_dir)
    collection = SOURCES[source](value, ctx)
    codes = {m: binary_index(pack_codes(hash_model.codes(f, m))) for m, f in collection.features.items()}
    meta = {"bits": bits, "source": {source: str(value)},
            "model": {"checkpoint": str(checkpoint), "sha256": hash_model.sha256},
            "clip": ctx.encoder.settings}
    index = CodeIndex(meta, collection.items, codes)
    index.save(out_dir)
    log.info("indexed %d item(s) (%s codes, %d bits) into %s", len(collection.items), " + ".join(sorted(codes)), bits, out_dir)
    return index


def index(
    params: ParamsOption = Path("params.yaml"),
    split: Annotated[Optional[str], typer.Option(help=f"a pipeline split ({', '.join(SPLITS)}): image and text codes.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="a folder of images (recursive): image codes.")] = None,
    captions: Annotated[Optional[Path], typer.Option(help='a captions file, one per line or JSONL {"caption", "id", "labels"}: text codes.')] = None,
    bits: Annotated[Optional[int], typer.Option(help=f"code length; default {DEFAULT_BITS} if in params `bits`, else its first.")] = None,
    hash_dir: Annotated[Path, typer.Option(help="hash models, <hash-dir>/<bits>/model.pt.")] = Path("stages/hash"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract` (--split).")] = Path("stages/extract"),
    prepare_dir: Annotated[Path, typer.Option(help="manifests from `cmhash prepare` (--split).")] = Path("stages/prepare"),
    out_dir: Annotated[Path, typer.Option(help="the index folder (replaced whole).")] = Path("stages/index"),
) -> None:
    """Encode a collection into packed binary codes (FAISS binary indexes) for `cmhash search`."""
    given = {name: value for name, value in {"split": split, "images": images, "captions": captions}.items() if value is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --split NAME, --images DIR, --captions FILE")
    (source, value), = given.items()
    build_index(load_params(params), source, value, bits=bits, hash_dir=hash_dir, features_dir=features_dir,
                prepare_dir=prepare_dir, out_dir=out_dir)


# ---------------------------------------------------------------- search


def _check_model(code_index: CodeIndex, hash_model: HashModel, index_dir: Path) -> None:
    built_with = code_index.meta["model"]
    if hash_model.bits != code_index.bits:
        raise DataError(f"model/index mismatch: {hash_model.checkpoint} makes {hash_model.bits}-bit codes but {index_dir} holds "
                        f"{code_index.bits}-bit codes; use --model {built_with['checkpoint']} or rebuild with `cmhash index --bits {hash_model.bits}`")
    if hash_model.sha256 != built_with["sha256"]:
        raise DataError(f"model/index mismatch: {hash_model.checkpoint} is not the model {index_dir} was built with "
                        "(sha256 differs: retrained since?); rebuild the index with `cmhash index`")


def _check_image(path: Path) -> None:
    """Fail on a missing or undecodable query image before CLIP and the models load."""
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}") from None


def _query_features(encoder: ClipEncoder, modality: str, query: str) -> np.ndarray:
    if modality == "text":
        return encoder.captions([query])
    feats, ok, bad = encoder.images([query])
    if not ok[0]:
        raise DataError(f"cannot read image {query}: {bad[0][1]}")
    return feats


def search_index(index_dir: Path, modality: str, query: str, top: int, model: Path | None, device: str) -> dict[str, Any]:
    """The `top` nearest items of the other modality to one query: a JSON-ready dict."""
    if top < 1:
        raise ConfigError(f"-k/--top must be at least 1 (got {top})")
    if modality == "image":
        _check_image(Path(query))
    code_index = CodeIndex.load(index_dir)
    target = OTHER[modality]
    if target not in code_index.codes:
        held = " and ".join(code_index.codes)
        raise ConfigError(f"{index_dir} holds only {held} codes but a --{modality} query searches {target} codes; "
                          f"query with --{OTHER[modality]}, or build an index with {target}s (`cmhash index --split retrieval`)")
    torch_device = resolve_device(device)
    hash_model = load_hash_model(model or Path(code_index.meta["model"]["checkpoint"]), torch_device)
    _check_model(code_index, hash_model, index_dir)
    encoder = ClipEncoder.load(code_index.meta["clip"], torch_device)
    code = pack_codes(hash_model.codes(_query_features(encoder, modality, query), modality))
    dist, rows = hamming_topk(code_index.codes[target], code, top)
    results = [{"rank": rank, "distance": int(d), "row": int(r), **code_index.items[r]} for rank, (d, r) in enumerate(zip(dist[0], rows[0]), 1)]
    clip = {k: code_index.meta["clip"].get(k) for k in ("clip_model", "pretrained", "random_init")}
    return {"query": {modality: query}, "searched": target, "bits": code_index.bits, "index": str(index_dir), "clip": clip,
            "results": results}


def _table(found: dict[str, Any]) -> Table:
    (modality, query), = found["query"].items()
    shown = SHOWN[found["searched"]]
    note = "Hamming ties broken by database index (lower first)"
    if found["clip"].get("random_init"):
        note += "; random-init CLIP features: these results test the pipeline, not the method"
    table = Table(title=f"{found['searched']}s nearest to {modality} {query!r} ({found['bits']}-bit Hamming)", caption=note)
    with_labels = any(r.get("labels") for r in found["results"])
    for name, justify in (("rank", "right"), ("distance", "right"), ("id", "left"), (shown, "left")) + ((("labels", "left"),) if with_labels else ()):
        table.add_column(name, justify=justify, overflow="fold")  # a long path wraps whole, never cut to "…"
    for r in found["results"]:
        table.add_row(str(r["rank"]), str(r["distance"]), r["id"], str(r.get(shown, "")), *([", ".join(r.get("labels", []))] if with_labels else []))
    return table


def search(
    text: Annotated[Optional[str], typer.Option(help="a caption to find images for.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="an image file to find captions for.")] = None,
    top: Annotated[int, typer.Option("-k", "--top", help="how many results.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON.")] = False,
    index_dir: Annotated[Path, typer.Option(help="the folder `cmhash index` wrote.")] = Path("stages/index"),
    model: Annotated[Optional[Path], typer.Option(help="hash model; default: the one the index was built with.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
) -> None:
    """Find the nearest images to a caption (--text) or captions to an image (--image) by Hamming distance.
    Ties are broken by database row (lower first)."""
    queries = {name: value for name, value in {"text": text, "image": image}.items() if value is not None}
    if len(queries) != 1:
        raise ConfigError("give exactly one of --text \"a caption\" or --image PATH")
    (modality, query), = queries.items()
    if not str(query).strip():
        raise ConfigError(f"--{modality} is empty")
    found = search_index(index_dir, modality, str(query), top, model, device)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        Console().print(_table(found))
