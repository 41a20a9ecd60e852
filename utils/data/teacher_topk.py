"""The teacher's top-K log-probabilities at every position of the generated data: KD without a resident teacher.

The generator computes the teacher's full next-token distribution at every step anyway (paper section 2.1); with
`generate_data.py --save-topk K` its K most likely tokens and their log-probabilities are kept, and
`train.py --teacher cached` distils from them (utils/training/kd_trainer.py) instead of running the teacher.
With `--save-tail S` as well, each row also keeps S tokens drawn (with replacement) from the teacher's distribution
outside those K, with their log-probabilities: an unbiased sample of the rest of the vocabulary, which the top-K
alone reduce to one bucket (sampled distillation, Anshumann et al. 2025, "Sparse Logit Sampling").

Row t of a sequence is the teacher's distribution over the token after position t, given tokens 0..t: the row
of the position whose logits KD compares. A sequence's last row has no distribution (the generator stops before
computing it): ids 0 and log-probabilities -inf, which the loss leaves out.

    shard-00-of-01.jsonl.topk   rows appended by generate_data.py: per row K + S little-endian int32 ids, then their
                                K + S float32 log-probabilities, the K most likely first, then the S tail samples;
                                every line of the shard says where its rows begin (`SequenceRecord.topk`: K, the first
                                row, and S when there are tail samples)
    all.jsonl.topk/             written by merge_gen_data.py beside the merged file, one row per token of its lines
        ids.bin                 [tokens, K + S] int32, in the token store's order (utils/data/token_store.py)
        logprobs.bin            [tokens, K + S] float32
        manifest.json           written last: K, S ("tail"), rows, sequences, and the sha256 of the merged file it
                                belongs to

This module owns both layouts; it imports numpy only (merge_gen_data.py loads no torch). Functions on rows take
their width, K + S columns.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.safety import atomic_file, staged_directory

FORMAT = 1
ID_DTYPE, LOGPROB_DTYPE = np.dtype("<i4"), np.dtype("<f4")
IDS, LOGPROBS, MANIFEST = "ids.bin", "logprobs.bin", "manifest.json"
SIDE_SUFFIX, STORE_SUFFIX = ".topk", ".topk"
MAX_K = 4096


def check_k(k: int, tail: int = 0) -> None:
    if not 0 <= k <= MAX_K:
        raise ValueError(f"--save-topk {k} must be between 0 (off) and {MAX_K}; 32 keeps KD within a few per cent "
                         "of full logits (docs/BENCHMARKS.md)")
    if not 0 <= tail <= MAX_K:
        raise ValueError(f"--save-tail {tail} must be between 0 (off) and {MAX_K}")
    if tail and not k:
        raise ValueError(f"--save-tail {tail} samples the teacher's distribution outside its top-K; add --save-topk K "
                         "(e.g. 32)")


@dataclass
class SequenceTopK:
    """One sequence's rows: ids [length, K + S] int32, logprobs [length, K + S] float32."""

    ids: np.ndarray
    logprobs: np.ndarray

    @classmethod
    def empty(cls, length: int, width: int) -> SequenceTopK:
        """Rows without a distribution, to be filled in."""
        return cls(np.zeros((length, width), ID_DTYPE), np.full((length, width), -np.inf, LOGPROB_DTYPE))

    def __len__(self) -> int:
        return len(self.ids)


def describe_rows(k: int, tail: int) -> str:
    """What a row holds, in words: `top-32`, `top-32 + 16 tail`, or `no` without rows."""
    return (f"top-{k}" + (f" + {tail} tail" if tail else "")) if k else "no"


def row_bytes(width: int) -> int:
    return width * (ID_DTYPE.itemsize + LOGPROB_DTYPE.itemsize)


# ---- the shard side file, appended by generate_data.py ----

def side_file(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name + SIDE_SUFFIX)


def append_rows(out, topk: list[SequenceTopK], width: int) -> None:
    """Append each sequence's rows to the open side file `out`, in order."""
    for rows in topk:
        if rows.ids.shape[1:] != (width,) or rows.logprobs.shape != rows.ids.shape:
            raise ValueError(f"top-K rows of shape {rows.ids.shape} do not have {width} columns (K + S)")
        out.write(np.concatenate([rows.ids.astype(ID_DTYPE).view(np.uint8).reshape(len(rows), -1),
                                  rows.logprobs.astype(LOGPROB_DTYPE).view(np.uint8).reshape(len(rows), -1)],
                                 axis=1).tobytes())


def keep_rows(path: Path, rows: int, width: int) -> None:
    """Cut a side file to its first `rows` rows (those the shard's complete lines point to): a killed run may have
    written a batch's rows but not its lines. A file holding fewer rows than the lines need is an error."""
    size = path.stat().st_size if path.exists() else 0
    if size < rows * row_bytes(width):
        raise ValueError(f"{path} holds {size // row_bytes(width)} top-K rows but its shard's lines need {rows}; it "
                         f"was cut or deleted, so delete the shard file {path.name.removesuffix(SIDE_SUFFIX)} too and "
                         "generate it again")
    if size > rows * row_bytes(width):
        with path.open("r+b") as f:
            f.truncate(rows * row_bytes(width))


def read_rows(path: Path, first: int, length: int, width: int) -> SequenceTopK:
    """The rows of one line of a side file."""
    size = path.stat().st_size if path.exists() else 0
    if (first + length) * row_bytes(width) > size:
        raise ValueError(f"{path} ends before the top-K rows {first}..{first + length - 1} that a line of its shard "
                         "points to; generate that shard again")
    with path.open("rb") as f:
        f.seek(first * row_bytes(width))
        return next_rows(f, length, width)


