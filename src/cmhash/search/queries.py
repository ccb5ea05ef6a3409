"""Checks on one query, shared by `cmhash search` and `cmhash serve`: a caption, an image (from a
file or uploaded bytes) and k. Each failure is a QueryError: one line for the CLI, a 4xx JSON
answer (its `status`) for the server."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cmhash.data.captions import clean_caption
from cmhash.errors import CmhashError

MAX_TEXT_CHARS = 1000  # CLIP reads 77 tokens; anything much longer is a mistake or abuse


class QueryError(CmhashError):
    """A query that cannot be answered (mostly a bad one); `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_text(text: str, name: str = "text", max_chars: int = MAX_TEXT_CHARS) -> str:
    """The caption as given, if it has something to encode and is not over `max_chars`."""
    if not clean_caption(text):  # the rule every caption goes through
        raise QueryError(f"{name} is empty (nothing but whitespace or control characters)")
    if len(text) > max_chars:
        raise QueryError(f"{name} is {len(text):,} characters long; the limit is {max_chars:,}")
    return text


def check_top(k: int, name: str = "k", max_k: int | None = None) -> int:
    if k < 1:
        raise QueryError(f"{name} must be at least 1 (got {k})")
    if max_k is not None and k > max_k:
        raise QueryError(f"{name} must be at most {max_k} (got {k})")
    return k


def read_image(source: Path | bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode a query image to RGB. The size in the header is checked against `max_pixels`
    (default: Pillow's Image.MAX_IMAGE_PIXELS) before any pixel is decoded, so a small file that
    would expand to gigabytes (a decompression bomb) is refused without being decoded."""
    if isinstance(source, Path) and not source.is_file():
        raise QueryError(f"image not found: {name}", 404)
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, with its size
            im = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        with im:
            width, height = im.size
            if width * height > limit:
                raise QueryError(f"image {name} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}", 413)
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:  # past twice Pillow's limit: Image.open refuses it itself
        raise QueryError(f"image {name} is too large to decode ({exc})", 413) from None
    except UnidentifiedImageError:
        raise QueryError(f"cannot read image {name}: UnidentifiedImageError: not an image file Pillow can read", 415) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data after a valid header
        raise QueryError(f"cannot read image {name}: {type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}", 415) from None
