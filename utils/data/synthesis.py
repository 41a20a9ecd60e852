"""One shard of data-free synthesis (paper section 2.1) written to its file: locked, resumable, append-only.

The batches of a shard are fixed by its start tokens and the batch size, so an interrupted and resumed run computes
exactly what an uninterrupted one does. The shard file is appended line by line and flushed per batch; a rerun drops
a half-written last line and skips the sequences written. Only one process writes a shard at a time (a lock file).
The sequences come from the batched hybrid sampler (utils/data/sampler.py), the start tokens from the plan
(utils/data/start_tokens.py).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from tqdm import tqdm

from utils.data.records import SequenceRecord, TeacherIdentity
from utils.data.sampler import SamplingConfig, generate_batch, stop_token_ids
from utils.safety import ensure_writable_dir, file_lock

logger = logging.getLogger(__name__)


def shard_path(output_dir: str | Path, shard: int, num_shards: int) -> Path:
    return Path(output_dir) / f"shard-{shard:02d}-of-{num_shards:02d}.jsonl"


def read_finished(path: Path, teacher: TeacherIdentity, settings: str) -> set[tuple[int, int]]:
    """(start token, greedy length) of every complete line already in `path`. A half-written last line (the
    process was killed while writing it) is cut off the file, so appending continues on a line boundary."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        logger.warning("%s ends with a half-written line (%d bytes); dropping it", path, len(data) - complete)
        with path.open("r+b") as f:
            f.truncate(complete)
    finished = set()
    for line_number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            record = SequenceRecord.from_line(line)
        except ValueError:
            raise ValueError(f"{path}:{line_number} is not a line this tool wrote; move {path} away or "
                             "pick another --output-dir") from None
        if record.teacher != teacher or record.sampling != settings:
            raise ValueError(f"{path} was written by {record.teacher} with '{record.sampling}', but this run uses "
                             f"{teacher} with '{settings}'; pass another --output-dir or delete {path}")
        finished.add((record.start_token, record.greedy_tokens))
    return finished


def shard_lock(path: Path):
    """Only one process writes a shard: a second identical run would append every sequence again."""
    return file_lock(path.with_name(path.name + ".lock"),
                     busy=f"another generate_data.py is writing {path}; wait for it to finish, or pass another "
                          "--output-dir or --shard")


def plan_batches(start_tokens: list[int], greedy_lengths: tuple[int, ...], batch_size: int):
    """Batches of (greedy length, start tokens): every start token's sequences come close together, so an
    interrupted shard is mostly whole start tokens, and only a shard's last batches run short."""
    for begin in range(0, len(start_tokens), batch_size):
        chunk = start_tokens[begin:begin + batch_size]
        for greedy_tokens in greedy_lengths:
            yield greedy_tokens, chunk


def synthesize_shard(model, tokenizer, start_tokens: list[int], path: Path, config: SamplingConfig,
                     batch_size: int, shard: int, num_shards: int, teacher: TeacherIdentity) -> int:
    """Write every (start token, greedy length) sequence of this shard that `path` does not hold yet.
    Returns the number of sequences written by this call."""
    config.check()
    settings = config.describe()
    ensure_writable_dir(path.parent)
    with shard_lock(path):
        finished = read_finished(path, teacher, settings)
        # A batch with any sequence missing runs whole, so resuming repeats the exact computation of an
        # uninterrupted run; only the missing lines are written.
        batches = []
        for greedy_tokens, chunk in plan_batches(start_tokens, config.greedy_lengths, batch_size):
            missing = {token for token in chunk if (token, greedy_tokens) not in finished}
            if missing:
                batches.append((greedy_tokens, chunk, missing))
        todo = sum(len(missing) for _, _, missing in batches)
        total = len(start_tokens) * len(config.greedy_lengths)
        logger.info("Shard %d of %d: %d start tokens, %d sequences (%d already in %s), batch size %d",
                    shard, num_shards, len(start_tokens), total, total - todo, path, batch_size)
        stop_tokens = stop_token_ids(model, tokenizer)
        generated_tokens, began = 0, time.perf_counter()
        with path.open("a") as out, tqdm(total=todo, unit="seq", desc=f"shard {shard}") as progress:
            for greedy_tokens, chunk, missing in batches:
                sequences = generate_batch(model, chunk, greedy_tokens, config, stop_tokens)
                written = [ids for ids in sequences if ids[0] in missing]
                for ids in written:
                    out.write(SequenceRecord(ids, ids[0], greedy_tokens, shard, num_shards, teacher, settings,
                                             tokenizer.decode(ids)).to_line())
                out.flush()
                os.fsync(out.fileno())  # a batch on disk survives a crash; a later kill can only cut the last line
                generated_tokens += sum(len(ids) - 1 for ids in sequences)
                progress.update(len(written))
                progress.set_postfix(tok_per_s=f"{generated_tokens / (time.perf_counter() - began):.0f}")
    logger.info("Wrote %d sequences (%d generated tokens) to %s", todo, generated_tokens, path)
    return todo
