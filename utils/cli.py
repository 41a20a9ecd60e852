"""What every command shares: the one way a user's mistake becomes a message, `prog: error: <one line>` and exit
status 2 (argparse's status for a bad command line) with no traceback, and output checks made before any long work.

    with user_errors("train.py"):
        main()
"""
from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# What bad input raises here: bad values and settings (ValueError), missing, unreadable or unwritable files and
# models (OSError: FileNotFoundError, PermissionError, ...).
USER_ERRORS = (ValueError, OSError)


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
