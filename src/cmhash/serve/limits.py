"""What one query to the server may be, and how queries are batched. Each is a `cmhash serve`
option; the defaults suit a machine serving a few users."""

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


@dataclass(frozen=True)
class Batching:
    """`--batch SIZE --batch-wait-ms MS`: at most SIZE queries encoded and searched as one batch, a
    query waiting at most MS for others (cmhash.serve.batching); SIZE 1 turns batching off."""

    size: int = 32
    wait_ms: float = 2.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--batch must be at least 1 (1: no batching; got {self.size})")
        if not 0 <= self.wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms must be from 0 to 1000 (got {self.wait_ms})")
