"""The paper table's cells, and running them cached.

A cell is a value: the settings its result depends on, the command lines of the repository that compute it, and the
file they write last, named by a key made from the settings and from the code those commands run. So an interrupted
table resumes where it stopped, a second call only prints, a changed setting recomputes only the cells it touches,
and a change to the code (models/, utils/, scripts/, the entry points) recomputes them all. A failing command is
reported (the last line of its log), not fatal.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from utils.safety import atomic_file

REPO = Path(__file__).resolve().parents[2]
CODE = ("*.py", "models/**/*.py", "utils/**/*.py", "scripts/*.py", "scripts/*.sh", "scripts/*.json")  # what cells run
FAILED = "failed"


def code_fingerprint(root: Path = REPO) -> str:
    """A digest of the code the cells run (not of docs or tests), read afresh for every key: a result computed
    before a fix is not reused after it."""
    digest = hashlib.sha256()
    for path in sorted({path for pattern in CODE for path in root.glob(pattern)}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def settings_key(**settings) -> str:
    """A short name for everything a result depends on, its code included: equal settings and code, equal key, the
    result is reused."""
    settings = dict(settings, code=code_fingerprint())
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut off by a kill while written: computed again
        return None


@dataclass(frozen=True)
class Cell:
    """One result of the table. `key` (`settings_key(**settings)`) is in its name and its output's path."""

    name: str  # what the table prints, e.g. rtn-4-8-4-KEY
    part: str  # what its time counts as in the table's notes: data, evaluation, baselines, QAT training
    settings: dict  # everything its result depends on besides the code
    key: str
    output: Path  # the file written last: there (and, for a JSON file, whole) means computed
    runs: tuple[tuple[str, list[str]], ...] = ()  # (log name, command line), in order
    env: dict = field(default_factory=dict)  # on top of this process's environment, for every run
    make: Callable[[Path], None] | None = None  # or computed in this process, writing `output`

    def done(self) -> bool:
        return self.output.is_file() and (self.output.suffix != ".json" or read_result(self.output) is not None)


class CellRunner:
    """Runs cells, each at most once per table: a cell computed before (the same key) is only printed. Each command
    is logged to OUT/logs/NAME.log and timed into OUT/timings.json, for the table's notes."""

    def __init__(self, out: Path):
        self.out = out
        self.timings = read_result(out / "timings.json") or {}
        self.results: dict[Path, Path | str] = {}  # this table's cells, by output
        self.runs: set[str] = set()  # this table's commands, run now or before: its time per part

    def result(self, cell: Cell) -> Path | str:
        """The cell's output, computed unless it was before; FAILED when a command fails."""
        if cell.output not in self.results:
            self.results[cell.output] = self._compute(cell)
        return self.results[cell.output]

    def _compute(self, cell: Cell) -> Path | str:
        self.runs.update(name for name, _ in cell.runs)
        if cell.done():
            print(f"[table] {cell.name}: cached", flush=True)
            return cell.output
        if cell.make:
            cell.make(cell.output)
            return cell.output
        succeeded = all(self._run(name, cell.part, command, cell.env) for name, command in cell.runs)  # in turn
        return cell.output if succeeded else FAILED

    def _run(self, name: str, part: str, command: list[str], env: dict) -> bool:
        """One command, logged to logs/NAME.log, timed under `part`; False if it failed."""
        log = self.out / "logs" / f"{name}.log"
        print(f"[table] {name}: running (log {log})", flush=True)
        start = time.time()
        with log.open("w") as f:
            code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env}).returncode
        seconds = time.time() - start
        if code:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            print(f"[table] {name}: FAILED after {seconds:.0f} s (exit {code}): {tail[0] if tail else ''} "
                  f"-- see {log}", flush=True)
            return False
        self.timings[name] = {"part": part, "seconds": round(seconds, 1)}
        with atomic_file(self.out / "timings.json") as f:
            f.write(json.dumps(self.timings, indent=2) + "\n")
        print(f"[table] {name}: done in {seconds:.0f} s", flush=True)
        return True

    def seconds_per_part(self) -> dict[str, float]:
        """The time this table's commands took (now or in earlier calls), per part."""
        parts = {}
        for timing in (self.timings[name] for name in self.runs if name in self.timings):
            parts[timing["part"]] = parts.get(timing["part"], 0) + timing["seconds"]
        return parts
