"""Data-free synthesis (paper section 2.1): the teacher writes its own training text.

Every sequence starts from one vocabulary token as the whole prompt. As in the released code, each start
token gives three sequences whose first 3, 4 and 5 tokens (start token included) are greedy (top-1) and
whose rest is sampled from the teacher's softmax (temperature 1, top-k 50) up to 2048 tokens: the
"hybrid" sampling the paper found best.

Faster than the released one-`generate`-call-per-sequence loop: a batch holds sequences with the same greedy
length, so all prompts have one token and no padding; one forward with the KV cache extends every row by a
token; rows that emit EOS leave the batch (and the cache).

Reproducible and resumable: the random numbers of a sequence are drawn from its own generator, seeded by
(seed, start token, greedy length), so a sequence's tokens do not depend on its batch or its shard (up to
floating-point rounding of different batch shapes). The batches themselves are fixed by the plan, so an
interrupted and resumed run computes exactly what an uninterrupted one does. A shard file is appended line
by line and flushed per batch; a rerun drops a half-written last line and skips the sequences written.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from utils.cli import ensure_writable_dir
from utils.records import SequenceRecord, TeacherIdentity

logger = logging.getLogger(__name__)

# Values a preset fills in for the flags the user left out. "paper" = the released code's run.
PRESETS = {
    "paper": {"num_start_tokens": None, "max_length": 2048},
    "quick": {"num_start_tokens": 16, "max_length": 128},
}
PAPER_NUM_SHARDS = 64  # the released code's 64 GPUs, kept for the positional `generate_data.py i` form


@dataclass(frozen=True)
class SamplingConfig:
    greedy_lengths: tuple[int, ...] = (3, 4, 5)  # tokens chosen top-1, start token included
    max_length: int = 2048  # tokens per sequence, start token included
    temperature: float = 1.0
    top_k: int = 50  # 0 = sample from the whole vocabulary
    seed: int = 0

    def check(self):
        if not self.greedy_lengths or min(self.greedy_lengths) < 1:
            raise ValueError("--greedy-lengths must be positive integers, e.g. --greedy-lengths 3 4 5")
        if self.max_length < max(self.greedy_lengths):
            raise ValueError(f"--max-length {self.max_length} is shorter than the greedy prefix "
                             f"{max(self.greedy_lengths)}; raise --max-length or lower --greedy-lengths")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature {self.temperature} must be a finite number > 0 (paper: 1)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be 0 or more (paper: 50; 0 = no top-k filter)")

    def describe(self) -> str:
        """Recorded in every line, so a rerun with other settings cannot silently extend a shard."""
        greedy = ",".join(map(str, self.greedy_lengths))
        return (f"greedy={greedy} max_length={self.max_length} temperature={self.temperature:g} "
                f"top_k={self.top_k} seed={self.seed}")


# ---- which start tokens, and which of them this shard takes ----

def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def eligible_start_tokens(tokenizer, vocab_size: int, include_special: bool = False) -> list[int]:
    """Every id both the tokenizer and the model know. Special tokens (EOS, chat markers) are left out by
    default: a sequence that starts with EOS or a chat header is not the plain text the paper trains on."""
    limit = min(len(tokenizer), vocab_size)
    excluded = set() if include_special else special_token_ids(tokenizer)
    return [i for i in range(limit) if i not in excluded]


def choose_start_tokens(eligible: list[int], token_range: tuple[int, int] | None = None,
                        num_tokens: int | None = None, seed: int = 0) -> list[int]:
    """All eligible tokens, those in the half-open range [A, B), or a seeded random subset of n of them.
    Every shard computes the same list, so no communication is needed."""
    if token_range is not None:
        low, high = token_range
        if not 0 <= low < high:
            raise ValueError(f"--start-token-range {low} {high} is empty or negative; pass A B with 0 <= A < B")
        chosen = [i for i in eligible if low <= i < high]
        if not chosen:
            raise ValueError(f"--start-token-range {low} {high} holds no usable token (vocabulary ids end at "
                             f"{eligible[-1]}); pick a range inside the vocabulary")
        return chosen
    if num_tokens is not None:
        if not 0 < num_tokens <= len(eligible):
            raise ValueError(f"--num-start-tokens {num_tokens} is out of range; pass 1..{len(eligible)}")
        return sorted(random.Random(seed).sample(eligible, num_tokens))
    return list(eligible)


def shard_start_tokens(start_tokens: list[int], shard: int, num_shards: int) -> list[int]:
    """Contiguous blocks, like the released code (GPU i took tokens i*500 ... i*500+499): disjoint, their
    union is the whole list, and their sizes differ by at most one."""
    check_shard(shard, num_shards)
    count = len(start_tokens)
    return start_tokens[shard * count // num_shards:(shard + 1) * count // num_shards]


def check_shard(shard: int, num_shards: int):
    if num_shards < 1:
        raise ValueError(f"--num-shards {num_shards} must be at least 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard index {shard} is out of range for {num_shards} shards; pass 0..{num_shards - 1}")


def resolve_shard(shard: int | None, num_shards: int | None, positional: int | None,
                  environ=os.environ) -> tuple[int, int]:
    """--shard/--num-shards, else the paper's positional `generate_data.py i` (64 shards), else the
    RANK/WORLD_SIZE that torchrun and accelerate set, else one shard."""
    if shard is not None and positional is not None and shard != positional:
        raise ValueError(f"shard given twice ({positional} and --shard {shard}); pass only one")
    shard = shard if shard is not None else positional
    if shard is not None:
        default_count = PAPER_NUM_SHARDS if positional is not None else 1
        num_shards = num_shards if num_shards is not None else default_count
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        shard = int(environ["RANK"])
        num_shards = num_shards if num_shards is not None else int(environ["WORLD_SIZE"])
    else:
        shard, num_shards = 0, num_shards if num_shards is not None else 1
    check_shard(shard, num_shards)
    return shard, num_shards


def shard_path(output_dir: str | Path, shard: int, num_shards: int) -> Path:
    return Path(output_dir) / f"shard-{shard:02d}-of-{num_shards:02d}.jsonl"


def apply_preset(args, cuda_available: bool) -> str:
    """Fill the flags the user left out (None) from a preset: "paper" on a GPU, "quick" (a small shard
    that finishes in about a minute) on CPU. An explicit flag always wins."""
    preset = args.preset or ("paper" if cuda_available else "quick")
    values = PRESETS[preset]
    if args.start_token_range is None and args.num_start_tokens is None and not args.all_start_tokens:
        args.num_start_tokens = values["num_start_tokens"]
    if args.max_length is None:
        args.max_length = values["max_length"]
    return preset


# ---- device and batch size ----

def resolve_device(device: str | None, environ=os.environ) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_batch_size(model, device: torch.device, max_length: int) -> int:
    """CPU: 32 rows already amortize the weights well on a few cores. GPU: as many rows as fit the KV cache
    of full-length sequences in half of the free memory, a power of two up to 256."""
    if device.type != "cuda":
        return 32
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element_size = next(model.parameters()).element_size()
    kv_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * max_length * element_size
    free_bytes, _ = torch.cuda.mem_get_info(device)
    fitting = max(1, int(free_bytes * 0.5 // kv_bytes))
    return min(256, 1 << (fitting.bit_length() - 1))


# ---- the batched hybrid sampler ----

def sequence_seed(seed: int, start_token: int, greedy_tokens: int) -> int:
    digest = hashlib.sha256(f"{seed}:{start_token}:{greedy_tokens}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes 63 bits


def sequence_uniforms(start_tokens: list[int], greedy_tokens: int, config: SamplingConfig) -> torch.Tensor:
    """[rows, max_length] uniforms; row r's come from its own generator, so they do not depend on the batch."""
    rows = []
    for token in start_tokens:
        generator = torch.Generator().manual_seed(sequence_seed(config.seed, token, greedy_tokens))
        rows.append(torch.rand(config.max_length, generator=generator))
    return torch.stack(rows)


