"""Read MATLAB files as the benchmarks ship them, by variable and field *name*.

``scipy.io.loadmat`` does the decoding; these helpers normalise what it returns (a struct array
may come back 0-d, 1-D or 2-D, a string as ``str`` or a char array, an empty value as any empty
shape) and turn every surprise into a :class:`DatasetError` that names the file, the variable or
field, and the MATLAB-style (1-based) position, so a user can open the file and look.

Files are loaded with ``squeeze_me=True``: strings come back as ``str`` and numbers as floats,
which is both simpler and several times lighter than the raw form for the large ``TestG`` files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from dkd_ray.errors import InputError


class DatasetError(InputError):
    """A dataset folder the readers cannot turn into annotations; names the file and the key."""

    def __init__(self, file: str | Path, message: str | None = None):
        # One argument too: torch's DataLoader re-raises a worker's exception as ``cls(text)``.
        if message is None:
            super().__init__(str(file))
            self.file, self.message = "", str(file)
            return
        super().__init__(f"{file}: {message}")
        self.file = str(file)
        self.message = message

    def __reduce__(self):  # pickles (Ray) with both arguments, not just the joined text
        return type(self), ((self.file, self.message) if self.file else (self.message,))


def load_mat(path: Path, variables: Iterable[str] | None = None) -> dict[str, Any]:
    """``loadmat`` with a clear error for a missing, truncated or corrupt file.

    Returns only the user variables (no ``__header__`` etc.).
    """
    import scipy.io  # here, not at the top: a cached load never needs it

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mat = scipy.io.loadmat(
                str(path),
                squeeze_me=True,
                struct_as_record=True,
                variable_names=None if variables is None else list(variables),
            )
    except Exception as exc:  # scipy raises OSError, ValueError, IndexError, zlib.error, ...
        raise DatasetError(
            path, f"not a readable MATLAB file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    # scipy only warns (and stores a string) when one variable cannot be decoded
    unreadable = [str(w.message) for w in caught if "Unreadable variable" in str(w.message)]
    if unreadable:
        raise DatasetError(path, f"not a readable MATLAB file: {unreadable[0]}")
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def iter_struct_array(path: Path, variable: str) -> tuple[int, Iterator[dict[str, Any]]]:
    """The elements of struct-array ``variable`` one at a time (MATLAB order), as field dicts
    with the same values ``load_mat`` would give; returns ``(number of elements, iterator)``.

    A ``TestG4000.mat`` holds 11.6M gallery structs: ``loadmat`` keeps all of them alive at once
    (~4 GB of Python objects), this keeps one query's worth. It drives scipy's own MAT5 element
    reader (private API, checked against scipy 1.17) and falls back to ``load_mat`` when that is
    not available or the file is not a plain MAT5 file.
    """
    path = Path(path)
    try:
        return _stream_struct_array(path, variable)
    except _NoStreaming:
        mat = load_mat(path, [variable])
        records = struct_records(get_variable(mat, variable, path), path, variable)
        names = records.dtype.names or ()
        return len(records), ({name: r[name] for name in names} for r in records)


class _NoStreaming(Exception):
    pass


def _stream_struct_array(path: Path, variable: str) -> tuple[int, Iterator[dict[str, Any]]]:
    try:
        from scipy.io.matlab._mio5 import MatFile5Reader
        from scipy.io.matlab._mio5_params import miMATRIX, mxSTRUCT_CLASS
    except ImportError as exc:
        raise _NoStreaming from exc
    if not path.is_file():
        raise DatasetError(path, "file not found")
    stream = open(path, "rb")
    try:
        header = stream.read(128)
        if len(header) < 128 or header[126:128] not in (b"IM", b"MI") or \
                header[124:126] not in (b"\x00\x01", b"\x01\x00"):
            raise _NoStreaming
        reader = MatFile5Reader(stream, squeeze_me=True, struct_as_record=True)
        reader.initialize_read()
        stream.seek(128)
        found: list[str] = []
        while True:
            if reader.end_of_stream():
                raise DatasetError(path, f"missing variable {variable!r} (variables found: "
                                         f"{', '.join(sorted(found)) or 'none'})")
            var_header, next_position = reader.read_var_header()
            found.append(var_header.name.decode("latin1"))
            if found[-1] == variable:
                break
            stream.seek(next_position)
        if var_header.mclass != mxSTRUCT_CLASS:
            raise DatasetError(path, f"{variable} should be a struct array")
        element_reader = reader._matrix_reader
        field_names = list(element_reader.read_fieldnames())
        count = int(np.prod(var_header.dims))
    except (DatasetError, _NoStreaming):
        stream.close()
        raise
    except AttributeError as exc:  # scipy's internals moved
        stream.close()
        raise _NoStreaming from exc
    except Exception as exc:
        stream.close()
        raise DatasetError(path, f"not a readable MATLAB file (truncated or corrupt?): "
                                 f"{type(exc).__name__}: {exc}") from exc

    def read_value() -> Any:
        mdtype, byte_count = element_reader.read_full_tag()
        if mdtype != miMATRIX:
            raise ValueError(f"expected a matrix element, got type {mdtype}")
        if byte_count == 0:
            return np.array([])  # what squeeze_me gives for an empty value
        return element_reader.array_from_header(element_reader.read_header(False), 1)

    def elements() -> Iterator[dict[str, Any]]:
        with stream:
            for i in range(count):
                try:
                    element = {name: read_value() for name in field_names}
                except Exception as exc:
                    raise DatasetError(path, f"{variable}({i + 1}): not readable (truncated or "
                                             f"corrupt?): {type(exc).__name__}: {exc}") from exc
                yield element

    return count, elements()


def mat_variable_names(path: Path) -> list[str]:
    """The variable names stored in a .mat file, without loading the data."""
    import scipy.io

    try:
        return [name for name, _shape, _cls in scipy.io.whosmat(str(path))]
    except Exception as exc:
        raise DatasetError(path, f"not a readable MATLAB file: {exc}") from exc


def get_variable(mat: dict[str, Any], name: str, path: Path) -> Any:
    if name not in mat:
        found = ", ".join(sorted(mat)) or "none"
        raise DatasetError(path, f"missing variable {name!r} (variables found: {found})")
    return mat[name]


def struct_records(value: Any, path: Path, where: str) -> np.ndarray:
    """A MATLAB struct array of any shape as a 1-D numpy record array (MATLAB element order).

    An empty value of any class (``[]`` saved where no struct was needed) is an empty array.
    """
    if isinstance(value, np.void):
        return np.array([value], dtype=value.dtype)
    if isinstance(value, np.ndarray):
        if value.dtype.names is not None:
            return value.reshape(-1, order="F")
        if value.size == 0:
            return np.empty(0, dtype=[("_empty", object)])
    raise DatasetError(path, f"{where} should be a struct array, got {_describe(value)}")


def struct_field(records: np.ndarray, name: str, path: Path, where: str) -> np.ndarray:
    """Field ``name`` of every record of a 1-D record array, as a 1-D object array."""
    if records.size == 0:
        return np.empty(0, dtype=object)
    if name not in records.dtype.names:
        found = ", ".join(records.dtype.names)
        raise DatasetError(path, f"{where} has no field {name!r} (fields found: {found})")
    return records[name]


def record_field(value: Any, name: str, path: Path, where: str) -> Any:
    """Field ``name`` of a single (1×1) struct."""
    records = struct_records(value, path, where)
    if records.size != 1:
        raise DatasetError(path, f"{where} should be a 1x1 struct, got {records.size} elements")
    return struct_field(records, name, path, where)[0]


def cell_items(value: Any, path: Path, where: str) -> list[Any]:
    """The elements of a MATLAB cell array (any shape, squeezed or not), in MATLAB order."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.reshape(-1, order="F"))
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    # squeeze_me turns a 1x1 cell into its content
    return [value]


