"""Shared fixtures: tiny random LLaMA-family models built in memory (no download, milliseconds to build).

- `tiny_config`: a small `LlamaConfig` (2 layers, hidden 64, 4 query / 2 key-value heads, vocab 128).
- `tiny_sizes`: the keyword arguments of that size, for any LLaMA-family config class (Qwen2Config, ...).
- `tiny_llama`: a fresh `LlamaForCausalLM` from `tiny_config`, float32, eval mode, fixed seed; new for every
  test, so a test may quantize it in place.
- `tiny_input_ids`: a fixed batch of token ids, shape [2, 12], for `tiny_llama`.
- `make_tiny_model(config, dtype=torch.float32, seed=0)`: the same recipe for any config (Llama, Qwen2,
  Mistral, ...) and dtype; the same seed gives the same weights, so two calls give two identical models.
- `save_tiny_teacher(path)`: a tiny random Llama saved with the embedded default's tokenizer (generation, training and
  evaluation need real text), for tests that run the command lines on a model directory.
- `vllm_sized_llama(initializer_range=0.05)`: a tiny random Llama vLLM's CPU attention takes (head size 64), with the
  embedded default's tokenizer, and that tokenizer.
- `load_script(name)`: a command line of `scripts/` (e.g. "evaluate") as a module, to call its `main(argv)`.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

TINY_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "scripts"):
    """The command-line file FOLDER/NAME.py as a module (scripts/ and bench/ are not packages)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_teacher(path: Path) -> Path:
    from transformers import LlamaForCausalLM

    from utils.training.loading import load_tokenizer
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vllm_sized_llama(initializer_range: float = 0.05):
    """A larger `initializer_range` gives larger logits: a peakier next-token distribution."""
    from transformers import LlamaForCausalLM

    from utils.training.loading import load_tokenizer
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=initializer_range,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


def _make_tiny_model(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture
def make_tiny_model():
    return _make_tiny_model


@pytest.fixture
def tiny_sizes():
    return dict(TINY_SIZES)


@pytest.fixture
def tiny_config(tiny_sizes):
    return LlamaConfig(**tiny_sizes)


@pytest.fixture
def tiny_llama(tiny_config):
    return _make_tiny_model(tiny_config)


@pytest.fixture
def tiny_input_ids(tiny_config):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, tiny_config.vocab_size, (2, 12), generator=generator)
