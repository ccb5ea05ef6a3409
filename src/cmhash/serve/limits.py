"""What one query to the server may be. Each is a `cmhash serve` option; the defaults suit a
machine serving a few users."""

from __future__ import annotations

from dataclasses import dataclass

from cmhash.errors import ConfigError
from cmhash.search.queries import MAX_TEXT_CHARS

MB = 2**20


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * MB
    max_pixels: int | None = None  # None: Pillow's Image.MAX_IMAGE_PIXELS (about 89 million)
    max_text_chars: int = MAX_TEXT_CHARS
    max_k: int = 100
    default_k: int = 10

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.default_k > self.max_k:
            raise ConfigError(f"the default k ({self.default_k}) is over max-k ({self.max_k})")

    @property
    def max_json_bytes(self) -> int:
        """A JSON query holds a caption and k: room for the longest caption, escaped."""
        return 64 * 1024 + 8 * self.max_text_chars
