"""MATLAB v5 files as the real benchmarks ship them, written with scipy's own MAT-5 writer.

Two changes on top of ``scipy.io.savemat``, neither of which changes what ``loadmat`` reads:

- a fixed file header: scipy stamps ``time.asctime()`` into it, and the generator promises
  byte-identical files per seed;
- speed on huge struct arrays: scipy makes Python calls per field of every element (about
  50 µs per gallery entry here), so the full-size CUHK-SYSU ``TestG4000`` alone (11.6M
  entries) takes ~10 CPU-minutes, all six TestG files ~18. Here each distinct leaf *object*
  (an image name, the shared empty ``idlocate``, the ``ishard`` 0/1) is encoded once, by
  scipy, and the elements are joined with numpy (~30x faster). The bytes are the same as
  scipy's (``tests/test_synthetic.py`` compares them with ``scipy.io.savemat``), so callers
  should share leaf objects between elements where they can.

Build values with :func:`struct_array` (MATLAB struct arrays, fields in the given order) and
:func:`cell_column` (N×1 cell arrays); strings become 1×L char, Python floats 1×1 double.
"""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy.io.matlab import _mio5  # private, but the only MAT-5 writer; pinned down by tests
from scipy.io.matlab._mio5_params import miCOMPRESSED, miINT8

# MATLAB's own header text is "MATLAB 5.0 MAT-file, Platform: ..., Created on: ...";
# a constant keeps the files reproducible.
HEADER_TEXT = "MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: dkd-ray synthetic generator"

EMPTY_0x0 = np.zeros((0, 0))  # MATLAB's default empty field value ``[]``
EMPTY_1x0 = np.zeros((1, 0))  # ``zeros(1, 0)``: the other empty the real TestG files hold

_JOIN_CHUNK = 1 << 16  # elements per b''.join: bounds the transient copy of a huge array
_COMPRESS_CHUNK = 1 << 24
_SMALL_COLUMN = 64  # up to this many elements, per-element dict lookups are cheaper


def struct_array(shape: tuple[int, ...], fields: Mapping[str, Any]) -> np.ndarray:
    """A MATLAB struct array of ``shape`` whose fields (in order) are filled column-wise.

    Each value of ``fields`` is either one object shared by every element or a sequence /
    object array with one entry per element (in C order of ``shape``).
    """
    arr = np.empty(shape, dtype=[(name, object) for name in fields])
    flat = arr.reshape(-1)
    for name, values in fields.items():
        column = flat[name]
        if isinstance(values, (list, tuple)) or (
            isinstance(values, np.ndarray) and values.dtype == object
        ):
            if len(values) != flat.size:
                raise ValueError(f"struct field {name!r}: {len(values)} values for {flat.size} elements")
            column[:] = object_array(values)
        else:
            column[:] = object_array([values] * flat.size)
    return arr


def cell_column(values: Any) -> np.ndarray:
    """An N×1 MATLAB cell array (the shape of ``pool``, ``img_index_train``, ``Train``)."""
    values = object_array(values)
    return values.reshape(len(values), 1)


def object_array(values: Any) -> np.ndarray:
    # np.array(list_of_arrays, dtype=object) would try to broadcast equal-shaped arrays.
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def save_mat(
    path: str | Path, variables: Mapping[str, Any], *, compress: bool = True, level: int = -1
) -> None:
    """Write ``variables`` to ``path`` as a MAT-5 file, zlib-compressed like MATLAB's ``save``
    (``level`` -1 is zlib's default, as scipy; 1 is twice as fast for huge files)."""
    with open(path, "wb") as stream:
        writer = _ReproducibleMatWriter(stream, do_compression=compress)
        writer.level = level
        writer.put_variables(dict(variables))


def encode_mat(variables: Mapping[str, Any], *, compress: bool = True) -> bytes:
    """The bytes :func:`save_mat` would write (for tests and in-memory use)."""
    stream = BytesIO()
    _ReproducibleMatWriter(stream, do_compression=compress).put_variables(dict(variables))
    return stream.getvalue()


def _is_leaf(value: Any) -> bool:
    """True for values that hold no nested struct or cell (safe to encode once and reuse)."""
    if isinstance(value, np.ndarray):
        return not (value.dtype.fields or value.dtype.hasobject)
    return not isinstance(value, dict)


