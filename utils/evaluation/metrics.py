"""Offline fidelity metrics: numbers that need no benchmark download.

- `perplexity(model, sequences)`: exp of the mean next-token negative log-likelihood over every predicted token.
- `teacher_fidelity(student, teacher, sequences)`: per-token KL(teacher || student) of the next-token
  distributions (the distillation loss of paper section 2.3, measured on held-out data) and how often the
  student's top-1 token equals the teacher's.

Sequences are lists of token ids: `token_sequences` makes them from a string, a text file or a `.jsonl` file
of generated sequences (`input_ids` when a line has them, else its `text` tokenized).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.data.dataset import PadCollator, read_token_sequences

logger = logging.getLogger(__name__)

# A short built-in English paragraph: perplexity on it is the quickest check that quantization hurt or not.
DEFAULT_TEXT = (
    "The river starts as a thin stream high in the mountains, fed by snow that melts slowly through the spring. "
    "As it travels down the valley, smaller streams join it, and by the time it reaches the first town it is wide "
    "enough for boats. For centuries the people who lived along its banks used it to carry wood, grain and stone "
    "to the markets by the sea. Today most goods travel by road and rail, but the river still matters: it waters "
    "the farms, it turns the wheels of a small power station, and in the summer children swim in its quiet bends "
    "while their parents fish from the old stone bridge."
)


def token_sequences(tokenizer, path: str | Path | None = None, max_length: int = 2048, teacher=None,
                    vocab_size: int | None = None) -> list[list[int]]:
    """Token id lists from a `.jsonl` file of sequences (checked as `utils.data.dataset.read_token_sequences` does,
    against `teacher` and `vocab_size`) or any other text file; no path means `DEFAULT_TEXT`. Sequences longer than
    `max_length` are cut into consecutive windows."""
    if max_length < 2:
        raise ValueError(f"--max-length {max_length} must be at least 2: perplexity needs a token to predict")
    if path is None:
        sequences = [tokenizer(DEFAULT_TEXT)["input_ids"]]
    elif Path(path).suffix == ".jsonl":
        sequences = read_token_sequences(path, tokenizer, teacher, vocab_size)
    elif Path(path).is_file():
        sequences = [tokenizer(Path(path).read_text())["input_ids"]]
    else:
        raise FileNotFoundError(f"text file {path} does not exist; pass an existing text or .jsonl file")
    windows = [ids[start:start + max_length] for ids in sequences for start in range(0, len(ids), max_length)]
    windows = [ids for ids in windows if len(ids) >= 2]  # a single token predicts nothing
    if not windows:
        raise ValueError(f"{path or 'the text'} is too short: perplexity needs at least two tokens")
    return windows


def _batches(sequences: list[list[int]], batch_size: int, pad_token_id: int, device):
    """Right-padded [batch, longest] ids and masks. Longest first, so a batch holds sequences of similar length."""
    ordered = sorted(sequences, key=len, reverse=True)
    collate = PadCollator(pad_token_id)
    for start in range(0, len(ordered), batch_size):
        batch = collate([{"input_ids": seq} for seq in ordered[start:start + batch_size]])
        yield batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _next_token_logits(model, ids, mask):
    """Float32 logits at every position that has a next token inside the sequence, with that target and mask."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return logits, ids[:, 1:], mask[:, 1:].bool()


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, sequences: list[list[int]], batch_size: int = 4, pad_token_id: int = 0,
               desc: str = "perplexity") -> float:
    """exp(total NLL / number of predicted tokens) over all sequences (padding excluded)."""
    total_nll, total_tokens = 0.0, 0
    batches = _batches(sequences, batch_size, pad_token_id, _device(model))
    for ids, mask in tqdm(batches, total=math.ceil(len(sequences) / batch_size), desc=desc, unit="batch"):
        logits, targets, predicted = _next_token_logits(model, ids, mask)
        # Rows of [tokens, vocab]: log-softmax over the last, contiguous dim is the accurate path on CPU.
        total_nll += F.cross_entropy(logits[predicted], targets[predicted], reduction="sum").item()
        total_tokens += int(predicted.sum())
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def teacher_fidelity(student, teacher, sequences: list[list[int]], batch_size: int = 4,
                     pad_token_id: int = 0) -> dict[str, float]:
    """How closely the student follows the teacher on the same tokens: mean per-token KL(teacher || student)
    in nats, top-1 agreement in [0, 1], and both models' perplexities (one forward pass each per batch)."""
    sums = dict(kl=0.0, agree=0, student_nll=0.0, teacher_nll=0.0)
    total_tokens = 0
    batches = _batches(sequences, batch_size, pad_token_id, _device(student))
    for ids, mask in tqdm(batches, total=math.ceil(len(sequences) / batch_size), desc="KL to teacher", unit="batch"):
        student_logits, targets, predicted = _next_token_logits(student, ids, mask)
        teacher_logits, _, _ = _next_token_logits(teacher, ids.to(_device(teacher)), mask.to(_device(teacher)))
        teacher_logits = teacher_logits.to(student_logits.device)
        student_logp = F.log_softmax(student_logits[predicted], dim=-1)
        teacher_logp = F.log_softmax(teacher_logits[predicted], dim=-1)
        sums["kl"] += F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum").item()
        sums["agree"] += int((student_logp.argmax(-1) == teacher_logp.argmax(-1)).sum())
        target_ids = targets[predicted].unsqueeze(-1)
        sums["student_nll"] -= student_logp.gather(-1, target_ids).sum().item()
        sums["teacher_nll"] -= teacher_logp.gather(-1, target_ids).sum().item()
        total_tokens += int(predicted.sum())
    return {
        "kl_to_teacher": sums["kl"] / total_tokens,
        "top1_agreement": sums["agree"] / total_tokens,
        "heldout_perplexity": math.exp(sums["student_nll"] / total_tokens),
        "teacher_heldout_perplexity": math.exp(sums["teacher_nll"] / total_tokens),
        "heldout_tokens": total_tokens,
    }
