"""`cmhash index` and `cmhash search`: tools on top of the pipeline's outputs (not dvc.yaml stages).

index   reads   params.yaml `search` (the index kind) and a split (stages/extract/<split>.pkl + stages/prepare/<split>.jsonl), an image folder
                or a captions file; stages/hash/<bits>/model.pt
        writes  stages/index/ (see cmhash.search.index), the codes there or in Milvus (--backend milvus)
search  reads   stages/index/, the hash model it names; prints the nearest codes of the other modality
                to a caption, an image, or an indexed item's own code (--image-of / --text-of ID)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cmhash.config.options import ParamsOption
from cmhash.config.schema import load_params
from cmhash.data.manifest import SPLITS
from cmhash.errors import ConfigError

DEFAULT_BITS = 64
BACKENDS = ("faiss", "milvus")
# The engine (torch, open_clip, faiss) is imported inside the commands: `--help` and a mistake in
# the options answer without loading it.


def index(
    params: ParamsOption = Path("params.yaml"),
    split: Annotated[str | None, typer.Option(help=f"a pipeline split ({', '.join(SPLITS)}): image and text codes.")] = None,
    images: Annotated[Path | None, typer.Option(help="a folder of images (recursive): image codes.")] = None,
    captions: Annotated[Path | None, typer.Option(help='a captions file, one per line or JSONL {"caption", "id", "labels"}: text codes.')] = None,
    bits: Annotated[int | None, typer.Option(help=f"code length; default {DEFAULT_BITS} if in params `bits`, else its first.")] = None,
    hash_dir: Annotated[Path, typer.Option(help="hash models, <hash-dir>/<bits>/model.pt.")] = Path("stages/hash"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract` (--split).")] = Path("stages/extract"),
    prepare_dir: Annotated[Path, typer.Option(help="manifests from `cmhash prepare` (--split).")] = Path("stages/prepare"),
    out_dir: Annotated[Path, typer.Option(help="the index folder (replaced whole).")] = Path("stages/index"),
    backend: Annotated[str, typer.Option(help="where the codes go: faiss (files in --out-dir) or milvus (needs the milvus extra).")] = "faiss",
    milvus_uri: Annotated[str | None, typer.Option(help="--backend milvus: a Milvus server (http://host:19530); "
                                                         "default: Milvus Lite, a file in --out-dir.")] = None,
) -> None:
    """Encode a collection into packed binary codes (FAISS binary indexes, or Milvus) for `cmhash search` and `cmhash serve`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if milvus_uri and backend != "milvus":
        raise ConfigError("--milvus-uri goes with --backend milvus")
    given = {name: value for name, value in {"split": split, "images": images, "captions": captions}.items() if value is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --split NAME, --images DIR, --captions FILE")
    (source, value), = given.items()
    p = load_params(params)
    from cmhash.search.engine import build_index
    from cmhash.search.index import FaissFiles, code_store, index_kind

    if backend != "faiss" and p.search.index != "flat":
        raise ConfigError(f"search.index {p.search.index} is for --backend faiss; Milvus indexes its codes itself (docs/search.md)")
    kind = index_kind({"kind": p.search.index, "knobs": p.search.knobs.model_dump(), "rerank": p.search.rerank, "seed": p.seed})
    # a missing extra or a bad URI fails here, before any encoding
    store = FaissFiles(kind) if backend == "faiss" else code_store({"name": backend, "uri": milvus_uri})
    bits = bits or (DEFAULT_BITS if DEFAULT_BITS in p.bits else p.bits[0])
    build_index(source, value, device_name=p.device, seed=p.seed, clip=p.clip, bits=bits, hash_dir=hash_dir,
                features_dir=features_dir, prepare_dir=prepare_dir, out_dir=out_dir, store=store)


def search(
    text: Annotated[str | None, typer.Option(help="a caption to find images for.")] = None,
    image: Annotated[Path | None, typer.Option(help="an image file to find captions for.")] = None,
    image_of: Annotated[str | None, typer.Option(help="the id of an indexed item: captions nearest to its image's code (nothing encoded).")] = None,
    text_of: Annotated[str | None, typer.Option(help="the id of an indexed item: images nearest to its caption's code (nothing encoded).")] = None,
    top: Annotated[int, typer.Option("-k", "--top", help="how many results.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON.")] = False,
    index_dir: Annotated[Path, typer.Option(help="the folder `cmhash index` wrote.")] = Path("stages/index"),
    model: Annotated[Path | None, typer.Option(help="hash model; default: the one the index was built with.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
) -> None:
    """Find the nearest images to a caption (--text) or captions to an image (--image) by Hamming distance;
    or those nearest to an indexed item's own image or caption code (--image-of ID, --text-of ID).
    Ties are broken by database row (lower first). Loads the models for one query: `cmhash serve` keeps them loaded."""
    given = {"text": text, "image": image, "image_of": image_of, "text_of": text_of}
    queries = {name: value for name, value in given.items() if value is not None}
    if len(queries) != 1:
        raise ConfigError("give exactly one of --text \"a caption\", --image PATH, --image-of ID or --text-of ID")
    (kind, query), = queries.items()
    modality, item = kind.removesuffix("_of"), kind.endswith("_of")
    from cmhash.search.queries import check_text, check_top, read_image

    # Every check on the query comes before the models load (seconds).
    check_top(top, "-k/--top")
    if kind == "text":
        check_text(query, "--text")
    elif kind == "image":
        picture = read_image(query, str(query))
    from cmhash.search.engine import Searcher
    from cmhash.search.results import search_table

    searcher = Searcher.load(index_dir, model, device, modality, item=item)
    if item:
        found = searcher.search_item(query, modality, top)
    elif modality == "text":
        found = searcher.search_text(query, top)
    else:
        found = searcher.search_image(picture, str(query), top)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        Console().print(search_table(found))