class _MemoVarWriter(_mio5.VarWriter5):
    """scipy's VarWriter5 with struct elements joined from per-object encodings."""

    def __init__(self, file_writer: "_ReproducibleMatWriter") -> None:
        super().__init__(file_writer)
        self._memo: dict[int, bytes] = {}  # id(value) -> its encoding
        self._keep: list[Any] = []  # the encoded objects, so that their ids stay unique
        # A sorted snapshot of the memo for numpy lookups in large columns (a dict lookup per
        # element is the very cost this class avoids), rebuilt only after the memo grew.
        self._snapshot_ids = np.zeros(0, dtype=np.int64)
        self._snapshot_bytes = np.zeros(0, dtype=object)

    def _encode(self, value: Any) -> bytes:
        outer, self.file_stream = self.file_stream, BytesIO()
        try:
            self.write(value)
            encoded = self.file_stream.getvalue()
        finally:
            self.file_stream = outer
        self._memo[id(value)] = encoded
        self._keep.append(value)
        return encoded

    def _encoded_column(self, column: np.ndarray) -> np.ndarray | None:
        """Per-element bytes of one field, or None when the field holds structs/cells."""
        if len(column) <= _SMALL_COLUMN:
            out = np.empty(len(column), dtype=object)
            for i, value in enumerate(column):
                hit = self._memo.get(id(value))
                if hit is None:
                    if not _is_leaf(value):
                        return None
                    hit = self._encode(value)
                out[i] = hit
            return out
        ids = np.fromiter(map(id, column), dtype=np.int64, count=len(column))
        distinct_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        encoded = np.empty(len(distinct_ids), dtype=object)
        found = np.zeros(len(distinct_ids), dtype=bool)
        if len(self._snapshot_ids):
            pos = np.minimum(
                np.searchsorted(self._snapshot_ids, distinct_ids), len(self._snapshot_ids) - 1
            )
            found = self._snapshot_ids[pos] == distinct_ids
            encoded[found] = self._snapshot_bytes[pos[found]]
        for i in np.flatnonzero(~found).tolist():
            hit = self._memo.get(int(distinct_ids[i]))
            if hit is None:
                value = column[first[i]]
                if not _is_leaf(value):
                    return None
                hit = self._encode(value)
            encoded[i] = hit
        if len(self._memo) > 2 * len(self._snapshot_ids) + 1024:  # geometric: amortised rebuilds
            self._snapshot_ids = np.fromiter(self._memo.keys(), dtype=np.int64, count=len(self._memo))
            self._snapshot_bytes = np.empty(len(self._memo), dtype=object)
            self._snapshot_bytes[:] = list(self._memo.values())
            order = np.argsort(self._snapshot_ids)
            self._snapshot_ids, self._snapshot_bytes = (
                self._snapshot_ids[order],
                self._snapshot_bytes[order],
            )
        return encoded[inverse.reshape(-1)]

    def _write_items(self, arr: np.ndarray) -> None:
        # Field-name preamble exactly as VarWriter5._write_items writes it.
        fieldnames = [f[0] for f in arr.dtype.descr]
        length = max(len(name) for name in fieldnames) + 1
        max_length = 64 if self.long_field_names else 32
        if length > max_length:
            raise ValueError(f"Field names are restricted to {max_length - 1} characters")
        self.write_element(np.array([length], dtype="i4"))
        self.write_element(np.array(fieldnames, dtype=f"S{length}"), mdtype=miINT8)

        elements = np.atleast_2d(arr).flatten("F")  # MATLAB stores elements column-major
        columns = [elements[name] for name in fieldnames]
        encoded = [self._encoded_column(c) for c in columns]
        if all(e is not None for e in encoded):
            parts = np.stack(encoded, axis=1)  # [N, F] bytes, element-major like scipy
            for start in range(0, len(parts), _JOIN_CHUNK):
                self.file_stream.write(b"".join(parts[start : start + _JOIN_CHUNK].ravel().tolist()))
            return
        for i in range(len(elements)):
            for column, enc in zip(columns, encoded):
                if enc is None:
                    self.write(column[i])
                else:
                    self.file_stream.write(enc[i])


class _ReproducibleMatWriter(_mio5.MatFile5Writer):
    """MatFile5Writer with a constant header, the memoising writer and streamed zlib."""

    level = -1  # zlib compression level

    def write_file_header(self) -> None:
        hdr = np.zeros((), _mio5.NDT_FILE_HDR)
        hdr["description"] = HEADER_TEXT
        hdr["version"] = 0x0100
        hdr["endian_test"] = np.ndarray(shape=(), dtype="S2", buffer=np.uint16(0x4D49))
        self.file_stream.write(hdr.tobytes())

    def put_variables(self, mdict: Mapping[str, Any], write_header: bool | None = None) -> None:
        if write_header is None:
            write_header = self.file_stream.tell() == 0
        if write_header:
            self.write_file_header()
        matrix_writer = _MemoVarWriter(self)
        for name, var in mdict.items():
            if name.startswith("_"):
                raise ValueError(f"MATLAB variable names cannot start with '_': {name!r}")
            if not self.do_compression:
                matrix_writer.file_stream = self.file_stream
                matrix_writer.write_top(var, name.encode("latin1"), False)
                continue
            # scipy compresses stream.getvalue() in one call (a full copy); feeding zlib the
            # buffer in slices gives the same deflate stream without that copy.
            raw = BytesIO()
            matrix_writer.file_stream = raw
            matrix_writer.write_top(var, name.encode("latin1"), False)
            compressor = zlib.compressobj(self.level)
            chunks = []
            view = raw.getbuffer()
            for start in range(0, len(view), _COMPRESS_CHUNK):
                chunks.append(compressor.compress(view[start : start + _COMPRESS_CHUNK]))
            chunks.append(compressor.flush())
            del view
            tag = np.empty((), _mio5.NDT_TAG_FULL)
            tag["mdtype"] = miCOMPRESSED
            tag["byte_count"] = sum(len(c) for c in chunks)
            self.file_stream.write(tag.tobytes())
            for chunk in chunks:
                self.file_stream.write(chunk)
