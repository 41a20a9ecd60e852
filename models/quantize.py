"""Turn a Hugging Face LLaMA-family causal LM into the LLM-QAT student, by module replacement.

`quantize_model(model, QATConfig(w_bits=4, a_bits=8, kv_bits=4))` (or `quantize_model(model, 4, 8, 4)`) swaps
every `nn.Linear` except the output layer (`lm_head`) for a `QuantLinear` sharing the same parameters; in a
LLaMA-family model these are the q/k/v/o and gate/up/down projections of the decoder blocks. Each one
fake-quantizes (paper section 2.2):
  - its input activations per token (A bits),
  - its weight per output channel (W bits, scales recomputed from the current weight at every forward),
  - for k_proj and v_proj, its output per token (KV bits), before rotary embedding as in the released code.
    The attention caches these outputs, so the cached values are on the low-bit grid; cached keys are the
    quantized keys after rotary embedding, which are not on a grid.
Embeddings, norms and `lm_head` stay in full precision. 16 bits means "not quantized".

The settings are written to `model.config.llm_qat`, so they travel with `save_pretrained`; `models.checkpoint`
saves and reloads students.

Rule: this file and `quantizers.py` are copied into every saved checkpoint, where `trust_remote_code=True`
imports them with nothing of this repository on the path. They may import only torch, transformers, the
standard library and each other (tests/test_layering.py checks it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn.functional as F
from torch import nn

from .quantizers import FULL_PRECISION, check_bits, fake_quantize

KV_PROJECTIONS = ("k_proj", "v_proj")
CONFIG_KEY = "llm_qat"
NEVER_CLIP_FLAG = 0  # how a command line spells ste_clip=None


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize and how; its fields are also train.py's command-line flags (see `from_flags`)."""

    w_bits: int = field(default=16, metadata={"help": "weight bits, 2..8 or 16 (not quantized)"})
    a_bits: int = field(default=16, metadata={"help": "input-activation bits, 2..8 or 16"})
    kv_bits: int = field(default=16, metadata={"help": "KV-cache bits (k_proj/v_proj outputs), 2..8 or 16"})
    act_symmetric: bool = field(default=True, metadata={
        "help": "symmetric per-token activations; --no_act_symmetric: asymmetric MinMax with a zero point"})
    ste_clip: float | None = field(default=2.0, metadata={
        "help": "zero the straight-through gradient where |x| >= this (released code: 2); 0 = never clip"})

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(getattr(self, name), name)
        if self.ste_clip is not None and not self.ste_clip > 0:
            raise ValueError(f"ste_clip={self.ste_clip!r} must be a positive number, or None to never clip "
                             f"(--ste_clip {NEVER_CLIP_FLAG} on a command line)")

    @classmethod
    def from_flags(cls, **flags) -> QATConfig:
        """The config from command-line values, where a flag cannot say None: `--ste_clip 0` means never clip."""
        if flags.get("ste_clip") == NEVER_CLIP_FLAG:
            flags["ste_clip"] = None
        return cls(**flags)


class QuantLinear(nn.Linear):
    """`nn.Linear` with fake-quantized input, weight and (for k/v projections) output."""

    def __init__(self, linear: nn.Linear, config: QATConfig, out_bits: int = FULL_PRECISION):
        nn.Module.__init__(self)  # reuse `linear`'s parameters as they are: no copy, no re-initialisation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.w_bits, self.a_bits, self.out_bits = config.w_bits, config.a_bits, out_bits
        self.act_symmetric, self.ste_clip = config.act_symmetric, config.ste_clip

    def quantized_weight(self):
        return fake_quantize(self.weight, self.w_bits, True, self.ste_clip)

    def forward(self, x):
        x = fake_quantize(x, self.a_bits, self.act_symmetric, self.ste_clip)
        y = F.linear(x, self.quantized_weight(), self.bias)
        return fake_quantize(y, self.out_bits, True, self.ste_clip)

    def extra_repr(self):
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, out_bits={self.out_bits}"


def quantize_model(model: nn.Module, *bits, **options) -> nn.Module:
    """Make `model` the LLM-QAT student in place (and return it): `quantize_model(model, config)` with a
    `QATConfig`, or `quantize_model(model, w_bits, a_bits, kv_bits, **options)` with its fields."""
    config = bits[0] if len(bits) == 1 and isinstance(bits[0], QATConfig) and not options else QATConfig(*bits, **options)
    output_layer = model.get_output_embeddings()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not output_layer]
    if config.kv_bits != FULL_PRECISION and not any(name.rpartition(".")[2] in KV_PROJECTIONS for name, _ in targets):
        raise ValueError(f"kv_bits={config.kv_bits} needs k_proj/v_proj layers, which {type(model).__name__} does "
                         "not have; use kv_bits=16 for this architecture")
    for name, linear in targets:  # a QuantLinear (re-quantizing a student) is rebuilt with the new bits
        parent_name, _, child = name.rpartition(".")
        out_bits = config.kv_bits if child in KV_PROJECTIONS else FULL_PRECISION
        setattr(model.get_submodule(parent_name), child, QuantLinear(linear, config, out_bits))
    model.config.llm_qat = asdict(config)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
