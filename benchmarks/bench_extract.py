"""CLIP extraction speed: cmhash's batched extraction against a plain one-pair-at-a-time loop, and
from webdataset tar shards against the same images as files, in the same run.

    python benchmarks/bench_extract.py              # 2,000 JPEG + caption pairs
    python benchmarks/bench_extract.py --n 300      # smoke run

Data: --n JPEGs of --size px (smooth random colour fields with grain, quality 90, so decoding
costs what a photo's does) and short random captions, written to a temporary folder twice: as
files, and as tar shards of --shard-pairs pairs in img2dataset's layout (<key>.jpg, <key>.txt,
<key>.json; webdataset's TarWriter).
Model: the demo CLIP (`cmhash-demo`, random init from --seed), on CPU, fp32 on both sides.

ours      cmhash.features.extraction.extract_pairs, exactly what `cmhash extract` runs: images decoded
          and preprocessed by --workers DataLoader processes, --batch-size pairs per encode_image /
          encode_text call, every shard (--shard-size pairs) saved to a work folder as it finishes.
shards    the same, on the tar shards (`data.name: webdataset`): each worker streams whole tars,
          one extraction shard per tar.
baseline  for each pair: PIL open -> preprocess -> encode_image of 1 image, tokenize -> encode_text
          of 1 caption; no workers, no batches.

All run after a short warm-up (first calls into torch are slow); times are wall clock. Files and
shards run --repeat times each, alternating which goes first, and the best time of each counts
(the machine is shared); the one-at-a-time baseline runs once.
Torch threads: --threads (default 1) on both sides, so the ratio measures batching and parallel
decoding rather than how many threads each side's matrix products get; ours' decoding workers
are extra processes, as they are in `cmhash extract`.
Features are checked to agree (np.allclose with the baseline; identical between files and
shards) before any number is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmhash.data.manifest import Item
from cmhash.data.tar_shards import member_ref
from cmhash.features.clip import load_seeded_clip
from cmhash.features.encoding import Encoder
from cmhash.features.extraction import extract_pairs
from cmhash.features.shards import ShardStore

WORDS = "a the red blue small large dog cat beach tree car street sky water person bird house field".split()


def make_pairs(folder: Path, n: int, size: int, seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        grain = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        items.append(Item(str(i), str(path), caption, ()))
    return items


def write_shards(folder: Path, items: list[Item], per_shard: int) -> list[Item]:
    """The same pairs as img2dataset's tar shards; the items pointing into them."""
    import json

    import webdataset as wds

    folder.mkdir()
    out = []
    for start in range(0, len(items), per_shard):
        shard = str(folder / f"{start // per_shard:05d}.tar")
        with wds.TarWriter(shard) as sink:
            for item in items[start : start + per_shard]:
                key = f"{int(item.id):09d}"
                sink.write({"__key__": key, "jpg": Path(item.image).read_bytes(), "txt": item.caption,
                            "json": json.dumps({"key": key, "status": "success", "caption": item.caption})})
                out.append(Item(item.id, member_ref(shard, f"{key}.jpg"), item.caption, ()))
    return out


@torch.no_grad()
def one_at_a_time(clip, items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
    image, text = [], []
    for item in items:
        with Image.open(item.image) as im:
            pixels = clip.preprocess(im.convert("RGB")).unsqueeze(0)
        image.append(clip.model.encode_image(pixels).float().numpy())
        text.append(clip.model.encode_text(clip.tokenizer([item.caption])).float().numpy())
    return np.concatenate(image), np.concatenate(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="pairs (default 2000)")
    parser.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--shard-pairs", type=int, default=250, help="pairs per tar shard (default 250; img2dataset's is 10000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of files and of shards, alternating (default 3; best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1; see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clip = load_seeded_clip("cmhash-demo", "none", args.seed, device)
    print(f"cmhash-demo (random init), CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), "
          f"torch threads {torch.get_num_threads()}; {args.n} JPEGs {args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        items = make_pairs(Path(tmp), args.n, args.size, args.seed)
        tar_items = write_shards(Path(tmp) / "tars", items, args.shard_pairs)
        print(f"wrote {len(items)} JPEGs, as files and in {-(-args.n // args.shard_pairs)} tar shards, in {time.perf_counter() - t0:.1f}s")
        one_at_a_time(clip, items[:8])  # warm-up, both sides
        encoder = Encoder(clip, device, args.batch_size, args.workers)
        extract_pairs(encoder, items[:8], args.shard_size, ShardStore(Path(tmp) / "warm"), "warm-up")
        ours = from_tars = None

        # files and shards alternate, each going first in turn; the best time of each counts
        times: dict[str, list[float]] = {"files": [], "tars": []}
        for rep in range(args.repeat):
            for source in ("files", "tars") if rep % 2 == 0 else ("tars", "files"):
                t0 = time.perf_counter()
                encoded = extract_pairs(encoder, items if source == "files" else tar_items, args.shard_size,
                                        ShardStore(Path(tmp) / f"work-{source}-{rep}"), "bench")
                times[source].append(time.perf_counter() - t0)
                ours, from_tars = (encoded, from_tars) if source == "files" else (ours, encoded)
        t_ours, t_tars = min(times["files"]), min(times["tars"])
        t0 = time.perf_counter()
        base_image, base_text = one_at_a_time(clip, items)
        t_base = time.perf_counter() - t0

    diff = max(float(np.abs(ours.image - base_image).max()), float(np.abs(ours.text - base_text).max()))
    scale = max(float(np.abs(base_image).max()), float(np.abs(base_text).max()))
    same = ours.ok.all() and np.allclose(ours.image, base_image, rtol=1e-4, atol=1e-4 * scale) \
        and np.allclose(ours.text, base_text, rtol=1e-4, atol=1e-4 * scale)
    same_tars = from_tars.ok.all() and np.array_equal(from_tars.image, ours.image) and np.array_equal(from_tars.text, ours.text)
    print(f"features agree: {same} (max |difference| {diff:.2e}, max |feature| {scale:.2e}); tar shards = files: {same_tars}")
    if not (same and same_tars):
        return 1
    print(f"{'':<48}{'time':>8}{'pairs/s':>10}")
    ours_name = f"ours, files (workers {args.workers}, batch {args.batch_size})"
    print(f"{ours_name:<48}{t_ours:>7.1f}s{args.n / t_ours:>10.1f}   (runs: {', '.join(f'{t:.1f}s' for t in times['files'])})")
    tars_name = f"ours, tar shards ({args.shard_pairs} pairs per shard)"
    print(f"{tars_name:<48}{t_tars:>7.1f}s{args.n / t_tars:>10.1f}   (runs: {', '.join(f'{t:.1f}s' for t in times['tars'])})")
    print(f"{'one pair at a time':<48}{t_base:>7.1f}s{args.n / t_base:>10.1f}")
    print(f"speed-up: {t_base / t_ours:.1f}x; tar shards / files: {t_ours / t_tars:.2f}x the pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