def next_rows(stream, length: int, width: int) -> SequenceTopK:
    """The next `length` rows of an open side-file stream."""
    raw = np.frombuffer(stream.read(length * row_bytes(width)), np.uint8).reshape(length, row_bytes(width))
    split = width * ID_DTYPE.itemsize
    return SequenceTopK(raw[:, :split].copy().view(ID_DTYPE), raw[:, split:].copy().view(LOGPROB_DTYPE))


# ---- the store beside a merged file, written by merge_gen_data.py, read by train.py ----

def store_directory(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(source.name + STORE_SUFFIX)


class StoreWriter:
    """Writes the store of a merged file as its lines are written (`store_writer`): `add(rows)` per line in order,
    `finish(sha256)` with the merged file's digest once its last line is written."""

    def __init__(self, ids, logprobs, width: int):
        self._ids, self._logprobs, self.width = ids, logprobs, width
        self.rows = self.sequences = 0
        self.source_sha256 = None

    def add(self, rows: SequenceTopK) -> None:
        if rows.ids.shape[1:] != (self.width,):
            raise ValueError(f"top-K rows of shape {rows.ids.shape} do not have {self.width} columns (K + S)")
        self._ids.write(rows.ids.astype(ID_DTYPE).tobytes())
        self._logprobs.write(rows.logprobs.astype(LOGPROB_DTYPE).tobytes())
        self.rows += len(rows)
        self.sequences += 1

    def finish(self, source_sha256: str) -> None:
        self.source_sha256 = source_sha256


@contextmanager
def store_writer(source: str | Path, k: int, tail: int = 0) -> Iterator[StoreWriter]:
    """The store of `source`, written in a staging directory that replaces any old store only when the block ends
    without error after `finish`: an interrupted merge leaves no store that looks valid."""
    with staged_directory(store_directory(source), replace=True) as building:
        with (building / IDS).open("wb") as ids, (building / LOGPROBS).open("wb") as logprobs:
            writer = StoreWriter(ids, logprobs, k + tail)
            yield writer
            if writer.source_sha256 is None:
                raise RuntimeError("store_writer left without finish(): the store would match no merged file")
            for f in (ids, logprobs):
                f.flush()
                os.fsync(f.fileno())
        manifest = {"format": FORMAT, "k": k, "tail": tail, "rows": writer.rows, "sequences": writer.sequences,
                    "source_sha256": writer.source_sha256}
        with atomic_file(building / MANIFEST, sync=True) as out:
            json.dump(manifest, out, indent=1)


def remove_store(source: str | Path) -> None:
    """A merge without top-K rows leaves no store of an earlier merge behind (it would not match anyway)."""
    directory = store_directory(source)
    if (directory / MANIFEST).exists():
        (directory / MANIFEST).unlink()
        for name in (IDS, LOGPROBS):
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()


def manifest_width(manifest: dict) -> int:
    """K + S, the columns of a store's rows (S is 0 in stores written before there were tail samples)."""
    return manifest["k"] + manifest.get("tail", 0)


@dataclass
class TeacherTopK:
    """A store, mapped read-only: `ids` and `logprobs` [rows, K + S], row i beside token i of the token store."""

    directory: Path
    manifest: dict

    def __post_init__(self):
        shape = (self.manifest["rows"], self.width)
        self.ids = np.memmap(self.directory / IDS, dtype=ID_DTYPE, mode="r", shape=shape)
        self.logprobs = np.memmap(self.directory / LOGPROBS, dtype=LOGPROB_DTYPE, mode="r", shape=shape)

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def tail(self) -> int:
        """S, the tail samples after the top-K columns (0 in stores written before there were any)."""
        return self.manifest.get("tail", 0)

    @property
    def width(self) -> int:
        return manifest_width(self.manifest)

    # Pickled (to a spawned DataLoader worker) as its path, not as a copy of every row.
    def __getstate__(self):
        return {"directory": self.directory, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(**state)


def open_teacher_topk(source: str | Path, source_sha256: str, rows: int, sequences: int) -> TeacherTopK:
    """The store of the merged file `source`, checked against what the token store read from it (its sha256, tokens
    and sequences); a missing or stale store is an error naming the fix."""
    directory = store_directory(source)
    fix = (f"generate the data with generate_data.py --save-topk K and merge it again (merge_gen_data.py), or train "
           "with the teacher model (--teacher model)")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        raise FileNotFoundError(f"{source} has no teacher top-K store ({directory}); {fix}") from None
    expected = {"format": FORMAT, "rows": rows, "sequences": sequences, "source_sha256": source_sha256}
    if any(manifest.get(key) != value for key, value in expected.items()):
        raise ValueError(f"the teacher top-K store {directory} belongs to another version of {source}; {fix}")
    width = manifest_width(manifest)
    for name, dtype in ((IDS, ID_DTYPE), (LOGPROBS, LOGPROB_DTYPE)):
        if (directory / name).stat().st_size != rows * width * dtype.itemsize:
            raise ValueError(f"{directory / name} is cut or damaged; {fix}")
    return TeacherTopK(directory, manifest)


def write_store(source: str | Path, topk: list[SequenceTopK], source_sha256: str, tail: int = 0) -> TeacherTopK:
    """The store of `source` from every line's rows at once, the last `tail` columns being tail samples (tests;
    merge_gen_data.py streams with store_writer)."""
    k = topk[0].ids.shape[1] - tail
    with store_writer(source, k, tail) as writer:
        for rows in topk:
            writer.add(rows)
        writer.finish(source_sha256)
    return open_teacher_topk(source, source_sha256, writer.rows, writer.sequences)
