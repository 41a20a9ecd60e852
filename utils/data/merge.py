"""Join the shards of generate_data.py into one training file, checking every line.

A line is kept when it is a JSON object with the fields generate_data.py writes, non-empty token ids inside
the teacher's vocabulary, and token ids not already kept (an identical sequence, e.g. from overlapping
shard runs, is a duplicate). Other lines are skipped and counted. Shards from different teachers (their
`teacher` identities differ) are refused: their token ids mean different things; so are shards generated
with different sampling settings (length, seed, ...), unless the user allows it. Shards are only read; the
output is written beside itself and renamed into place, so an interrupted merge leaves no half file.

`heldout` moves every sequence of N start tokens into a second file, so a held-out evaluation never shares a
start token (hence a prompt) with training.

Shards generated with --save-topk K carry the teacher's top-K rows in a side file; the merge copies the rows of the
lines it keeps into a store beside each output (utils/data/teacher_topk.py), in the same order, for
train.py --teacher cached.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from utils.data.records import SequenceRecord, TeacherIdentity
from utils.data.teacher_topk import (append_rows, describe_rows, next_rows, read_rows, remove_store, side_file,
                                     store_writer)
from utils.safety import atomic_file, file_sha256

logger = logging.getLogger(__name__)

LOCATIONS_SHOWN = 5
SHARD_PATTERN = "shard-*.jsonl"  # what generate_data.py writes (utils.data.synthesis.shard_path)


class MixedTeachersError(ValueError):
    pass


class MixedSettingsError(ValueError):
    pass


def find_shard_files(inputs: list[str], exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Directories give their shard-*.jsonl files; other arguments are files or glob patterns. The files in `exclude`
    (what the merge writes) are left out where a glob finds them, e.g. the all.jsonl of an earlier merge in
    'gen_data/*.jsonl'; named as an input, or a shard file, one would be overwritten: refused."""
    excluded = {p.resolve() for p in exclude}
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob(SHARD_PATTERN))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item))
        if not found:
            raise FileNotFoundError(f"no shard files at {item}; pass the directory generate_data.py wrote "
                                    "(default gen_data/), shard files, or a glob such as 'gen_data/shard-*.jsonl'")
        for file in found:
            if file.resolve() in excluded and (path.is_file() or file.match(SHARD_PATTERN)):
                other = file.with_name("merged.jsonl" if file.name == "all.jsonl" else "all.jsonl")
                raise ValueError(f"{file} is one of the inputs and would be overwritten by this merge; pass an "
                                 f"--output that is not an input, e.g. {other}")
        files.extend(found)
    return list(dict.fromkeys(f for f in files if f.resolve() not in excluded))


def sequence_digest(ids: list[int]) -> bytes:
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).digest()


def heldout_start_tokens(start_tokens: set[int], count: int, seed: int) -> set[int]:
    """The `count` start tokens with the largest seeded hash: the same choice whatever the shard order."""
    if count >= len(start_tokens):
        raise ValueError(f"--heldout {count} would leave no start token for training (the shards have "
                         f"{len(start_tokens)}); pass fewer than {len(start_tokens)}")
    def rank(token):
        return hashlib.sha256(f"{seed}:{token}".encode()).digest()
    return set(sorted(start_tokens, key=rank, reverse=True)[:count])


@dataclass
class SplitStatistics:
    lengths: list[int] = field(default_factory=list)
    start_tokens: set[int] = field(default_factory=set)

    def add(self, record: SequenceRecord):
        self.lengths.append(len(record.input_ids))
        self.start_tokens.add(record.start_token)

    def describe(self) -> str:
        if not self.lengths:
            return "0 sequences"
        lengths = self.lengths
        return (f"{len(lengths):,} sequences, {sum(lengths):,} tokens, length mean {sum(lengths) / len(lengths):.1f} "
                f"min {min(lengths)} max {max(lengths)}, {len(self.start_tokens):,} distinct start tokens")


@dataclass
class MergeReport:
    malformed: list[str] = field(default_factory=list)  # "file:line"
    duplicates: int = 0
    train: SplitStatistics = field(default_factory=SplitStatistics)
    heldout: SplitStatistics = field(default_factory=SplitStatistics)
    teacher: TeacherIdentity | None = None
    settings: list[str] = field(default_factory=list)  # the sampling settings met, in order
    topk: int | None = None  # K of the kept lines' teacher top-K rows; 0 when they have none
    tail: int = 0  # S, their tail samples

    @property
    def kept(self) -> int:
        return len(self.train.lengths) + len(self.heldout.lengths)

    def summary(self) -> str:
        """One line: `kept 9,412; 3 malformed (file:line, ...); 11 duplicates`."""
        shown = ", ".join(self.malformed[:LOCATIONS_SHOWN])
        more = f", ... {len(self.malformed) - LOCATIONS_SHOWN} more" if len(self.malformed) > LOCATIONS_SHOWN else ""
        malformed = f"{len(self.malformed):,} malformed" + (f" ({shown}{more})" if self.malformed else "")
        return f"kept {self.kept:,}; {malformed}; {self.duplicates:,} duplicates"


