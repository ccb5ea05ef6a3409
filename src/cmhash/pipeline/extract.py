"""Stage `extract`: CLIP features of every image and caption, one .pkl per split.

reads   stages/prepare/{split}.jsonl, labels.json, the images
writes  stages/extract/{train,val,query,retrieval}.pkl  {'image','text','label','ids', ...metadata}
        stages/extract/skipped.jsonl (images that could not be decoded), metrics/extract.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

from cmhash.clip import Clip, load_clip
from cmhash.config import choose, get, load_params, seed_everything
from cmhash.data.manifest import SPLITS, Item, Skipped, multi_hot, read_label_names, read_split
from cmhash.errors import DataError
from cmhash.io import atomic_write_text, save_pickle, write_json
from cmhash.pipeline import ParamsOption
from cmhash.progress import progress_bar
from cmhash.training.precision import resolve_device

log = logging.getLogger("cmhash")
BAD_ITEM_POLICIES = ("skip", "fail")


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a bad file yields a reason instead of a tensor."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as im:
                return i, self.preprocess(im.convert("RGB")), ""
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, None, f"unreadable image: {type(exc).__name__}: {exc}"


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return idx, images, bad


@torch.no_grad()
def encode_items(clip: Clip, items: list[Item], device: torch.device, batch_size: int, num_workers: int):
    """Image and text features [N, D] float32 for `items`, and the items whose image failed to decode."""
    loader = torch.utils.data.DataLoader(
        _ImageFiles([it.image for it in items], clip.preprocess), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    image_feats: np.ndarray | None = None
    ok = np.zeros(len(items), dtype=bool)
    skipped: list[Skipped] = []
    with progress_bar("extract images", total=len(items), unit="img") as advance:
        for idx, images, bad in loader:
            skipped += [Skipped(items[i].id, reason) for i, reason in bad]
            if images is not None:
                feats = clip.model.encode_image(images.to(device)).float().cpu().numpy()
                if image_feats is None:
                    image_feats = np.zeros((len(items), feats.shape[1]), dtype=np.float32)
                image_feats[idx.numpy()] = feats
                ok[idx.numpy()] = True
            advance(len(idx) + len(bad))
    if image_feats is None:
        raise DataError("no image could be decoded; check the image paths in stages/prepare/*.jsonl")
    text_feats = np.zeros_like(image_feats)
    with progress_bar("extract captions", total=len(items), unit="cap") as advance:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            tokens = clip.tokenizer([it.caption for it in chunk]).to(device)
            text_feats[start : start + len(chunk)] = clip.model.encode_text(tokens).float().cpu().numpy()
            advance(len(chunk))
    return image_feats, text_feats, ok, skipped


def run(params: dict, prepare_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    seed_everything(int(get(params, "seed")))  # random-init CLIP weights depend on it
    device = resolve_device(str(get(params, "device")))
    on_bad_item = choose(get(params, "data.on_bad_item"), BAD_ITEM_POLICIES, "data.on_bad_item")
    label_names = read_label_names(prepare_dir / "labels.json")
    splits = {split: read_split(prepare_dir / f"{split}.jsonl") for split in SPLITS}
    # train/val are subsets of retrieval: encode every distinct item once, then slice per split.
    unique = list({it.id: it for items in splits.values() for it in items}.values())
    position = {it.id: row for row, it in enumerate(unique)}

    clip = load_clip(str(get(params, "clip.model")), str(get(params, "clip.pretrained")), device)
    image, text, ok, skipped = encode_items(clip, unique, device, int(get(params, "clip.batch_size")), int(get(params, "clip.num_workers")))
    if skipped and on_bad_item == "fail":
        raise DataError(f"{len(skipped)} bad image(s), first: {skipped[0].id}: {skipped[0].reason} (or set data.on_bad_item: skip)")

    counts = {}
    for split, items in splits.items():
        rows = np.array([position[it.id] for it in items if ok[position[it.id]]], dtype=np.int64)
        kept = [unique[r] for r in rows]
        save_pickle(
            out_dir / f"{split}.pkl",
            {
                "image": image[rows],
                "text": text[rows],
                "label": multi_hot(kept, len(label_names)),
                "ids": [it.id for it in kept],
                "label_names": label_names,
                "split": split,
                "dataset": json.loads((prepare_dir / "labels.json").read_text())["dataset"],
                **clip.meta,
            },
        )
        counts[split] = len(kept)
    report = "".join(json.dumps({"id": s.id, "reason": s.reason}) + "\n" for s in skipped)
    atomic_write_text(out_dir / "skipped.jsonl", report)
    if skipped:
        log.warning("skipped %d undecodable image(s); see %s", len(skipped), out_dir / "skipped.jsonl")
    write_json(metrics_path, {"clip_model": clip.meta["clip_model"], "pretrained": clip.meta["pretrained"],
                              "random_init": clip.meta["random_init"], "items": counts, "skipped_images": len(skipped)})


def command(
    params: ParamsOption = Path("params.yaml"),
    prepare_dir: Annotated[Path, typer.Option(help="manifests written by `cmhash prepare`.")] = Path("stages/prepare"),
    out_dir: Annotated[Path, typer.Option(help="where the feature files go.")] = Path("stages/extract"),
    metrics: Annotated[Path, typer.Option(help="small JSON summary (git-tracked).")] = Path("metrics/extract.json"),
) -> None:
    """CLIP features (open_clip) of every image and caption: one .pkl per split."""
    run(load_params(params), prepare_dir, out_dir, metrics)
