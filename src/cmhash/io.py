"""Files in and out: atomic writes (nothing half-written), and loaders for files that could carry
code - pickles, torch checkpoints, CLIP weights - that never run anything in them. A refusal reads
the same for every loader: the file, what it holds that was refused, that it was not executed. It
never suggests turning the check off."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from cmhash.errors import DataError, DiskError


def _read_umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask


# mkstemp and mkdtemp make private files (0600) and folders (0700); what we write is an output
# like any other, so it gets the permissions the umask gives a plainly created file or folder.
UMASK = _read_umask()


# While a stage's outputs are written (all_or_nothing), each finished file or folder waits here as
# (land, discard) until the last one is written, so a failure part-way keeps every previous output.
_pending: ContextVar[list[tuple[Callable[[], None], Callable[[], None]]] | None] = ContextVar("pending", default=None)


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Inside the block, atomic_path and atomic_dir land only when the whole block succeeds."""
    pending: list[tuple[Callable[[], None], Callable[[], None]]] = []
    token = _pending.set(pending)
    try:
        yield
        while pending:
            _finish(*pending.pop(0))
    finally:
        _pending.reset(token)
        for _, discard in pending:
            discard()


def _finish(land: Callable[[], None], discard: Callable[[], None]) -> None:
    try:
        land()
    finally:
        discard()  # a no-op once landed; else the temporary file or folder goes


def _land(land: Callable[[], None], discard: Callable[[], None]) -> None:
    pending = _pending.get()
    if pending is None:
        _finish(land, discard)
    else:
        pending.append((land, discard))


def _tmp_prefix(path: Path) -> str:
    # the writer's pid in the name tells a leftover of a killed process from a live write
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files and folders that earlier writes of `path` left beside it when
    their process was killed (SIGKILL runs no cleanup): `.<name>.<pid>.<random>.tmp` (and `.old`,
    a previous folder set aside mid-swap) whose pid is no longer running on this machine, and the
    pid-less `.<name>.<random>.tmp` of older versions. A write still running keeps its own; no
    other file is touched. Returns what it removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.[^.]+\.(?:tmp|old)|[^.]+\.tmp)")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or (match[1] is not None and _alive(int(match[1]))):
            continue
        leftover = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.
    Whatever fails - the block, or the disk under it - the temporary file goes and `path` stays;
    what a killed earlier write left goes first (remove_stale_leftovers)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)
        os.close(fd)
        yield Path(tmp)
    except OSError as exc:  # the block only writes tmp: any OS error is a failed write of `path`
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise DiskError(path, exc) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _land(lambda: _replace(tmp, path), lambda: Path(tmp).unlink(missing_ok=True))


def _replace(tmp: str | Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise DiskError(path, exc) from None


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty folder next to `path`; it replaces `path` (and all it held) only if the block
    succeeds, so a failed run leaves the previous folder untouched; what a killed earlier write
    left goes first (remove_stale_leftovers). Errors of the block pass as they are (it may read
    and write elsewhere); the folder's own steps fail as DiskError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp"))
    except OSError as exc:
        raise DiskError(path, exc) from None
    try:
        tmp.chmod(0o777 & ~UMASK)
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (inner := _file_in(tmp, exc)) is not None:  # name the output, not the temporary folder
            raise DiskError(path / inner, exc.reason if isinstance(exc, DiskError) else exc) from None
        raise
    _land(lambda: _swap(tmp, path), lambda: shutil.rmtree(tmp, ignore_errors=True))


def _file_in(folder: Path, exc: BaseException) -> Path | None:
    """The file under `folder` that a failed write names, if it names one there."""
    named = exc.path if isinstance(exc, DiskError) else exc.filename if isinstance(exc, OSError) else None
    if named is None or not Path(named).is_relative_to(folder):
        return None
    return Path(named).relative_to(folder)


def _swap(tmp: Path, path: Path) -> None:
    old = tmp.with_suffix(".old")
    try:
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)  # put the previous folder back
            raise
    except OSError as exc:
        raise DiskError(path, exc) from None
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """Digest of a file's bytes: which file this is (a checkpoint, a source of precomputed features)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npz(path: Path | str, **arrays: Any) -> None:
    """numpy arrays as one compressed .npz, written atomically (np.load reads it without pickles)."""
    import numpy as np

    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)


def save_pickle(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


# Only what numpy needs to rebuild arrays; dicts, lists, str, numbers need no globals at all.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 rebuilds arrays from raw bytes
    ("numpy._core.numeric", "_frombuffer"),
}
_SAFE_DTYPE_MODULES = {"numpy.dtypes"}  # numpy>=1.25 pickles dtypes as numpy.dtypes.Float32DType etc.


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """What `_codecs.encode` does in a pickle of protocol < 3 (it stores bytes as latin-1 text, so
    arrays from protocol-2-era code need it); anything else it could be asked to do is refused."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str (an array's raw bytes) stays byte for byte

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _SAFE_GLOBALS or (module in _SAFE_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def load_pickle(path: Path | str) -> Any:
    """Load a pickle that may contain only numpy arrays and plain containers; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(io.BufferedReader(f)).load()
    except _Refused as exc:
        raise refused(path, f"a reference to {exc.name}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot load {path}: not a readable pickle ({exc})") from None

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
