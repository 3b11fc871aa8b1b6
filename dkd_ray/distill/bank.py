"""The knowledge bank: the frozen teacher's outputs for every labelled training box, computed once.

The teacher is frozen while the student trains and sees exact ground-truth crops, so its
embedding and logits for each labelled box (and its horizontal flip) never change. They are
computed once (in parallel shards if wanted), stored as Parquet, and each student worker loads
them into dense tensors, so distillation costs one gather per step (docs/METHOD.md, "The knowledge bank").

Table: one row per (box, flip)::

    image_index  int64     row of the box's image in the ImageTable
    box_index    int64     row of the box in ImageTable.boxes (the flat, global box row)
    flipped      bool      the crop was flipped horizontally before the teacher
    embedding    fixed_size_list<float32, dt>   teacher embedding (L2-normalised by the teacher)
    logits       fixed_size_list<float32, K>    teacher identity logits

The file's schema metadata holds one JSON object under ``dkd_ray.knowledge_bank``: embedding
dim, number of classes, crop size, flips, teacher class and parameter count, shard, plus the
caller's ``metadata`` (put the teacher's MLflow URI and the dataset there, e.g.
``{"teacher_uri": "models:/dkd-teacher/3", "dataset": "cuhk_sysu"}``). ``crop_height`` /
``crop_width`` are the size of the crops the teacher was actually fed; the training code also
stores ``teacher_input_size`` (the teacher's own stored input size, which the crops must have)
and ``annotations_fingerprint`` (``ImageTable.fingerprint()`` of the table ``box_index`` rows
refer to). ``KnowledgeBank.load(..., annotations_fingerprint=..., num_classes=...)`` refuses a
bank built on other annotations or over another number of identities.

Parallel building: worker ``i`` of ``n`` calls ``build_knowledge_bank_sharded`` on its share of
the boxes (e.g. ``labelled_rows[i::n]``); each writes ``part-0000i-of-0000n.parquet`` in one
directory and ``KnowledgeBank.load(directory)`` reads the parts, refusing an incomplete set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from dkd_ray.errors import InputError

log = logging.getLogger(__name__)

METADATA_KEY = b"dkd_ray.knowledge_bank"
FINGERPRINT_KEY = "annotations_fingerprint"  # ImageTable.fingerprint() of the table box_index refers to
TEACHER_INPUT_KEY = "teacher_input_size"  # [height, width] the teacher was trained on
FORMAT_VERSION = 1
_PART_NAME = re.compile(r"part-(\d+)-of-(\d+)\.parquet")
_ROWS_PER_ROW_GROUP = 2048  # rows buffered before a Parquet row group is written


def build_knowledge_bank(
    teacher: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    flips: Sequence[bool] = (False, True),
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    progress_every: int = 50,
) -> Path:
    """Run the frozen ``teacher`` on exact ground-truth crops and write the bank to ``path``.

    Args:
        teacher: a Re-ID teacher with ``forward_with_logits(crops) -> (emb [B, dt], logits [B, K])``
            and attributes ``embedding_dim`` and ``num_classes``.
        batches: ``(crops [B, 3, H, W] float, box_index [B] int64, image_index [B] int64)`` tuples:
            the exact crops of the labelled training boxes, as the teacher takes its input.
        path: the Parquet file to write (parent folders are created).
        device: where the teacher runs.
        flips: which versions of each crop to store; ``True`` flips it horizontally (along W).
        metadata: JSON-serialisable facts stored with the table (teacher URI, dataset, ...).
        progress: print a line every ``progress_every`` batches.

    The file appears only when complete: it is written to a temporary file in the same folder,
    synced, and renamed, so a crash never leaves a half bank at ``path``.
    """
    return _build(teacher, batches, Path(path), device=device, flips=tuple(flips), metadata=metadata,
                  progress=progress, progress_every=progress_every, shard=None)


def build_knowledge_bank_sharded(
    teacher: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    directory: str | os.PathLike,
    *,
    shard_index: int,
    num_shards: int,
    device: str | torch.device = "cpu",
    flips: Sequence[bool] = (False, True),
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    progress_every: int = 50,
) -> Path:
    """Build shard ``shard_index`` of ``num_shards``: ``directory/part-<i>-of-<n>.parquet``.

    ``batches`` holds this shard's boxes only (the caller splits the boxes, e.g. ``rows[i::n]``;
    every box must be in exactly one shard). Returns the part's path.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    return _build(teacher, batches, Path(directory) / shard_file_name(shard_index, num_shards), device=device,
                  flips=tuple(flips), metadata=metadata, progress=progress, progress_every=progress_every,
                  shard=(shard_index, num_shards))


