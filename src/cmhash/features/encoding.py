"""CLIP encoding: images and captions to float32 features, in batches, on a device and in a
precision, with images decoded in DataLoader worker processes. `Encoder` is what `extract` runs
over whole collections; `ClipEncoder` rebuilds the same CLIP from what an index or a feature file
recorded, for search and serve's queries. Images are files, or members of webdataset tar shards
streamed from the tar (`<shard>#<member>`, cmhash.data.tar_shards). Nothing else in cmhash runs CLIP."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmhash.data.tar_shards import ShardReader, member_key, split_member_ref
from cmhash.errors import DataError
from cmhash.features.clip import Clip, load_seeded_clip, weights_sha256
from cmhash.runtime.precision import Precision


def _decode(i: int, source, preprocess):
    """(i, preprocessed image, "") or, for an image that does not decode, (i, None, the reason)."""
    try:
        with Image.open(source) as im:
            return i, preprocess(im.convert("RGB")), ""
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        message = str(exc) if isinstance(source, str) else str(exc).replace(repr(source), "the member")  # not a memory address
        return i, None, f"unreadable image: {type(exc).__name__}: {message}"


class ImageFiles(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a bad file yields a reason instead of a tensor."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return _decode(i, self.paths[i], self.preprocess)


class TarMembers(torch.utils.data.IterableDataset):
    """Decodes images as each DataLoader worker streams its share of the tar shards, one shard at a
    time (never unpacked); yields collated batches that never span two shards. `groups`: per shard,
    the positions of the images wanted from it (`<shard>#<member>` in `refs`)."""

    def __init__(self, refs: list[str], groups: list[list[int]], preprocess, batch_size: int) -> None:
        self.refs, self.groups, self.preprocess, self.batch_size = refs, groups, preprocess, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.groups[worker.id :: worker.num_workers] if worker else self.groups
        for group in mine:
            yield from self._shard(group)

    def _shard(self, group: list[int]):
        shard = split_member_ref(self.refs[group[0]])[0]
        wanted = {member_key(split_member_ref(self.refs[i])[1]): i for i in group}
        reader = ShardReader(shard, read=lambda name: member_key(name) in wanted)
        batch, seen = [], set()
        for sample in reader.samples():  # one member's bytes at a time; a batch of tensors at most
            for ext, data in sample.items():
                if (i := wanted.get((sample["__key__"], ext))) is not None and i not in seen:
                    seen.add(i)
                    batch.append(_decode(i, io.BytesIO(data), self.preprocess))
                    if len(batch) == self.batch_size:
                        yield _collate(batch)
                        batch = []
        why = f"not read from {shard}: {reader.error()}" if reader.errors else f"not in {shard}"
        batch += [(i, None, why) for i in group if i not in seen]
        yield from (_collate(part) for part in chunks(batch, self.batch_size))


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return idx, images, bad


def chunks(seq: Sequence, size: int) -> list:
    return [seq[start : start + size] for start in range(0, len(seq), size)]


def no_progress(n: int) -> None:
    pass


@dataclass
class Encoder:
    """CLIP on a device, in a precision (autocast), fed by `num_workers` processes that decode images."""

    clip: Clip
    device: torch.device
    batch_size: int = 128
    num_workers: int = 0
    precision: Precision | None = None  # None: fp32

    def _autocast(self):
        return self.precision.autocast() if self.precision else nullcontext()

    def image_batches(self, paths: list[str], batches: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Per batch of positions into `paths` (image files): the positions decoded, their features
        [n, D] float32, and (position, reason) for each image that could not be decoded."""
        return self._encode(torch.utils.data.DataLoader(
            ImageFiles(paths, self.clip.preprocess), batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
        ))

    def grouped_batches(self, images: list[str], groups: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """As `image_batches`, for groups of positions, no batch spanning two groups, in any order.
        Members of tar shards (`<shard>#<member>`, one shard per group) are streamed from their
        shards, each worker reading whole shards; image files are read group after group."""
        if not groups or split_member_ref(images[groups[0][0]]) is None:
            return self.image_batches(images, [batch for group in groups for batch in chunks(group, self.batch_size)])
        return self._encode(torch.utils.data.DataLoader(
            TarMembers(images, groups, self.clip.preprocess, self.batch_size), batch_size=None,
            num_workers=min(self.num_workers, len(groups)), pin_memory=self.device.type == "cuda",
        ))

    @torch.no_grad()
    def _encode(self, loader) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        decoded = iter(loader)
        try:
            for idx, images, bad in decoded:
                feats = np.zeros((0, self.clip.dim), dtype=np.float32)
                if images is not None:
                    with self._autocast():
                        feats = self.clip.model.encode_image(images.to(self.device, non_blocking=True)).float().cpu().numpy()
                yield idx.numpy(), feats, bad
        finally:
            # the last reference: its workers (and pin thread) stop now, also when the caller stops
            # early, not whenever it is collected - threads alive at interpreter exit can abort it
            del decoded

    @torch.no_grad()
    def captions(self, captions: list[str]) -> np.ndarray:
        """Text features [n, D] float32 of one batch of captions."""
        if not captions:
            return np.zeros((0, self.clip.dim), dtype=np.float32)
        with self._autocast():
            return self.clip.model.encode_text(self.clip.tokenizer(captions).to(self.device)).float().cpu().numpy()


def encode_images(clip: Clip, paths: list[str], device: torch.device, batch_size: int, num_workers: int, advance=no_progress):
    """Image features [N, D] float32 (None if no image decodes), a decoded mask, and
    (position, reason) for each image that could not be decoded."""
    encoder = Encoder(clip, device, batch_size, num_workers)
    feats_all = np.zeros((len(paths), clip.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    bad: list[tuple[int, str]] = []
    for idx, feats, failed in encoder.image_batches(paths, chunks(list(range(len(paths))), batch_size)):
        feats_all[idx], ok[idx] = feats, True
        bad += failed
        advance(len(idx) + len(failed))
    return (feats_all if ok.any() else None), ok, bad


def encode_captions(clip: Clip, captions: list[str], device: torch.device, batch_size: int, advance=no_progress) -> np.ndarray:
    """Text features [N, D] float32."""
    encoder = Encoder(clip, device, batch_size)
    feats = [np.zeros((0, clip.dim), dtype=np.float32)]
    for chunk in chunks(captions, batch_size):
        feats.append(encoder.captions(chunk))
        advance(len(chunk))
    return np.concatenate(feats)


@dataclass
class ClipEncoder:
    clip: Clip
    seed: int
    device: torch.device
    batch_size: int = 1
    num_workers: int = 0

    @classmethod
    def load(cls, settings: dict[str, Any], device: torch.device, batch_size: int = 1, num_workers: int = 0) -> ClipEncoder:
        """settings: {clip_model, pretrained, seed[, checkpoint_sha256, weights_sha256]}, as an index
        or a feature file records them; a recorded digest must match the weights rebuilt here."""
        seed = int(settings["seed"])
        clip = load_seeded_clip(str(settings["clip_model"]), str(settings["pretrained"]), seed, device)
        if clip.meta["random_init"]:  # drawn from the seed: record which weights it drew (on this torch)
            clip.meta["weights_sha256"] = weights_sha256(clip.model)
        for digest in ("checkpoint_sha256", "weights_sha256"):
            if settings.get(digest) and clip.meta.get(digest) != settings[digest]:
                raise DataError(f"CLIP {settings['clip_model']} ({settings['pretrained']}, seed {seed}) does not rebuild the weights "
                                f"recorded ({digest} differs: another seed, weights file or torch version); rebuild with the settings extract used")
        return cls(clip, seed, device, batch_size, num_workers)

    @property
    def settings(self) -> dict[str, Any]:
        """What an index records to rebuild this encoder: the CLIP model, its weights, the seed."""
        return {**{k: v for k, v in self.clip.meta.items() if k != "preprocess"}, "seed": self.seed}

    def images(self, paths: list[str], advance=no_progress) -> tuple[np.ndarray | None, np.ndarray, list[tuple[int, str]]]:
        return encode_images(self.clip, paths, self.device, self.batch_size, self.num_workers, advance)

    def captions(self, captions: list[str], advance=no_progress) -> np.ndarray:
        return encode_captions(self.clip, captions, self.device, self.batch_size, advance)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image (a query) preprocessed as extract preprocesses files: [3, H, W]."""
        return self.clip.preprocess(image)

    @torch.inference_mode()
    def query_images(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """Features [n, D] of preprocessed query images (`pixels`), encoded as one batch."""
        return self.clip.model.encode_image(torch.stack(pixels).to(self.device)).float().cpu().numpy()

    @torch.inference_mode()
    def query_captions(self, captions: list[str]) -> np.ndarray:
        """Features [n, D] of query captions, encoded as one batch (not in chunks of `batch_size`)."""
        return Encoder(self.clip, self.device).captions(captions)
