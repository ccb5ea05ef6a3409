"""Captions as text: the one cleaning rule every caption goes through, from a dataset or a query."""

from __future__ import annotations

import unicodedata


def clean_caption(text: str) -> str:
    """Control and format characters (NUL, zero-width space, ...) dropped and runs of whitespace
    collapsed to one space (COCO captions carry newlines, tag lists carry tabs). A caption that
    is empty after this is an empty caption."""
    kept = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(kept.split())
