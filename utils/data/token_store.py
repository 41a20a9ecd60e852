"""The token store: the token ids of a .jsonl file as flat binary arrays beside it, memory-mapped by every reader.

Python lists of ints cost ~40 bytes a token in every rank (8 GB per rank for the paper's 100k x 2048 tokens);
mapped, the ids cost 2 or 4 bytes a token once, in the page cache that all ranks and DataLoader workers share.

    all.jsonl.tokens/
        tokens.bin     all sequences' ids, one after another: little-endian uint16 (vocabulary <= 65536), else uint32
        offsets.bin    little-endian int64, one more than the sequences: sequence i is tokens[offsets[i]:offsets[i+1]]
        manifest.json  written last: dtype, counts, the source's size, mtime, inode and sha256, and what the build
                       was checked against (`built_for`: vocabulary size, teacher, tokenizer)
    all.jsonl.tokens.lock   held (flock) by the process that checks or builds the store

A store is used only when its manifest matches the source and `built_for`, and its files have the sizes the
manifest says; otherwise it is built again. A build writes a temporary directory beside the store and renames it
into place, so a killed build leaves a temporary directory (removed by the next build), never a store that looks
valid. Processes that start together (torchrun ranks) take the lock in turn: the first builds, the others wait,
then map what it built. The kernel drops the lock when its holder exits or is killed, so no one waits forever.
"""
from __future__ import annotations

import json
import logging
import os
import time
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from utils.safety import atomic_file, file_lock, file_sha256, remove_leftovers, staged_directory

logger = logging.getLogger(__name__)

FORMAT = 1
MAX_VOCAB_SIZE = 2**32  # ids are stored as uint32 at most
TOKENS, OFFSETS, MANIFEST = "tokens.bin", "offsets.bin", "manifest.json"
OFFSET_DTYPE = np.dtype("<i8")


def token_dtype(vocab_size: int | None) -> np.dtype:
    return np.dtype("<u2" if vocab_size is not None and vocab_size <= 2**16 else "<u4")


def store_directory(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(source.name + ".tokens")


class TokenStore:
    """One store, mapped read-only: `tokens` (every id) and `offsets` (sequence boundaries). `built` says whether
    this process built it rather than found it."""

    def __init__(self, directory: Path, manifest: dict, built: bool):
        self.directory, self.manifest, self.built = directory, manifest, built
        self._map()

    def _map(self):
        self.tokens = np.memmap(self.directory / TOKENS, dtype=self.manifest["dtype"], mode="r",
                                shape=(self.manifest["tokens"],))
        self.offsets = np.memmap(self.directory / OFFSETS, dtype=OFFSET_DTYPE, mode="r",
                                 shape=(self.manifest["sequences"] + 1,))

    def __len__(self) -> int:
        return self.manifest["sequences"]

    # Pickled (to a spawned DataLoader worker) as its path: a pickled memmap would carry a copy of every token.
    def __getstate__(self):
        return {"directory": self.directory, "manifest": self.manifest, "built": self.built}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if read_manifest(self.directory) != self.manifest:
            raise RuntimeError(f"token store {self.directory} was rebuilt while in use (its source changed); "
                               "restart the run")
        self._map()


def open_token_store(source: str | Path, sequences: Iterable[Sequence[int]], vocab_size: int | None,
                     built_for: dict) -> TokenStore:
    """The store of `source`, reused when it was built from the same bytes for the same `vocab_size` and
    `built_for` (JSON values saying what `sequences` depend on), else built from `sequences`, which are read only
    then. Ids must be below `vocab_size` (MAX_VOCAB_SIZE without one): `sequences` checks that."""
    source = Path(source)
    directory = store_directory(source)
    built_for = {"vocab_size": vocab_size, **built_for}
    with file_lock(directory.with_name(directory.name + ".lock")):
        manifest = _usable_manifest(directory, source, built_for)
        if manifest:
            logger.info("Reusing the token store %s", directory)
            return TokenStore(directory, manifest, built=False)
        return TokenStore(directory, _build(source, directory, sequences, token_dtype(vocab_size), built_for),
                          built=True)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete store; None when it is missing, unreadable or of another format, or the data
    files do not have the sizes it gives."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        tokens_size = manifest["tokens"] * np.dtype(manifest["dtype"]).itemsize
        offsets_size = (manifest["sequences"] + 1) * OFFSET_DTYPE.itemsize
        complete = (manifest["format"] == FORMAT and (directory / TOKENS).stat().st_size == tokens_size
                    and (directory / OFFSETS).stat().st_size == offsets_size)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


def _source_state(source: Path) -> dict:
    stat = source.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _usable_manifest(directory: Path, source: Path, built_for: dict) -> dict | None:
    manifest = read_manifest(directory)
    if manifest is None or manifest["built_for"] != built_for:
        return None
    state, recorded = _source_state(source), manifest["source"]
    if all(recorded[key] == value for key, value in state.items()):
        return manifest
    if recorded["size"] == state["size"] and file_sha256(source) == recorded["sha256"]:
        # The same bytes, copied or touched: hashing is much cheaper than parsing every line again.
        manifest["source"] = {**state, "sha256": recorded["sha256"]}
        _write_json(directory / MANIFEST, manifest)
        return manifest
    return None


def _build(source: Path, directory: Path, sequences: Iterable[Sequence[int]], dtype: np.dtype,
           built_for: dict) -> dict:
    remove_leftovers(directory)  # a killed build's: we hold the lock, so none is running
    logger.info("Building the token store %s from %s", directory, source)
    started = time.perf_counter()
    source_state = {**_source_state(source), "sha256": file_sha256(source)}  # before reading: a later edit shows
    # Readers that mapped an old store keep its files until they unmap.
    with staged_directory(directory, replace=True) as building:
        offsets = array("q", [0])
        with (building / TOKENS).open("wb") as out:
            for ids in sequences:
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
            _sync(out)
        with (building / OFFSETS).open("wb") as out:
            out.write(np.frombuffer(offsets, dtype=np.int64).astype(OFFSET_DTYPE).tobytes())
            _sync(out)
        manifest = {"format": FORMAT, "dtype": dtype.str, "tokens": offsets[-1], "sequences": len(offsets) - 1,
                    "source": source_state, "built_for": built_for}
        _write_json(building / MANIFEST, manifest)
    logger.info("Built the token store %s: %d sequences, %d tokens as %s in %.1f s", directory,
                manifest["sequences"], manifest["tokens"], dtype.name, time.perf_counter() - started)
    return manifest


def _sync(file):
    file.flush()
    os.fsync(file.fileno())


def _write_json(path: Path, value: dict):
    """Readers see the old file or the new one, never half of one."""
    with atomic_file(path, sync=True) as out:
        json.dump(value, out, indent=1)
