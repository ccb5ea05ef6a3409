"""Stage `extract`: CLIP features of every image and caption, one .pkl per split.

reads   stages/prepare/{split}.jsonl, labels.json, the images
        (data.name: features: stages/prepare/features/<split>.npz instead; no CLIP runs, see
        cmhash.features.precomputed)
writes  stages/extract/{train,val,query,retrieval}.pkl  {'image','text','label','ids', ...metadata}
        stages/extract/skipped.jsonl (id, image path and reason of each undecodable image), metrics/extract.json
work    stages/extract_shards/ (next to the output folder, not a DVC output, so DVC leaves it when it
        re-runs the stage): every `clip.shard_size` pairs are saved there as they finish; a re-run
        after an interruption reuses the shards whose settings and pairs match and encodes the rest.
        Removed once the feature files are written.
torchrun  rank r encodes shards r, r+W, ... into the work folder; rank 0 alone, once all are done,
        writes the outputs from them (docs/distributed.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from cmhash.config.options import ParamsOption
from cmhash.config.schema import Params, load_params
from cmhash.config.stages import ExtractSettings
from cmhash.data.manifest import SPLITS, read_split
from cmhash.digests import digest
from cmhash.errors import DataError
from cmhash.features.shards import ShardStore

log = logging.getLogger("cmhash")


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return ExtractSettings.of(p).reads()


def dataset_info(prepare_dir: Path) -> dict[str, Any]:
    """Which data the features are of: the dataset name, what prepare was run with, and a version
    (fingerprint of labels.json and the split manifests, so any change to ids, paths, captions,
    labels or splits shows)."""
    labels_path = prepare_dir / "labels.json"
    if not labels_path.is_file():
        raise DataError(f"label names not found: {labels_path} (run `cmhash prepare` first)")
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    files = [labels_path] + [prepare_dir / f"{split}.jsonl" for split in SPLITS]
    contents = [path.read_text(encoding="utf-8") if path.is_file() else None for path in files]
    return {"dataset": labels["dataset"], "dataset_version": digest(contents)[:16],
            "dataset_options": labels.get("options"), "dataset_seed": labels.get("seed"), "label_names": list(labels["labels"])}


def shard_folder(out_dir: Path) -> Path:
    """stages/extract -> stages/extract_shards: beside the output folder, never inside it."""
    return out_dir.parent / f"{out_dir.name}_shards"


def run(settings: ExtractSettings, prepare_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    import numpy as np

    from cmhash.data import precomputed
    from cmhash.data.manifest import multi_hot
    from cmhash.features.clip import load_seeded_clip, weights_note, weights_sha256
    from cmhash.features.encoding import Encoder
    from cmhash.features.extraction import extract_pairs
    from cmhash.io import all_or_nothing, atomic_write_text, save_pickle, write_json
    from cmhash.runtime.device import resolve_device
    from cmhash.runtime.distributed import current_world
    from cmhash.runtime.precision import inference_precision

    seed, clip_cfg = settings.seed, settings.clip
    world = current_world()
    if (prepared := precomputed.prepared(prepare_dir)) is not None:  # data.name: features: no CLIP to run
        if not world.main:
            return None  # nothing to share out: rank 0 writes them
        from cmhash.features.precomputed import write_precomputed

        return write_precomputed(seed, prepared, prepare_dir, out_dir, metrics_path)
    device = resolve_device(settings.device)
    precision = inference_precision(clip_cfg.precision, device)
    data = dataset_info(prepare_dir)
    splits = {split: read_split(prepare_dir / f"{split}.jsonl") for split in SPLITS}
    # train/val are subsets of retrieval: encode every distinct item once, then slice per split.
    unique = list({it.id: it for items in splits.values() for it in items}.values())
    position = {it.id: row for row, it in enumerate(unique)}

    clip = load_seeded_clip(clip_cfg.model, clip_cfg.pretrained, seed, device)
    meta = {**clip.meta, "precision": precision.name}
    if clip.meta["random_init"]:
        meta["weights_sha256"] = weights_sha256(clip.model)  # what the seed drew, on this torch
    # Everything the features depend on besides the pairs themselves (batch size only moves the last bits).
    settings_key = digest(meta, device.type)
    encoder = Encoder(clip, device, clip_cfg.batch_size, clip_cfg.num_workers, precision)
    store = ShardStore(shard_folder(out_dir))
    encoded = extract_pairs(encoder, unique, clip_cfg.shard_size, store, settings_key, fail_on_bad=settings.on_bad_item == "fail", world=world)
    if encoded is None:
        return None  # not rank 0: its shards are in the store, where rank 0 reads them
    if not encoded.ok.any():
        raise DataError("no image could be decoded; check the image paths in stages/prepare/*.jsonl")
    where = f"{world.size} processes, {device.type}" if world.distributed else str(device)
    log.info("extract: %d pairs in %d shard(s), %d reused; encoded %d pairs at %.0f pairs/s (%s, %s)", len(unique), encoded.shards,
             encoded.reused, encoded.encoded_pairs, encoded.encoded_pairs / max(encoded.seconds, 1e-9), where, precision.name)

    with all_or_nothing():  # a failure part-way keeps the previous feature files, not a mix
        counts = {}
        for split, items in splits.items():
            rows = np.array([position[it.id] for it in items if encoded.ok[position[it.id]]], dtype=np.int64)
            kept = [unique[r] for r in rows]
            save_pickle(out_dir / f"{split}.pkl", {
                "image": encoded.image[rows],
                "text": encoded.text[rows],
                "label": multi_hot(kept, len(data["label_names"])),
                "ids": [it.id for it in kept],
                # the image of each caption, where images have several (Recall@K counts an image once)
                **({"groups": [it.id if it.group is None else it.group for it in kept]} if any(it.group for it in kept) else {}),
                "split": split,
                **data,
                **meta,
            })
            counts[split] = len(kept)
        skipped = ({"id": s.id, "image": unique[position[s.id]].image, "reason": s.reason} for s in encoded.skipped)
        atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(row) + "\n" for row in skipped))
        if encoded.skipped:
            log.warning("skipped %d undecodable image(s); see %s", len(encoded.skipped), out_dir / "skipped.jsonl")
        write_json(metrics_path, {
            "clip_model": meta["clip_model"], "pretrained": meta["pretrained"], "random_init": meta["random_init"],
            "weights": weights_note(meta), "precision": precision.name,
            "dataset": data["dataset"], "dataset_version": data["dataset_version"],
            "items": counts, "skipped_images": len(encoded.skipped),
        })
    store.clear()


def command(
    params: ParamsOption = Path("params.yaml"),
    prepare_dir: Annotated[Path, typer.Option(help="manifests written by `cmhash prepare`.")] = Path("stages/prepare"),
    out_dir: Annotated[Path, typer.Option(help="where the feature files go (finished shards wait in <out-dir>_shards).")] = Path("stages/extract"),
    metrics: Annotated[Path, typer.Option(help="small JSON summary (git-tracked).")] = Path("metrics/extract.json"),
) -> None:
    """CLIP features (open_clip) of every image and caption: one .pkl per split. An interrupted run
    resumes: re-run it and only the unfinished shards are encoded."""
    run(ExtractSettings.of(load_params(params)), prepare_dir, out_dir, metrics)
