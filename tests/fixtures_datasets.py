"""Miniature copies of the real download layouts (same folder structure, same file formats),
each holding a handful of tiny JPEGs and exactly one instance of each kind of bad item."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

from PIL import Image

MIRFLICKR_CONCEPTS = [
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
    "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
    "tree", "water",
]  # fmt: skip


@cache
def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes())


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def make_mirflickr(root: Path) -> None:
    """Images 1..7 of mirflickr25k.zip plus mirflickr25k_annotations_v080.zip:
    1, 2, 6 usable; 3 empty tags; 4 no label (only in a *_r1 list); 5 image missing; 7 no tags file."""
    tags = {1: "sky\nblue\n", 2: "dog\r\nsky\r\n", 3: "", 4: "car\n", 5: "night\n", 6: "people\nportrait\n"}
    for n in (1, 2, 3, 4, 6, 7):
        write_jpeg(root / "mirflickr" / f"im{n}.jpg")
    for n, text in tags.items():
        write(root / "mirflickr" / "meta" / "tags" / f"tags{n}.txt", text)
    write(root / "mirflickr" / "meta" / "tags_raw" / "tags1.txt", "Sky\nBlue\n")  # raw tags: not read

    members = {"sky": [1, 2, 3], "clouds": [1], "animals": [2], "dog": [2], "night": [5],
               "people": [6, 7], "portrait": [6], "female": [6]}  # fmt: skip
    annotations = root / "mirflickr25k_annotations_v080"
    for concept in MIRFLICKR_CONCEPTS:
        write(annotations / f"{concept}.txt", "".join(f"{n}\n" for n in members.get(concept, [])))
    write(annotations / "dog_r1.txt", "4\n")  # a strict "relevant" list: must not become a label
    write(annotations / "people_r1.txt", "6\n")
    write(annotations / "README.txt", "MIRFLICKR-25000 annotations\nSee the paper for details.\n")


# NUS-WIDE: (image-list line, All_Tags.txt line, concepts). 12 concepts; label counts
# sky 6, clouds 5, person 4, water 4, animal 3, grass 3, buildings/plants/window 2,
# airport/beach/lake 1: the top 10 keep airport (ties broken by name) and drop beach, lake.
NUSWIDE_ROWS = [
    ("actor\\0001_1001.jpg", "1001      man portrait", {"person", "sky", "clouds"}),
    ("actor\\0002_1002.jpg", "1002", {"sky"}),  # empty caption
    ("beach\\0001_1003.jpg", "1003      sea sand", {"beach", "lake"}),  # no label among the top 10
    ("beach\\0002_1004.jpg", "1004      waves", {"sky", "water", "clouds"}),  # image missing
    ("dog\\0001_1005.jpg", "1005\tdog grass", {"animal", "grass", "sky", "clouds", "water"}),
    ("dog\\0002_1006.jpg", "1006      puppy", {"animal", "grass", "person", "plants", "window", "buildings", "sky"}),
    ("C:\\ImageData\\Flickr\\house\\0001_1007.jpg", "1007      house",
     {"buildings", "window", "plants", "person", "water", "sky", "clouds", "airport"}),
    ("house\\0002_1008.jpg", "9999      roof", {"animal", "grass", "person", "water", "clouds"}),  # tags of another image
]  # fmt: skip
NUSWIDE_CONCEPTS = sorted(
    ["airport", "animal", "beach", "buildings", "clouds", "grass", "lake", "person", "plants", "sky", "water", "window"]
)


def make_nuswide(root: Path) -> None:
    crlf = "\r\n"  # the lists were written on Windows
    write(root / "ImageList" / "Imagelist.txt", "".join(entry + crlf for entry, _, _ in NUSWIDE_ROWS))
    write(root / "NUS_WID_Tags" / "All_Tags.txt", "".join(tags + crlf for _, tags, _ in NUSWIDE_ROWS))
    for concept in NUSWIDE_CONCEPTS:
        column = "".join(("1" if concept in labels else "0") + crlf for _, _, labels in NUSWIDE_ROWS)
        write(root / "Groundtruth" / "AllLabels" / f"Labels_{concept}.txt", column)
    write(root / "ConceptsList" / "Concepts81.txt", "".join(c + crlf for c in NUSWIDE_CONCEPTS))
    for entry, _, _ in NUSWIDE_ROWS:
        folder, name = entry.split("\\")[-2:]
        if name != "0002_1004.jpg":
            write_jpeg(root / "Flickr" / folder / name)


COCO_CATEGORIES = [{"supercategory": "animal", "id": 18, "name": "dog"}, {"supercategory": "person", "id": 1,
                   "name": "person"}, {"supercategory": "vehicle", "id": 3, "name": "car"},
                   {"supercategory": "vehicle", "id": 2, "name": "bicycle"}]  # fmt: skip
# image id -> (part, category ids of its instances, captions as (annotation id, text))
COCO_IMAGES = {
    9: ("train2014", [18, 1, 1], [(50, "A man walking a dog.\n"), (12, "  A person   with a dog ")]),
    25: ("train2014", [], [(3, "An empty street.")]),  # no label
    30: ("train2014", [3], [(4, "   ")]),  # empty caption
    42: ("val2014", [2], [(5, "a bike")]),  # image missing
    73: ("val2014", [1, 3], [(8, "second"), (7, "first"), (9, "third")]),
    74: ("val2014", [18], [(10, "a dog")]),
}


def coco_file_name(part: str, image_id: int) -> str:
    return f"COCO_{part}_{image_id:012d}.jpg"


def make_coco(root: Path) -> None:
    for part in ("train2014", "val2014"):
        ids = [i for i, (p, _, _) in COCO_IMAGES.items() if p == part]
        images = [{"license": 1, "file_name": coco_file_name(part, i), "height": 4, "width": 4, "id": i} for i in ids]
        instances = [{"segmentation": [[0, 0, 1, 1, 2, 0]], "area": 1.0, "iscrowd": 0, "image_id": i, "bbox": [0, 0, 2, 1],
                      "category_id": c, "id": 1000 * i + k} for i in ids for k, c in enumerate(COCO_IMAGES[i][1])]  # fmt: skip
        captions = [{"image_id": i, "id": a, "caption": text} for i in ids for a, text in COCO_IMAGES[i][2]]
        info = {"description": "miniature COCO 2014", "year": 2014}
        write(root / "annotations" / f"instances_{part}.json", json.dumps(
            {"info": info, "images": images, "licenses": [], "annotations": instances, "categories": COCO_CATEGORIES}))
        write(root / "annotations" / f"captions_{part}.json",
              json.dumps({"info": info, "images": images, "licenses": [], "annotations": captions}))
        for i in ids:
            if i != 42:
                write_jpeg(root / part / coco_file_name(part, i))


# img2dataset's output: NNNNN.tar shards of <key>.jpg/.txt/.json, with NNNNN.parquet and
# NNNNN_stats.json beside each. Keys are shard number * 10000 + row, 9 digits, as img2dataset names them.
WEBDATASET_TAGS = ["bird", "car", "dog", "sky"]
WEBDATASET_BAD = {  # shard 1 holds one of each bad member; shard 2 is truncated inside its last image
    "000010020": "corrupt image",
    "000010021": "empty caption",
    "000010022": "no caption member",
    "000010023": "unknown member extension",  # the .xyz member is left out, the pair stays
}


def webdataset_key(shard: int, row: int) -> str:
    return f"{shard * 10000 + row:09d}"


def _coloured_jpeg(row: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), ((row * 53) % 256, (row * 97) % 256, (row * 31) % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _webdataset_sample(shard: int, row: int) -> dict:
    key = webdataset_key(shard, row)
    tags = [WEBDATASET_TAGS[row % 4], WEBDATASET_TAGS[(row // 4) % 4]]
    meta = {"key": key, "status": "success", "url": f"https://example.org/{key}.jpg", "caption": f"a {tags[0]} and a {tags[1]}",
            "width": 8, "height": 8, "original_width": 64, "original_height": 64, "error_message": None, "tags": tags}
    return {"__key__": key, "jpg": _coloured_jpeg(row), "txt": meta["caption"], "json": json.dumps(meta)}


def write_webdataset_shard(root: Path, shard: int, samples: list[dict]) -> Path:
    """One shard and the two files img2dataset writes beside it, with webdataset's TarWriter."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{shard:05d}.tar"
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    keys = [s["__key__"] for s in samples]
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), root / f"{shard:05d}.parquet")
    stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0, "failed_to_resize": 0}
    write(root / f"{shard:05d}_stats.json", json.dumps(stats, indent=4))
    return path


def make_webdataset(root: Path, shards: int = 3, rows: int = 20) -> None:
    """`shards` shards of `rows` good pairs each, labelled by the `tags` field of <key>.json; shard 1
    adds the bad members of WEBDATASET_BAD, and shard 2 (when there) is cut off inside its last image."""
    for shard in range(shards):
        samples = [_webdataset_sample(shard, row) for row in range(rows)]
        if shard == 1:
            corrupt, empty, no_caption, extra = (_webdataset_sample(1, row) for row in range(rows, rows + 4))
            corrupt["jpg"] = b"\xff\xd8 not a JPEG"
            empty["txt"] = "   "
            del no_caption["txt"]
            extra["xyz"] = b"what is this"
            samples += [corrupt, empty, no_caption, extra]
        path = write_webdataset_shard(root, shard, samples)
        if shard == 2:
            data = path.read_bytes()
            last_image = data.rfind(_coloured_jpeg(rows - 1))
            path.write_bytes(data[: last_image + 100])  # the last key's image is cut short: a truncated tar