def heldout_file(output: str | Path) -> Path:
    """Where the held-out sequences go: `heldout.jsonl` beside the merged training file."""
    return Path(output).parent / "heldout.jsonl"


def refuse_overwrite(path: Path, force: bool):
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose another --output")


def merge_shards(files: list[Path], output: Path, force: bool = False, heldout: int = 0,
                 seed: int = 0, allow_mixed_settings: bool = False) -> MergeReport:
    """Write the valid, distinct lines of `files` to `output` (and `heldout.jsonl` beside it when `heldout`), with
    their teacher top-K rows when the shards have them. Shards of one teacher only, and of one sampling setting unless
    `allow_mixed_settings`."""
    output = Path(output)
    heldout_path = heldout_file(output)
    refuse_overwrite(output, force)
    if heldout:
        refuse_overwrite(heldout_path, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Pass 1 keeps the lines (and rows) in files that vanish with us; pass 2 splits them once every start token is
    # known (held-out start tokens need all of them).
    with (tempfile.TemporaryFile("w+", dir=output.parent) as kept,
          tempfile.TemporaryFile("w+b", dir=output.parent) as kept_rows):
        report = validate_shards(files, kept, allow_mixed_settings, kept_rows)
        kept.seek(0)
        kept_rows.seek(0)
        split(kept, kept_rows, output, heldout_path if heldout else None, heldout, seed, report)
    return report


def validate_shards(files: list[Path], kept: IO[str], allow_mixed_settings: bool,
                    kept_rows: IO[bytes] | None = None) -> MergeReport:
    """Write the valid, distinct lines of `files` to `kept`, and their top-K rows to `kept_rows`; ValueError if there
    is none, or if some kept lines have top-K rows and others not (or another K)."""
    report = MergeReport()
    seen = set()
    teacher_file, settings_file, topk_file = None, None, None
    for path in files:
        with path.open() as f:
            for line_number, line in enumerate(f, 1):
                location = f"{path.name}:{line_number}"
                try:
                    record = SequenceRecord.from_line(line)
                except ValueError as err:
                    logger.warning("Skipping %s: %s", location, err)
                    report.malformed.append(location)
                    continue
                if report.teacher is None:
                    report.teacher, teacher_file = record.teacher, path
                elif record.teacher != report.teacher:
                    raise MixedTeachersError(
                        f"{location} comes from teacher {record.teacher} but {teacher_file} from "
                        f"{report.teacher}; merge the shards of one teacher at a time")
                if not report.settings:
                    report.settings, settings_file = [record.sampling], path
                elif record.sampling not in report.settings:
                    if not allow_mixed_settings:
                        raise MixedSettingsError(
                            f"{location} was generated with '{record.sampling}' but {settings_file} with "
                            f"'{report.settings[0]}'; merge one setting at a time, or pass --allow-mixed-settings")
                    report.settings.append(record.sampling)
                digest = sequence_digest(record.input_ids)
                if digest in seen:
                    report.duplicates += 1
                    continue
                k, tail = (record.topk[0], record.topk[2]) if record.topk else (0, 0)
                if report.topk is None:
                    report.topk, report.tail, topk_file = k, tail, path
                elif (k, tail) != (report.topk, report.tail):
                    raise MixedSettingsError(
                        f"{location} has {describe_rows(k, tail)} teacher rows but {topk_file} "
                        f"{describe_rows(report.topk, report.tail)}; merge shards generated with one --save-topk "
                        "and --save-tail at a time")
                seen.add(digest)
                report.train.add(record)
                kept.write(line if line.endswith("\n") else line + "\n")
                if k and kept_rows is not None:
                    width = record.topk_width
                    append_rows(kept_rows, [read_rows(side_file(path), record.topk[1], len(record.input_ids), width)],
                                width)
    if not report.kept:
        raise ValueError(f"no valid line in {len(files)} shard file(s); check them with generate_data.py")
    return report


def split(kept: IO[str], kept_rows: IO[bytes], output: Path, heldout_path: Path | None, count: int, seed: int,
          report: MergeReport):
    """Pass 2: sequences of the held-out start tokens go to `heldout_path`, the rest to `output`; each file's lines'
    top-K rows to its store."""
    held = heldout_start_tokens(report.train.start_tokens, count, seed) if heldout_path else set()
    report.train, report.heldout = SplitStatistics(), SplitStatistics()
    outputs = [output] + ([heldout_path] if heldout_path else [])
    k, tail = report.topk, report.tail
    with ExitStack() as stack:
        files = [stack.enter_context(atomic_file(path)) for path in outputs]
        stores = [stack.enter_context(store_writer(path, k, tail)) for path in outputs] if k else []
        for line in kept:
            record = SequenceRecord.from_line(line)
            held_out = record.start_token in held
            (report.heldout if held_out else report.train).add(record)
            files[held_out].write(line)
            if k:
                stores[held_out].add(next_rows(kept_rows, len(record.input_ids), k + tail))
        for file in files:  # the stores name the files' digests, so the files are complete before the stores are
            file.flush()
        for store, file in zip(stores, files):
            store.finish(file_sha256(Path(file.name)))
    if not k:
        for path in outputs:
            remove_store(path)

