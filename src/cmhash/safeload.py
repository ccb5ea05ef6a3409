"""Files that could carry code - pickles, torch checkpoints, CLIP weights - are read so that
nothing in them ever runs, and a refusal reads the same for every loader: the file, what it holds
that was refused, that it was not executed. It never suggests turning the check off."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from cmhash.errors import DataError

# torch's weights-only unpickler names a refused global as "GLOBAL module.name"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused(path: Path | str, what: str) -> DataError:
    return DataError(f"refused to load {path}: it holds {what}, which was not executed; "
                     "only tensors, arrays and plain containers are accepted")


def unpickling_error(path: Path | str, exc: pickle.UnpicklingError) -> DataError:
    """One line for torch's weights-only refusal: the refused global when it names one, else why
    the file is not a checkpoint at all."""
    text = str(exc)
    if found := _GLOBAL.search(text):
        return refused(path, f"a reference to {found.group(1)}")
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    reason = detail[0] if detail and "weights_only" not in detail[0] else "not a checkpoint"
    return DataError(f"cannot load {path}: not a torch checkpoint ({reason})")


def torch_load(path: Path | str, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True (tensors and plain containers only), one-line errors."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise unpickling_error(path, exc) from None
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise DataError(f"cannot load {path}: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None


def save_state(path: Path, obj: Any) -> None:
    """torch.save through an open file: the archive's inner folder is then always named
    "archive", so the same state gives the same bytes. (Saved by path name, it is named after the
    file, and atomic writes go through a randomly named temporary file.)"""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
