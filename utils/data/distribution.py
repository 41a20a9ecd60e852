"""Whether two sets of generated sequences come from one distribution: the HF and vLLM engines cannot give the same
tokens (other kernels round otherwise, and they draw other random numbers), so their outputs on one plan are compared
by statistics, against the spread between two seeds of one engine.

Statistics of a set of (token ids, greedy length) samples, with the teacher's logits:
  - nll: the teacher's mean negative log-likelihood per generated token (nats): how likely the teacher finds the text;
  - distinct_1, distinct_2: distinct n-grams over all n-grams of the set, its diversity;
  - lengths: where sequences end (a stop token or the maximum length);
  - the first sampled token (the one after the greedy prefix) and its rank among the teacher's tokens there (0: the
    top-1), where the temperature and the top-k act first;
  - calibration: every sampled token's place in the distribution it was to be drawn from (softmax(logits /
    temperature) over the top k), u = P(a likelier token) + v * P(this token) with v uniform, is uniform on [0, 1]
    exactly when the tokens were drawn from that distribution (the randomized probability integral transform); its
    Kolmogorov-Smirnov distance from uniform is about 1 / sqrt(sampled tokens) then, whatever the teacher.
Gaps between two sets: absolute differences of the numbers, the Kolmogorov-Smirnov distance of the lengths, and the
total variation distance of the first sampled tokens and of their ranks.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.data.sampler import SamplingConfig

KOLMOGOROV_1_PERCENT = 1.628  # sqrt(n) * KS distance from the true distribution exceeds it with probability 1%


@dataclass(frozen=True)
class SampleStatistics:
    nll: float
    distinct_1: float
    distinct_2: float
    lengths: tuple[int, ...]
    first_tokens: Counter
    first_ranks: Counter
    calibration: float  # KS distance of the sampled tokens' probability integral transforms from uniform
    sampled_tokens: int

    def calibrated(self) -> bool:
        """The sampled tokens pass the KS test of being drawn from the configured distribution at the 1% level."""
        return self.calibration * self.sampled_tokens ** 0.5 < KOLMOGOROV_1_PERCENT


def distinct_n(sequences: list[list[int]], n: int) -> float:
    grams = [tuple(ids[i:i + n]) for ids in sequences for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def probability_integral_transform(logits: torch.Tensor, tokens: torch.Tensor, config: SamplingConfig,
                                   noise: torch.Generator) -> torch.Tensor:
    """u of each token (rows of `logits` predict `tokens`) under softmax(logits / temperature) over the top k; a token
    outside the top k gets 1, past the least likely one."""
    values, indices = logits.topk(config.top_k or logits.shape[-1], dim=-1)
    probabilities = torch.softmax(values / config.temperature, dim=-1)
    hits = indices == tokens[:, None]
    rank = hits.float().argmax(dim=-1, keepdim=True)
    chosen = probabilities.gather(1, rank)[:, 0]
    likelier = probabilities.cumsum(dim=-1).gather(1, rank)[:, 0] - chosen
    u = likelier + torch.rand(len(tokens), generator=noise, dtype=likelier.dtype).to(likelier.device) * chosen
    return torch.where(hits.any(dim=-1), u, torch.ones_like(u)).cpu()


def uniform_ks(values: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the values' empirical distribution from uniform on [0, 1]."""
    values, n = values.sort().values, len(values)
    steps = torch.arange(n + 1, dtype=values.dtype) / n
    return max((steps[1:] - values).max().item(), (values - steps[:-1]).max().item()) if n else 0.0


@torch.no_grad()
def sample_statistics(teacher, samples: list[tuple[list[int], int]], config: SamplingConfig) -> SampleStatistics:
    """`samples`: (token ids, greedy length) of each sequence, as a shard's records hold them; `config`: the
    temperature and top-k they were to be sampled with."""
    noise = torch.Generator().manual_seed(0)  # v: fixed, so the same samples give the same statistics
    nll, tokens, first_tokens, first_ranks, transforms = 0.0, 0, Counter(), Counter(), []
    for ids, greedy_tokens in samples:
        logits = teacher(input_ids=torch.tensor([ids], device=teacher.device)).logits[0, :-1].float()
        targets = torch.tensor(ids[1:], device=logits.device)
        nll -= F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
        tokens += len(ids) - 1
        if len(ids) > greedy_tokens:
            first = ids[greedy_tokens]
            first_tokens[first] += 1
            first_ranks[int((logits[greedy_tokens - 1] > logits[greedy_tokens - 1, first]).sum())] += 1
            sampled = slice(greedy_tokens - 1, None)  # the rows that predict the sampled tokens
            transforms.append(probability_integral_transform(logits[sampled], targets[sampled], config, noise))
    sequences = [ids for ids, _ in samples]
    transforms = torch.cat(transforms) if transforms else torch.empty(0)
    return SampleStatistics(nll / max(1, tokens), distinct_n(sequences, 1), distinct_n(sequences, 2),
                            tuple(len(ids) for ids in sequences), first_tokens, first_ranks, uniform_ks(transforms),
                            len(transforms))


def total_variation(a: Counter, b: Counter) -> float:
    total_a, total_b = max(1, sum(a.values())), max(1, sum(b.values()))
    return 0.5 * sum(abs(a[key] / total_a - b[key] / total_b) for key in a.keys() | b.keys())


def kolmogorov_smirnov(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """The largest gap between the two empirical distribution functions."""
    return max(abs(sum(x <= value for x in a) / len(a) - sum(x <= value for x in b) / len(b))
               for value in set(a) | set(b))


def distribution_gaps(a: SampleStatistics, b: SampleStatistics) -> dict[str, float]:
    return {"nll": abs(a.nll - b.nll), "distinct_1": abs(a.distinct_1 - b.distinct_1),
            "distinct_2": abs(a.distinct_2 - b.distinct_2), "length_ks": kolmogorov_smirnov(a.lengths, b.lengths),
            "first_token_tv": total_variation(a.first_tokens, b.first_tokens),
            "first_rank_tv": total_variation(a.first_ranks, b.first_ranks)}