def shard_file_name(shard_index: int, num_shards: int) -> str:
    return f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


class BankMismatchError(InputError, ValueError):
    """A knowledge bank that does not belong to the run loading it (other annotations or classes)."""


class KnowledgeBank:
    """The bank in dense tensors: ``lookup`` is one gather, no Python loop over boxes."""

    def __init__(self, image_index: Tensor, box_index: Tensor, flipped: Tensor, embedding: Tensor,
                 logits: Tensor, metadata: dict[str, Any]) -> None:
        self.image_index, self.box_index, self.flipped = image_index, box_index, flipped
        self.embedding, self.logits = embedding, logits  # [N, dt], [N, K] float32
        self.metadata = metadata
        self.embedding_dim = embedding.shape[1]
        self.num_classes = logits.shape[1]
        # _row_of[box, flipped] = table row, -1 where absent.
        size = int(box_index.max()) + 1 if len(box_index) else 0
        self._row_of = torch.full((size, 2), -1, dtype=torch.long, device=embedding.device)
        flip_column = flipped.long()
        self._row_of[box_index, flip_column] = torch.arange(len(box_index), device=embedding.device)
        stored = int((self._row_of >= 0).sum())
        if stored != len(box_index):
            keys = box_index * 2 + flip_column
            unique, counts = torch.unique(keys, return_counts=True)
            dup = unique[counts > 1][:10].tolist()
            raise ValueError(f"knowledge bank has {len(box_index) - stored} duplicate (box_index, flipped) rows, "
                             f"e.g. {[(k // 2, bool(k % 2)) for k in dup]}; were shards overlapping?")

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def __len__(self) -> int:
        return len(self.box_index)

    def __repr__(self) -> str:
        return (f"KnowledgeBank(rows={len(self)}, embedding_dim={self.embedding_dim}, "
                f"num_classes={self.num_classes}, device={self.device})")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", *,
             annotations_fingerprint: str | None = None, num_classes: int | None = None) -> KnowledgeBank:
        """Read a bank file, or a directory of ``*.parquet`` parts, onto ``device``.

        ``annotations_fingerprint``: ``ImageTable.fingerprint()`` of the run's annotations; a bank
        built on another table (its box rows would name other people) raises ``BankMismatchError``.
        A bank without a stored fingerprint (built before it was recorded) is accepted with a
        warning. ``num_classes``: the run's number of training identities; a bank whose logits
        cover another number raises ``BankMismatchError``.
        """
        from dkd_ray.storage import localize

        try:  # on object storage: read from this node's copy (downloaded once, then memory-mapped)
            path = localize(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"knowledge bank not found: {os.fspath(path)}") from None
        files = _bank_files(path)
        tables, metadata = [], None
        for file in files:
            table = pq.read_table(file, memory_map=True)
            file_meta = _read_metadata(file, table.schema)
            if metadata is None:
                metadata, first = file_meta, file
            else:
                _check_same_bank(first, metadata, file, file_meta)
            tables.append(table.replace_schema_metadata(None))
        assert metadata is not None
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowInvalid as error:
            raise ValueError(f"knowledge bank parts in {path} have different schemas: {error}") from None
        metadata = {k: v for k, v in metadata.items() if k != "shard"}
        metadata["path"], metadata["files"] = str(path), [f.name for f in files]
        _check_belongs(path, metadata, annotations_fingerprint, num_classes)
        return cls(
            image_index=_column(table, "image_index", path).to(device),
            box_index=_column(table, "box_index", path).to(device),
            flipped=_column(table, "flipped", path).to(device),
            embedding=_matrix(table, "embedding", path).to(device),
            logits=_matrix(table, "logits", path).to(device),
            metadata=metadata,
        )

    def identity_prototypes(self, box_pids: Tensor, num_classes: int) -> Tensor:
        """The teacher's mean embedding ``[K, dt]`` of each training identity (L2-normalised),
        over every stored row (both flips) of its boxes. ``box_pids[b]``: the identity (0..K-1,
        -1 unlabelled or held out) of global box row ``b``. An identity without rows gets a
        zero row (it cannot be a positive; anchors always have rows)."""
        pids = box_pids.to(self.device)[self.box_index]
        keep = (pids >= 0) & (pids < num_classes)
        sums = self.embedding.new_zeros(num_classes, self.embedding_dim).index_add_(0, pids[keep], self.embedding[keep])
        return torch.nn.functional.normalize(sums, dim=1)

    def lookup(self, box_index: Tensor, flipped: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher outputs for ``box_index [M]`` (global box rows) and ``flipped [M]`` (bool).

        ``flipped`` is True where the student's scene was flipped horizontally: the crop of a box
        in a flipped scene is the flipped crop of the same box.

        Returns ``(embedding [M, dt], logits [M, K])`` on the bank's device.
        Raises ``KeyError`` naming the (box, flip) pairs that are not in the bank.
        """
        box_index = box_index.to(self.device, torch.long).reshape(-1)
        flip_column = flipped.to(self.device).reshape(-1).long()
        if flip_column.shape != box_index.shape:
            raise ValueError(f"lookup: box_index has {box_index.numel()} entries, flipped {flip_column.numel()}")
        size = self._row_of.shape[0]
        inside = (box_index >= 0) & (box_index < size)
        rows = self._row_of[box_index.clamp(0, max(size - 1, 0)), flip_column] if size else box_index
        rows = torch.where(inside, rows, torch.full_like(rows, -1))
        missing = rows < 0
        if bool(missing.any()):
            pairs = list(zip(box_index[missing].tolist(), flip_column[missing].bool().tolist()))
            raise KeyError(f"{len(pairs)} box(es) not in the knowledge bank {self.metadata.get('path')}: "
                           f"(box_index, flipped) = {pairs[:20]}{' ...' if len(pairs) > 20 else ''}")
        return self.embedding[rows], self.logits[rows]


# ---------------------------------------------------------------------------------------- building
def _build(teacher: nn.Module, batches: Iterable, path: Path, *, device, flips: tuple[bool, ...],
           metadata: dict[str, Any] | None, progress: bool, progress_every: int,
           shard: tuple[int, int] | None) -> Path:
    if not flips or any(not isinstance(f, bool) for f in flips) or len(set(flips)) != len(flips):
        raise ValueError(f"flips must be distinct bools, e.g. (False, True); got {flips!r}")
    embedding_dim, num_classes = int(teacher.embedding_dim), int(teacher.num_classes)
    schema = pa.schema([
        ("image_index", pa.int64()),
        ("box_index", pa.int64()),
        ("flipped", pa.bool_()),
        ("embedding", pa.list_(pa.float32(), embedding_dim)),
        ("logits", pa.list_(pa.float32(), num_classes)),
    ])
    facts = {
        "format_version": FORMAT_VERSION,
        "embedding_dim": embedding_dim,
        "num_classes": num_classes,
        "crop_height": None,
        "crop_width": None,
        "flips": list(flips),
        "teacher_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "shard": list(shard) if shard else None,
    }
    for key, value in (metadata or {}).items():
        if key in facts or key in ("path", "files"):
            raise ValueError(f"metadata key {key!r} is reserved by the knowledge bank; reserved: {sorted(facts)}")
        try:
            json.dumps(value)
        except TypeError:
            raise TypeError(f"metadata[{key!r}] = {value!r} is not JSON-serialisable") from None
        facts[key] = value

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.parquet: load never sees it
    was_training = teacher.training
    teacher.eval().to(device)
    rows, buffer, writer, start = 0, [], None, time.monotonic()

    def open_writer() -> pq.ParquetWriter:  # opened late: the metadata needs the first crop's size
        # Float vectors neither dictionary-encode nor compress usefully; plain pages read fastest.
        return pq.ParquetWriter(temporary, schema.with_metadata(_encode(facts)), use_dictionary=False,
                                compression="none")

    try:
        with torch.no_grad():
            for batch_number, (crops, box_index, image_index) in enumerate(batches, 1):
                _check_batch(batch_number, crops, box_index, image_index)
                if facts["crop_height"] is None:
                    facts["crop_height"], facts["crop_width"] = int(crops.shape[2]), int(crops.shape[3])
                    expected = facts.get(TEACHER_INPUT_KEY)
                    if expected is not None and [int(v) for v in expected] != [facts["crop_height"],
                                                                               facts["crop_width"]]:
                        raise ValueError(f"batch {batch_number}: crops are {tuple(crops.shape[2:])}, but the "
                                         f"teacher's input size is {tuple(expected)}")
                elif tuple(crops.shape[2:]) != (facts["crop_height"], facts["crop_width"]):
                    raise ValueError(f"batch {batch_number}: crop size {tuple(crops.shape[2:])} differs from the "
                                     f"first batch's {(facts['crop_height'], facts['crop_width'])}")
                crops = crops.to(device, torch.float32)
                for flip in flips:
                    emb, logits = teacher.forward_with_logits(torch.flip(crops, dims=(3,)) if flip else crops)
                    _check_outputs(batch_number, emb, logits, len(crops), embedding_dim, num_classes)
                    buffer.append(_record_batch(schema, image_index, box_index, flip, emb, logits))
                    rows += len(crops)
                if sum(len(b) for b in buffer) >= _ROWS_PER_ROW_GROUP:
                    writer = writer or open_writer()
                    writer.write_table(pa.Table.from_batches(buffer, schema))
                    buffer = []
                if progress and batch_number % progress_every == 0:
                    elapsed = time.monotonic() - start
                    print(f"knowledge bank {path.name}: {batch_number} batches, {rows} rows, "
                          f"{rows / max(elapsed, 1e-9):.0f} crops/s", flush=True)
        writer = writer or open_writer()
        if buffer:
            writer.write_table(pa.Table.from_batches(buffer, schema))
        writer.close()
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
                pass
        temporary.unlink(missing_ok=True)
        raise
    finally:
        teacher.train(was_training)
    if progress:
        print(f"knowledge bank {path}: {rows} rows written in {time.monotonic() - start:.1f} s", flush=True)
    return path


def _fsync(file: Path) -> None:
    """Flush the file's data to disk before the rename publishes it."""
    descriptor = os.open(file, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_batch(number: int, crops: Tensor, box_index: Tensor, image_index: Tensor) -> None:
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"batch {number}: crops must be [B, 3, H, W], got {tuple(crops.shape)}")
    if box_index.shape != (len(crops),) or image_index.shape != (len(crops),):
        raise ValueError(f"batch {number}: box_index {tuple(box_index.shape)} and image_index "
                         f"{tuple(image_index.shape)} must both be [{len(crops)}]")
    if len(box_index) and int(box_index.min()) < 0:
        raise ValueError(f"batch {number}: negative box_index {int(box_index.min())}")


def _check_outputs(number: int, emb: Tensor, logits: Tensor, batch: int, dim: int, classes: int) -> None:
    if tuple(emb.shape) != (batch, dim) or tuple(logits.shape) != (batch, classes):
        raise ValueError(f"batch {number}: teacher returned embedding {tuple(emb.shape)} and logits "
                         f"{tuple(logits.shape)}, expected ({batch}, {dim}) and ({batch}, {classes}) "
                         "from its embedding_dim / num_classes")


def _record_batch(schema: pa.Schema, image_index: Tensor, box_index: Tensor, flip: bool,
                  emb: Tensor, logits: Tensor) -> pa.RecordBatch:
    n = len(box_index)
    emb = emb.detach().float().cpu().numpy().reshape(-1)
    logits = logits.detach().float().cpu().numpy().reshape(-1)
    return pa.RecordBatch.from_arrays([
        pa.array(image_index.cpu().numpy().astype(np.int64)),
        pa.array(box_index.cpu().numpy().astype(np.int64)),
        pa.array(np.full(n, flip)),
        pa.FixedSizeListArray.from_arrays(pa.array(emb), schema.field("embedding").type.list_size),
        pa.FixedSizeListArray.from_arrays(pa.array(logits), schema.field("logits").type.list_size),
    ], schema=schema)


def _encode(facts: dict[str, Any]) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps(facts, sort_keys=True).encode()}