def as_str(value: Any, path: Path, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        if value.dtype.kind == "U":
            return "".join(value.reshape(-1, order="F").tolist())
        if value.dtype == object and value.size == 1:
            return as_str(value.reshape(-1)[0], path, where)
    raise DatasetError(path, f"{where} should be a string, got {_describe(value)}")


def cell_strings(value: Any, path: Path, where: str) -> list[str]:
    """A cell array of strings (e.g. ``pool``, ``img_index_train``) as a list of str."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        # a char matrix rather than a cell: one name per row
        value = value.reshape(-1) if value.ndim <= 1 else np.array(["".join(r) for r in value])
        return [str(v) for v in value]
    return [as_str(item, path, f"{where}{{{i + 1}}}") for i, item in
            enumerate(cell_items(value, path, where))]


def as_vector(value: Any, path: Path, where: str) -> np.ndarray:
    """A numeric value as a flat float64 vector (empty when the MATLAB value is empty)."""
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(path, f"{where} should be numeric, got {_describe(value)}") from None


def as_matrix(value: Any, columns: int, path: Path, where: str) -> np.ndarray:
    """A numeric ``M×columns`` matrix as float64 ``[M, columns]`` (``M`` may be 0)."""
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DatasetError(path, f"{where} should be a numeric matrix, got {_describe(value)}")
    if arr.size == 0:
        return np.zeros((0, columns), dtype=np.float64)
    if arr.ndim == 1 and arr.size == columns:  # squeeze_me turned a 1xC matrix into a vector
        arr = arr.reshape(1, columns)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise DatasetError(
            path, f"{where} should be an Mx{columns} matrix, got shape {tuple(arr.shape)}"
        )
    return arr.astype(np.float64, copy=False)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
