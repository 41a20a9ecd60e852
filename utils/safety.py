"""What every stage shares to fail safely (standard library only, so the light stages stay light):

- one-line errors: a user's mistake becomes `prog: error: <one line>` and exit status 2 (argparse's status for a bad
  command line) with no traceback;
- checks made before any long work (a writable output, sequences the model has positions for);
- crash-safe writes: a file or directory is written beside its target and renamed into place, so a killed process
  leaves the old target or the new one, never half of one;
- lock files, held with the kernel's flock, which a killed holder cannot leave held.

    with user_errors("train.py"):
        main()
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# What bad input raises here: bad values and settings (ValueError), missing, unreadable or unwritable files and
# models (OSError: FileNotFoundError, PermissionError, ...).
USER_ERRORS = (ValueError, OSError)
STAGING = ".tmp-"  # `target.tmp-XXXX`: where a write of `target` happens before its rename


class CommandError(SystemExit):
    """Exit status 2; `str()` is the one-line message, which was printed to stderr."""

    def __init__(self, prog: str, error: BaseException | str):
        text = str(error).strip() or type(error).__name__
        self.message = f"{prog}: error: {text.splitlines()[0]}"
        super().__init__(2)

    def __str__(self) -> str:
        return self.message


@contextmanager
def user_errors(prog: str):
    try:
        yield
    except USER_ERRORS as err:
        error = CommandError(prog, err)
        print(error.message, file=sys.stderr)
        raise error from None


def ensure_writable_dir(directory: str | Path, flag: str = "--output-dir") -> Path:
    """Create `directory` if needed and check a file can be written in it: a bad path fails in a second, not
    after minutes of work."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is a file; pass a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OSError(f"output directory {directory} is not writable ({err.strerror}); pass a writable {flag}") from None
    return directory


def check_output_file(path: str | Path, flag: str = "--output") -> Path:
    """A file that will be written after long work: not a directory, in a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file name, e.g. {path / 'result.json'}")
    ensure_writable_dir(path.parent, flag)
    return path


def check_positions(length: int, flag: str, config) -> None:
    """Refuse sequences longer than the model's position table, read from its config before any weights: past it
    GPT-2 fails with an IndexError and a rotary model computes on without a word. A config without
    `max_position_embeddings` is not checked."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        field = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
        raise ValueError(f"{flag} {length} is longer than the model's {limit} positions ({field} in its config.json); "
                         f"pass {flag} {limit} or less")


def file_sha256(path: Path) -> str:
    """The digest that says two files hold the same bytes (a store and the file it was built from)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", sync: bool = False) -> Iterator[IO]:
    """An open file (mode "w" or "wb") that becomes `path` when the block ends without error, and is removed
    otherwise. `sync`: on disk before the rename, so a crash of the machine cannot leave it empty either."""
    path = Path(path)
    staging = path.with_name(f"{path.name}{STAGING}{uuid.uuid4().hex[:8]}")
    try:
        with staging.open(mode.replace("w", "x")) as file:
            yield file
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)  # gone already once renamed


@contextmanager
def staged_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """A new directory beside `target` to fill, which becomes `target` in one rename when the block ends without
    error, and is removed otherwise. An existing `target` is replaced only with `replace` (it is renamed aside first:
    a directory cannot be renamed over a non-empty one; readers that opened its files keep them); without, the rename
    fails with OSError where `target` is a non-empty directory. A killed process leaves its staging directory, for
    `remove_leftovers`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + STAGING, dir=target.parent))
    try:
        yield staging
        if replace and target.exists():
            aside = Path(tempfile.mkdtemp(prefix=target.name + STAGING, dir=target.parent))
            os.rename(target, aside / "old")
            os.rename(staging, target)
            shutil.rmtree(aside)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed


def remove_leftovers(target: str | Path) -> None:
    """Remove what killed writers of `target` left beside it. Only while no other process writes `target` (hold
    its `file_lock`): a running writer's staging looks the same."""
    target = Path(target)
    for leftover in target.parent.glob(glob.escape(target.name + STAGING) + "*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | Path, busy: str | None = None):
    """Hold the kernel's exclusive lock (flock) on the file `path`, created if missing and never removed (removing a
    lock file lets two processes lock two files). The kernel drops it when its holder exits or is killed, so no one
    waits forever. Held by another process: ValueError(`busy`) at once where `busy` is given, else wait for it."""
    path = Path(path)
    try:
        lock = path.open("a")
    except OSError as err:
        raise OSError(f"cannot create the lock file {path} ({err.strerror}): it is written beside what it guards; make "
                      f"{path.parent} writable") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy:
                raise ValueError(busy) from None
            logger.info("Waiting for another process, which holds %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
