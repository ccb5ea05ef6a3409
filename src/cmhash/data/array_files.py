"""Feature files as papers distribute them, read without running anything they hold: one reader per
format, each returning the named arrays in a file.

    pickle  a dict of arrays (the UCMFH reference's train.pkl ...), through the restricted unpickler
    npz     numpy's zip of arrays, np.load(allow_pickle=False)
    mat     MATLAB v4/v5/v7 (scipy.io.loadmat) or v7.3 (HDF5, h5py): top-level numeric arrays

MATLAB stores arrays column-major, so h5py sees a v7.3 file's [N, D] matrix as [D, N]: the reader
transposes each back to what MATLAB means, and says so (`matlab_order`) so that a file written by
h5py directly (already [N, D]) can be taken the other way round.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmhash.errors import DataError
from cmhash.io import load_pickle

FORMATS = {"pickle": (".pkl", ".pickle"), "npz": (".npz",), "mat": (".mat",)}  # format -> file extensions


@dataclass
class ArrayFile:
    path: Path
    arrays: dict[str, Any]  # name -> array (or whatever a pickle holds there: checked where it is used)
    matlab_order: bool = False  # arrays transposed from HDF5's storage order (MATLAB v7.3)


def format_of(path: Path) -> str | None:
    """The format a file's extension names, if any."""
    return next((name for name, suffixes in FORMATS.items() if path.suffix.lower() in suffixes), None)


def read_array_file(path: Path, fmt: str) -> ArrayFile:
    return READERS[fmt](path)


def _not_a(path: Path, what: str, why: str) -> DataError:
    return DataError(f"{path} is not {what} ({why})")


def _read_pickle(path: Path) -> ArrayFile:
    data = load_pickle(path)  # refuses anything but arrays and plain containers, runs nothing
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not a dict of arrays (image, text, label)")
    return ArrayFile(path, {str(k): v for k, v in data.items()})


def _read_npz(path: Path) -> ArrayFile:
    if not zipfile.is_zipfile(path):
        raise _not_a(path, "an .npz file", "not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            return ArrayFile(path, {name: z[name] for name in z.files})
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:  # an object array, a damaged member
        raise _not_a(path, "a readable .npz file", str(exc).splitlines()[0]) from None


def _read_mat(path: Path) -> ArrayFile:
    import h5py

    if h5py.is_hdf5(path):
        return _read_hdf5_mat(path)
    import scipy.io

    try:
        arrays = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as exc:
        raise _not_a(path, "a MATLAB .mat file", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return ArrayFile(path, {name: a for name, a in arrays.items() if not name.startswith("__")})  # __header__ etc.


def _read_hdf5_mat(path: Path) -> ArrayFile:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            # Top-level datasets only: groups are MATLAB structs, #refs# holds cell contents.
            arrays = {name: np.asarray(item[()]).T for name, item in f.items() if isinstance(item, h5py.Dataset)}
    except (OSError, ValueError, TypeError) as exc:
        raise _not_a(path, "a readable MATLAB v7.3 (HDF5) file", str(exc).splitlines()[0]) from None
    return ArrayFile(path, arrays, matlab_order=True)


READERS: dict[str, Callable[[Path], ArrayFile]] = {"pickle": _read_pickle, "npz": _read_npz, "mat": _read_mat}