# ----------------------------------------------------------------------------------------- loading
def _bank_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"knowledge bank not found: {path}")
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"knowledge bank directory {path} holds no *.parquet parts")
    parts = [m for m in (_PART_NAME.fullmatch(f.name) for f in files) if m]
    if parts:
        totals = {int(m.group(2)) for m in parts}
        if len(totals) != 1:
            raise ValueError(f"knowledge bank directory {path} mixes shardings: part counts {sorted(totals)}")
        total = totals.pop()
        missing = sorted(set(range(total)) - {int(m.group(1)) for m in parts})
        if missing:
            raise FileNotFoundError(f"knowledge bank {path} is incomplete: missing "
                                    f"{[shard_file_name(i, total) for i in missing[:10]]} of {total} parts")
    return files


def _read_metadata(file: Path, schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{file} is not a knowledge bank: no {METADATA_KEY.decode()!r} schema metadata")
    facts = json.loads(raw)
    if facts.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: knowledge bank format {facts.get('format_version')} is not the supported "
                         f"{FORMAT_VERSION}")
    return facts


def _check_belongs(path: Path, metadata: dict[str, Any], fingerprint: str | None, num_classes: int | None) -> None:
    """Refuse a bank built for other annotations or another set of identities (see ``load``)."""
    if num_classes is not None and int(metadata["num_classes"]) != int(num_classes):
        raise BankMismatchError(
            f"knowledge bank {path} holds teacher logits over {metadata['num_classes']} classes, but this run "
            f"trains on {num_classes} identities: the bank's teacher was trained on other annotations; use a "
            "teacher (and its bank) trained on this dataset, or rebuild the bank for it")
    if fingerprint is None:
        return
    stored = metadata.get(FINGERPRINT_KEY)
    if stored is None:
        log.warning("knowledge bank %s records no annotations fingerprint (built by an older version): its "
                    "box rows cannot be checked against this dataset (%s); rebuild the bank if the "
                    "dataset was re-parsed or changed", path, fingerprint)
    elif stored != fingerprint:
        raise BankMismatchError(
            f"knowledge bank {path} was built on other annotations: its fingerprint is {stored}, this run's "
            f"annotations have {fingerprint}, so its box rows would name the wrong people (the dataset was "
            "re-parsed, changed or is another one). Rebuild the bank for this dataset: run the teacher over "
            "these annotations (dkd_ray.train.bank_loop.build_bank) or train the teacher on them again")


