"""The start-token plan of data-free synthesis (paper section 2.1): which vocabulary tokens start a sequence, and
which of them each shard takes. Every process computes the same plan from the same arguments, so shards need no
communication.
"""
from __future__ import annotations

import os
import random

PAPER_NUM_SHARDS = 64  # the released code's 64 GPUs, kept for the positional `generate_data.py i` form


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