def sample_top_k(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(logits / temperature) restricted to the top-k tokens: the same
    distribution as `generate(do_sample=True, top_k=k, temperature=t)`, driven by given uniforms."""
    if top_k:
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    cdf = torch.softmax(values / temperature, dim=-1).cumsum(dim=-1)
    choice = (cdf < uniforms.unsqueeze(1) * cdf[:, -1:]).sum(dim=-1).clamp(max=values.shape[-1] - 1)
    return indices.gather(1, choice.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def generate_batch(model, start_tokens: list[int], greedy_tokens: int, config: SamplingConfig,
                   stop_tokens: set[int] = frozenset()) -> list[list[int]]:
    """One sequence per start token: `greedy_tokens` top-1 tokens (start token included), then sampled tokens
    up to `config.max_length`. A row stops after emitting a stop token (kept, as `generate` keeps EOS)."""
    device = model.device
    uniforms = sequence_uniforms(start_tokens, greedy_tokens, config).to(device)
    sequences = [[token] for token in start_tokens]
    active = list(range(len(start_tokens)))  # batch row -> index in `sequences`
    active_rows = torch.arange(len(start_tokens), device=device)  # the same, on the device
    next_tokens = torch.tensor(start_tokens, device=device)
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    cache = DynamicCache()
    for position in range(1, config.max_length):
        logits = model(input_ids=next_tokens.unsqueeze(1), past_key_values=cache, use_cache=True).logits[:, -1]
        if position < greedy_tokens:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = sample_top_k(logits.float(), uniforms[active_rows, position], config.temperature,
                                       config.top_k)
        for row, token in zip(active, next_tokens.tolist()):
            sequences[row].append(token)
        finished = torch.isin(next_tokens, stop)
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.reorder_cache(keep)
            next_tokens, active_rows = next_tokens[keep], active_rows[keep]
            active = [active[i] for i in keep.tolist()]
    return sequences


def stop_token_ids(model, tokenizer) -> set[int]:
    """The EOS ids `generate` would stop on: the model's generation config, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


# ---- the append-only shard file ----

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


@contextmanager
def shard_lock(path: Path):
    """Only one process writes a shard: a second identical run would append every sequence again. The lock is
    the kernel's (flock), so a killed run never leaves it held."""
    lock_path = path.with_name(path.name + ".lock")
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another generate_data.py is writing {path}; wait for it to finish, or pass another "
                             "--output-dir or --shard") from None
        yield


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
