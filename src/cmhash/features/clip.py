"""open_clip models: a name + weights (`pretrained`: an open_clip tag, a local checkpoint, or `none`)."""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from cmhash.errors import ConfigError
from cmhash.io import file_sha256, unpickling_error
from cmhash.runtime.seeding import seed_everything

log = logging.getLogger("cmhash")

# Small model configs of our own (random-init demo and tests), added to open_clip's registry.
CONFIG_DIR = Path(__file__).parent / "clip_configs"
RANDOM_INIT = "none"


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> tensor, open_clip's own eval transform
    tokenizer: Callable  # list[str] -> LongTensor
    dim: int  # feature size of encode_image and encode_text
    meta: dict[str, Any]  # what the features were made with; stored in every feature file


def weights_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer (names, dtypes, shapes, values): which weights these are."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Hold(logging.Handler):
    """Stands in for one logger's handlers: keeps each record with the handlers it was meant for."""

    def __init__(self, held: list, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.held, self.handlers = held, handlers

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append((self.handlers, record))


@contextmanager
def _held_logs() -> Iterator[None]:
    """Hold back what is logged while the weights load, and pass it on only if loading succeeds.
    A failed download makes huggingface_hub log every retry (on its own handler and the root's)
    and open_clip log the failure; our one-line error replaces all of that."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger) and logger.handlers
    ]
    saved = {logger: logger.handlers[:] for logger in loggers}
    held: list[tuple[list[logging.Handler], logging.LogRecord]] = []
    for logger in loggers:
        logger.handlers = [_Hold(held, saved[logger])]
    try:
        yield
    finally:
        for logger, handlers in saved.items():
            logger.handlers = handlers
    for handlers, record in held:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def clip_weights(model_name: str, pretrained: str,
                 keys: tuple[str, str] = ("clip.model", "clip.pretrained")) -> tuple[str | None, dict[str, Any], int]:
    """Check a CLIP model name and its weights without loading them: the weights to load (None:
    random init), what features made with them record, and the feature width. `keys`: the params
    keys of the two, named in messages."""
    open_clip.add_model_config(CONFIG_DIR)
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown CLIP model '{model_name}' ({keys[0]}); see open_clip.list_models() (e.g. ViT-B-32, cmhash-demo)")
    meta: dict[str, Any] = {"clip_model": model_name, "pretrained": pretrained, "random_init": pretrained == RANDOM_INIT}
    if pretrained == RANDOM_INIT:
        weights = None
    elif Path(pretrained).is_file():
        weights = pretrained
        meta["checkpoint_sha256"] = file_sha256(Path(pretrained))
    elif pretrained in open_clip.list_pretrained_tags_by_model(model_name):
        weights = pretrained
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none known"
        raise ConfigError(f"{keys[1]} '{pretrained}' is neither a file nor a tag of {model_name} ({tags}); or use none")
    return weights, meta, int(open_clip.get_model_config(model_name)["embed_dim"])


def load_clip(model_name: str, pretrained: str, device: torch.device) -> Clip:
    weights, meta, dim = clip_weights(model_name, pretrained)
    if weights is None:
        log.warning("CLIP '%s' has RANDOM weights (clip.pretrained: none): features and MAP say nothing about real CLIP", model_name)
    try:
        with _held_logs():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) refuses a file that would run code when unpickled, or is not a checkpoint.
        raise unpickling_error(weights, exc) from None
    except (OSError, RuntimeError, ValueError) as exc:
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(
                f"cannot fetch CLIP weights '{weights}' for {model_name} (offline?): download them once and pass "
                "the local file as clip.pretrained, or use none"
            ) from None
        raise ConfigError(f"cannot load CLIP weights {weights}: {str(exc).splitlines()[0]}") from None
    except (KeyError, IndexError, AttributeError, TypeError) as exc:  # open_clip indexes into whatever a foreign file holds
        raise ConfigError(f"cannot load CLIP weights {weights}: not an open_clip checkpoint of {model_name} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    model.eval()
    meta["preprocess"] = repr(preprocess)
    return Clip(model, preprocess, open_clip.get_tokenizer(model_name), dim, meta)


def caption_is_cut(clip: Clip, caption: str) -> bool:
    """Whether CLIP's tokenizer cuts `caption` to its context length (77 tokens for most models),
    so the end of it is not encoded. False when the tokenizer cannot say (not open_clip's own)."""
    encode, context = getattr(clip.tokenizer, "encode", None), getattr(clip.tokenizer, "context_length", None)
    return bool(encode and context) and len(encode(caption)) + 2 > context  # + start and end tokens


def load_seeded_clip(model_name: str, pretrained: str, seed: int, device: torch.device) -> Clip:
    """The CLIP encoder as extract builds it. Random-init weights (pretrained: none) are drawn right
    after seeding, so `cmhash index` and `cmhash search` get the same encoder from the same seed."""
    seed_everything(seed)
    clip = load_clip(model_name, pretrained, device)
    if clip.meta["random_init"]:
        clip.meta["seed"] = seed
    return clip


def weights_note(meta: dict[str, Any]) -> str:
    """Where extracted features' CLIP weights came from, as metrics/extract.json and logs say it."""
    if meta["random_init"]:
        return f"RANDOM init (seed {meta['seed']}), not trained CLIP: features and MAP say nothing about real CLIP"
    if "checkpoint_sha256" in meta:
        return f"checkpoint file {meta['pretrained']} (sha256 {meta['checkpoint_sha256']})"
    return f"open_clip pretrained tag '{meta['pretrained']}'"