def _check_same_bank(first: Path, first_meta: dict, other: Path, other_meta: dict) -> None:
    """Parts of one bank must come from one teacher and setup; only their shard differs."""
    keys = (set(first_meta) | set(other_meta)) - {"shard", "crop_height", "crop_width"}
    for key in sorted(keys):
        if first_meta.get(key) != other_meta.get(key):
            raise ValueError(f"knowledge bank parts disagree on {key!r}: {first.name} has {first_meta.get(key)!r}, "
                             f"{other.name} has {other_meta.get(key)!r}")
    for key in ("crop_height", "crop_width"):  # an empty shard never saw a crop
        if None not in (first_meta.get(key), other_meta.get(key)) and first_meta[key] != other_meta[key]:
            raise ValueError(f"knowledge bank parts disagree on {key!r}: {first.name} has {first_meta[key]!r}, "
                             f"{other.name} has {other_meta[key]!r}")
        first_meta[key] = first_meta.get(key) if first_meta.get(key) is not None else other_meta.get(key)


def _column(table: pa.Table, name: str, path: Path) -> Tensor:
    if name not in table.column_names:
        raise ValueError(f"knowledge bank {path} has no column {name!r}")
    return torch.from_numpy(np.require(table.column(name).to_numpy(), requirements="W"))


def _matrix(table: pa.Table, name: str, path: Path) -> Tensor:
    if name not in table.column_names:
        raise ValueError(f"knowledge bank {path} has no column {name!r}")
    column = table.column(name)
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"knowledge bank {path}: column {name!r} is {column.type}, expected a fixed_size_list")
    width = column.type.list_size
    values = np.concatenate([c.flatten().to_numpy() for c in column.chunks]) if column.num_chunks else \
        np.zeros(0, np.float32)
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(-1, width))
