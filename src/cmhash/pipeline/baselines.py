"""Stage `baselines`: training-free hashing on the extracted features, so that every MAP table
shows what training buys over the classic methods and over the unhashed features.

reads   stages/extract/{train,val,query,retrieval}.pkl (only the features: no model, no CLIP), each
        row L2-normalised as cmhash's model normalises its inputs
writes  stages/baselines/<method>/<bits>.npz  for each hashing method and code length: the packed
            codes (np.packbits of code > 0) of query_image, query_text, retrieval_image and
            retrieval_text, and the fitted linear hash (image_mean, image_projection, text_mean,
            text_projection: code = sign((x - mean) @ projection))
        stages/baselines/clip_cosine/float.npz  the L2-normalised float features (no code length)
        metrics/baselines_val.json  per method and code length, every candidate knob combination
            with its val MAP@K (val pairs vs train pairs, strict) and the one kept; without labels
            "recall" (val Recall@K of the paired item, val against itself) instead of "map"
Each method is fitted on train; a list-valued knob is chosen on val (`cmhash.baselines.selection`).
`evaluate` scores the codes with the ranking it scores cmhash's with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from cmhash.config.options import ParamsOption
from cmhash.config.schema import Params, load_params
from cmhash.config.stages import BaselinesSettings

log = logging.getLogger("cmhash")
SIDES = ("query_image", "query_text", "retrieval_image", "retrieval_text")


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return BaselinesSettings.of(p).reads()


def command(
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract`.")] = Path("stages/extract"),
    out_dir: Annotated[Path, typer.Option(help="writes <out-dir>/<method>/<bits>.npz.")] = Path("stages/baselines"),
    metrics: Annotated[Path, typer.Option(help="val MAP of every candidate knob setting (git-tracked).")] = Path("metrics/baselines_val.json"),
) -> None:
    """Training-free baselines (LSH, PCA-ITQ, CCA-ITQ, float CLIP) on the extracted features, knobs chosen on val."""
    run(BaselinesSettings.of(load_params(params)), features_dir, out_dir, metrics)


def run(settings: BaselinesSettings, features_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    import time

    import numpy as np

    from cmhash.baselines.methods import unit_rows
    from cmhash.baselines.selection import select_on_val
    from cmhash.features.store import load_features
    from cmhash.io import all_or_nothing, atomic_dir, save_npz, write_json

    splits = {name: load_features(features_dir / f"{name}.pkl") for name in ("train", "val", "query", "retrieval")}
    # L2-normalised, as cmhash's model normalises its inputs: every method sees the same features.
    arrays = {name: (unit_rows(s.image), unit_rows(s.text), s.label.numpy()) for name, s in splits.items()}
    b = settings.baselines
    check_inputs(settings, {name: s.dim for name, s in splits.items()}, features_dir)
    report: dict[str, Any] = {}
    with all_or_nothing(), atomic_dir(out_dir) as tmp:  # every output or none; no file of an earlier run stays
        for method in b.methods:
            knobs = b.knobs(method).model_dump()
            lengths = [None] if method == "clip_cosine" else settings.bits  # float features have no code length
            for bits in lengths:
                start = time.perf_counter()
                chosen = select_on_val(method, knobs, arrays["train"], arrays["val"], bits, settings.seed, b.select_topk,
                                       val_groups=splits["val"].meta.get("groups"))
                fitted, name = chosen.fitted, "float" if bits is None else str(bits)
                q, r = arrays["query"], arrays["retrieval"]
                if fitted.binary:
                    codes = dict(zip(SIDES, (fitted.image_codes(q[0]), fitted.text_codes(q[1]), fitted.image_codes(r[0]), fitted.text_codes(r[1]))))
                    save_npz(tmp / method / f"{name}.npz", bits=np.array(bits), **{k: np.packbits(c > 0, axis=1) for k, c in codes.items()},
                             image_mean=fitted.image_mean, image_projection=fitted.image_projection,
                             text_mean=fitted.text_mean, text_projection=fitted.text_projection)
                else:
                    save_npz(tmp / method / f"{name}.npz", **dict(zip(SIDES, (fitted.embed_image(q[0]), fitted.embed_text(q[1]),
                                                                               fitted.embed_image(r[0]), fitted.embed_text(r[1])))))
                report.setdefault(method, {})[name] = {"chosen": chosen.knobs, "val": chosen.table}
                best = max(row[chosen.metric] for row in chosen.table)
                log.info("baselines: %s %s: val %s@%d %.4f with %s (%.1f s)", method, name, chosen.metric.replace("map", "MAP"),
                         b.select_topk, best, chosen.knobs, time.perf_counter() - start)
        write_json(metrics_path, report)
    return report


# The most bits each method can give on D-wide features (load_features makes image and text one width).
MOST_BITS = {"pca_itq": "PCA directions = feature dims", "cca_itq": "CCA directions = min(image dims, text dims)"}


def check_inputs(settings: BaselinesSettings, dims: dict[str, int], features_dir: Path) -> None:
    """What the features cannot take, refused before any method is fitted (not after the ones before it)."""
    from cmhash.errors import ConfigError, DataError

    for name, dim in dims.items():
        if dim != dims["train"]:
            raise DataError(f"{features_dir / f'{name}.pkl'}: features are {dim} wide but train.pkl's are {dims['train']}; "
                            "extract every split with the same clip.model")
    for method in settings.baselines.methods:
        too_long = [bits for bits in settings.bits if method in MOST_BITS and bits > dims["train"]]
        if too_long:
            raise ConfigError(f"bits {too_long}: baselines.methods {method} gives at most {dims['train']} bits on these "
                              f"{dims['train']}-wide features ({MOST_BITS[method]}); drop {method} or those code lengths")
