"""Offline fidelity metrics: perplexity and KL / top-1 agreement to the teacher, against direct computations."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models import quantize_model
from utils.evaluation.metrics import DEFAULT_TEXT, perplexity, teacher_fidelity, token_sequences


class CharTokenizer:
    """Enough of a tokenizer for token_sequences: one id per character, within the tiny vocabulary."""

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def direct_perplexity(model, sequences):
    """Each sequence alone (no padding), through the transformers loss."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            nll += model(input_ids=ids, labels=ids).loss.item() * (len(seq) - 1)
            count += len(seq) - 1
    return math.exp(nll / count)


def random_sequences(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def test_token_sequences_reads_jsonl_ids_or_text_and_cuts_windows(tmp_path):
    tokenizer = CharTokenizer()
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 7, 8, 9]}) + "\n" + json.dumps({"text": "abc"}) + "\n")
    assert token_sequences(tokenizer, data) == [[5, 6, 7, 8, 9], tokenizer("abc")["input_ids"]]
    assert token_sequences(tokenizer, data, max_length=2) == [[5, 6], [7, 8], tokenizer("ab")["input_ids"]]
    text = tmp_path / "notes.txt"
    text.write_text("hello world")
    assert token_sequences(tokenizer, text) == [tokenizer("hello world")["input_ids"]]
    assert token_sequences(tokenizer) == [tokenizer(DEFAULT_TEXT)["input_ids"]]


def test_token_sequences_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass an existing"):
        token_sequences(CharTokenizer(), tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(ValueError, match="at least two tokens"):
        token_sequences(CharTokenizer(), tmp_path / "one.txt")


def test_batched_perplexity_with_padding_equals_per_sequence_loss(tiny_llama, tiny_config):
    sequences = random_sequences([9, 4, 15, 7, 2], tiny_config.vocab_size)
    expected = direct_perplexity(tiny_llama, sequences)
    assert perplexity(tiny_llama, sequences, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_llama, sequences, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_teacher_fidelity_is_zero_kl_for_the_teacher_itself(tiny_llama, tiny_config):
    sequences = random_sequences([10, 6], tiny_config.vocab_size)
    result = teacher_fidelity(tiny_llama, copy.deepcopy(tiny_llama), sequences, batch_size=2)
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert result["heldout_tokens"] == 9 + 5
    assert result["heldout_perplexity"] == pytest.approx(result["teacher_heldout_perplexity"], rel=1e-6)


def test_teacher_fidelity_matches_direct_kl_and_agreement(tiny_llama, tiny_config):
    sequences = random_sequences([12, 8, 5], tiny_config.vocab_size, seed=3)
    student = quantize_model(copy.deepcopy(tiny_llama), 2, 4, 2)  # coarse bits: visibly different logits
    result = teacher_fidelity(student, tiny_llama, sequences, batch_size=2)

    kl, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            s = F.log_softmax(student(ids).logits[0, :-1], -1)
            t = F.log_softmax(tiny_llama(ids).logits[0, :-1], -1)
            kl += (t.exp() * (t - s)).sum().item()
            agree += int((s.argmax(-1) == t.argmax(-1)).sum())
            count += len(seq) - 1
    assert result["kl_to_teacher"] > 0
    assert result["kl_to_teacher"] == pytest.approx(kl / count, rel=1e-4)
    assert result["top1_agreement"] == agree / count
    assert result["heldout_perplexity"] == pytest.approx(direct_perplexity(student, sequences), rel=1e-5)
    assert result["teacher_heldout_perplexity"] == pytest.approx(direct_perplexity(tiny_llama, sequences), rel=1e-5)


@pytest.mark.slow
def test_default_model_perplexity_equals_transformers_loss():
    from utils.training.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    text = DEFAULT_TEXT[:200]  # a short text: one forward pass
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = torch.exp(model(input_ids=ids, labels=ids).loss).item()
    measured = perplexity(model, [ids[0].tolist()], pad_token_id=tokenizer.pad_token_id)
    assert measured == pytest.approx(expected, rel=1e-5)
    assert 1 < measured < 1000  # a trained model: far below the vocabulary size (49152)
