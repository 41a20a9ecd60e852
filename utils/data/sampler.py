"""The batched hybrid sampler of data-free synthesis (paper section 2.1): the teacher writes its own training text.

Every sequence starts from one vocabulary token as the whole prompt. As in the released code, each start
token gives three sequences whose first 3, 4 and 5 tokens (start token included) are greedy (top-1) and
whose rest is sampled from the teacher's softmax (temperature 1, top-k 50) up to 2048 tokens: the
"hybrid" sampling the paper found best.

Faster than the released one-`generate`-call-per-sequence loop: a batch holds sequences with the same greedy
length, so all prompts have one token and no padding; one forward with the KV cache extends every row by a
token; rows that emit EOS leave the batch (and the cache).

Reproducible: the random numbers of a sequence are drawn from its own generator, seeded by (seed, start token,
greedy length), so a sequence's tokens do not depend on its batch or its shard (up to floating-point rounding of
different batch shapes).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from models.rotations import head_dim
from utils.data.teacher_topk import SequenceTopK, check_k

Generated = tuple[list[list[int]], list[SequenceTopK] | None]  # sequences, and their top-K rows when kept


@dataclass(frozen=True)
class SamplingConfig:
    greedy_lengths: tuple[int, ...] = (3, 4, 5)  # tokens chosen top-1, start token included
    max_length: int = 2048  # tokens per sequence, start token included
    temperature: float = 1.0
    top_k: int = 50  # 0 = sample from the whole vocabulary
    seed: int = 0
    save_topk: int = 0  # K > 0: keep the teacher's K most likely tokens at every position (utils/data/teacher_topk.py)
    save_tail: int = 0  # S > 0: and S tokens drawn from the teacher's distribution outside those K

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
        check_k(self.save_topk, self.save_tail)

    def describe(self, engine: str = "hf") -> str:
        """Recorded in every line, so a rerun with other settings, or with the other engine, cannot silently extend a
        shard. The HF engine goes unnamed: its shards were written before there was another."""
        greedy = ",".join(map(str, self.greedy_lengths))
        named = "" if engine == "hf" else f" engine={engine}"
        cached = (f" save_topk={self.save_topk}" if self.save_topk else "") + (
            f" save_tail={self.save_tail}" if self.save_tail else "")
        return (f"greedy={greedy} max_length={self.max_length} temperature={self.temperature:g} "
                f"top_k={self.top_k} seed={self.seed}{named}{cached}")


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
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element_size = next(model.parameters()).element_size()
    kv_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim(config) * max_length * element_size
    free_bytes, _ = torch.cuda.mem_get_info(device)
    fitting = max(1, int(free_bytes * 0.5 // kv_bytes))
    return min(256, 1 << (fitting.bit_length() - 1))


def sequence_seed(seed: int, start_token: int, greedy_tokens: int, purpose: str = "") -> int:
    digest = hashlib.sha256(f"{seed}:{start_token}:{greedy_tokens}{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes 63 bits


def sequence_uniforms(start_tokens: list[int], greedy_tokens: int, config: SamplingConfig, per_step: int = 1,
                      purpose: str = "") -> torch.Tensor:
    """[rows, max_length, per_step] uniforms; row r's come from its own generator, so they do not depend on the
    batch. The tail samples draw theirs for another `purpose`, so keeping them leaves the text as it is."""
    rows = []
    for token in start_tokens:
        generator = torch.Generator().manual_seed(sequence_seed(config.seed, token, greedy_tokens, purpose))
        rows.append(torch.rand(config.max_length, per_step, generator=generator))
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


def sample_tail(log_probs: torch.Tensor, top_ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[rows, S] tokens drawn with replacement from softmax restricted to the tokens outside `top_ids` (the
    teacher's full distribution, temperature 1: the KD target, not the sampling filter), by inverse CDF."""
    rest = log_probs.exp().scatter(-1, top_ids, 0)
    cdf = rest.cumsum(dim=-1)
    # right=True skips the zeroed top-K tokens, whose CDF equals their predecessor's
    choice = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    return choice.clamp(max=log_probs.shape[-1] - 1)


@torch.no_grad()
def generate_batch(model, start_tokens: list[int], greedy_tokens: int, config: SamplingConfig,
                   stop_tokens: set[int] = frozenset()) -> Generated:
    """One sequence per start token: `greedy_tokens` top-1 tokens (start token included), then sampled tokens
    up to `config.max_length`. A row stops after emitting a stop token (kept, as `generate` keeps EOS).
    With `config.save_topk`, also each sequence's top-K rows: the distribution every step computed anyway, and with
    `config.save_tail` its tail samples after them."""
    device = model.device
    uniforms = sequence_uniforms(start_tokens, greedy_tokens, config)[..., 0].to(device)
    sequences = [[token] for token in start_tokens]
    k, tail = config.save_topk, config.save_tail
    topk = [SequenceTopK.empty(config.max_length, k + tail) for _ in start_tokens] if k else None
    if tail:
        tail_uniforms = sequence_uniforms(start_tokens, greedy_tokens, config, tail, ":tail").to(device)
    active = list(range(len(start_tokens)))  # batch row -> index in `sequences`
    active_rows = torch.arange(len(start_tokens), device=device)  # the same, on the device
    next_tokens = torch.tensor(start_tokens, device=device)
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    cache = DynamicCache()
    for position in range(1, config.max_length):
        logits = model(input_ids=next_tokens.unsqueeze(1), cache=cache, use_cache=True).logits[:, -1]
        if k:  # the row of position - 1: the distribution the token at `position` comes from
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            values, indices = log_probs.topk(k, dim=-1)
            if tail:
                drawn = sample_tail(log_probs, indices, tail_uniforms[active_rows, position - 1])
                values, indices = torch.cat([values, log_probs.gather(-1, drawn)], -1), torch.cat([indices, drawn], -1)
            for row, ids, logprobs in zip(active, indices.cpu().numpy(), values.cpu().numpy()):
                topk[row].ids[position - 1], topk[row].logprobs[position - 1] = ids, logprobs
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
    if topk:
        topk = [SequenceTopK(rows.ids[:len(ids)], rows.logprobs[:len(ids)]) for rows, ids in zip(topk, sequences)]
    return sequences, topk


@dataclass
class HFGenerator:
    """The batched sampler as synthesis's engine (utils/data/synthesis.py): `generator(start_tokens, greedy_tokens)`
    returns one batch of sequences (and their top-K rows). utils/data/vllm_engine.py's `VLLMGenerator` is the other engine."""

    model: torch.nn.Module
    config: SamplingConfig
    stop_tokens: set[int]
    engine: ClassVar[str] = "hf"

    def __call__(self, start_tokens: list[int], greedy_tokens: int) -> Generated:
        return generate_batch(self.model, start_tokens, greedy_tokens, self.config, self.stop_tokens)


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """The EOS ids `generate` would stop on: the teacher's generation config's, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
