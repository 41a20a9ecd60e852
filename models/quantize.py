"""Turn a Hugging Face LLaMA-family causal LM into the LLM-QAT student, by module replacement.

`quantize_model(model, QATConfig(w_bits=4, a_bits=8, kv_bits=4))` (or `quantize_model(model, 4, 8, 4)`) swaps
every `nn.Linear` except the output layer (`lm_head`) for a `QuantLinear` sharing the same parameters; in a
LLaMA-family model these are the q/k/v/o and gate/up/down projections of the decoder blocks. Each one
fake-quantizes (paper section 2.2):
  - its input activations per token (A bits),
  - its weight per output channel (W bits, scales recomputed from the current weight at every forward), or
    per group of `w_group_size` input columns of each output channel,
  - for k_proj and v_proj, its output per token (KV bits): `kv_placement="pre_rope"`, the released code's
    placement. The attention caches these outputs, so the cached values are on the low-bit grid; cached keys
    are the quantized keys after rotary embedding, which are not on a grid.
With `kv_placement="post_rope"` keys and values are quantized per token where attention reads them, after rotary
embedding and the cache (as a serving engine's quantized KV cache holds them), by the attention function the
student registers with transformers (see `post_rope_attention`), on the prefill, on every decode step and without
a cache alike.
Embeddings, norms and `lm_head` stay in full precision. 16 bits means "not quantized".

With `rotate="hadamard"` or `"random"` (QuaRot / SpinQuant, `models.rotations`) the float model is first rotated in a way
that leaves its function unchanged (R1, R2 and R4's inverse folded into the weights), down_proj rotates its input
online (R4) before quantizing it, and post-RoPE keys are quantized in a rotated basis (R3): x -> Q(x R3) R3^T,
which gives attention exactly what rotating both queries and cached keys by R3 gives (`KVQuantizer`).

Three recipes, each only a set of defaults for the options `grid`, `ste_clip` and `arithmetic`:
  - "paper" (the default): the paper's grid of 2^b - 1 levels and the released STE (`ste_clip=2`);
  - "deploy": compressed-tensors' full 2^b-level grid, the one transformers runs, and an STE that is zero only
    where that grid clips (`ste_clip=None`), so a packed export runs in transformers as the student trained;
  - "vllm": what vLLM's CPU kernels compute (measured, docs/EXPORT.md): the paper's grid, which is vLLM's int8
    activation quantizer bit for bit; int activations times int weights summed exactly, as its int32 accumulator
    does, then scaled (`arithmetic="vllm"`); weight-only layers with their scales and dequantized weights in
    bfloat16, as its int4 kernel holds them.

Floating-point formats (`QATConfig(scheme="NVFP4")`, and `kv_scheme="FP8"` for the KV cache) take the place of the
integer bits: a preset of compressed-tensors (`models.schemes`) gives each tensor its format, and the layers get
`FloatQuantizer`s (`models.float_quantizers`) where they had `IntQuantizer`s; each quantizer is a small module built
from the config, so the same `QuantLinear` and `KVQuantizer` run either. The recipe's `ste_clip` applies to both;
`grid` and `arithmetic` are integer options.

The settings are written to `model.config.llm_qat`, so they travel with `save_pretrained`; `models.checkpoint`
saves and reloads students.

Rule: this file and `quantizers.py` are copied into every saved checkpoint, where `trust_remote_code=True`
imports them with nothing of this repository on the path. They may import only torch, transformers, the
standard library and each other (tests/test_layering.py checks it).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .float_quantizers import check_float_spec, fake_quantize_float, stored_scales
from .quantizers import (FULL_PRECISION, GRIDS, check_bits, clip_for_scale, fake_quantize, fake_quantize_learned,
                         grouped, in_scale_dtype, integer_linear, learned_codes, symmetric_codes, upcast)
from .rotations import DOWN_PROJ_INPUT, KEY, ROTATIONS, OnlineRotation, rotate, rotate_model
from .schemes import KV_SCHEMES, SCHEMES, QuantSpec

KV_PROJECTIONS = ("k_proj", "v_proj")
KV_PLACEMENTS = ("pre_rope", "post_rope")
CONFIG_KEY = "llm_qat"
EXPORT_KEY = "llm_qat_export"  # in an export's config: its format; its weights are stored on their grid
NEVER_CLIP_FLAG = 0  # how a command line spells ste_clip=None
ARITHMETICS = ("float", "vllm")
LEARNED_RANGES = ("none", "weights")
LEARNED_CLIP = "learned_clip"  # the parameter name of a weight quantizer's learned clipping factors
RECIPES = {"paper": dict(grid="paper", ste_clip=2.0, arithmetic="float"),
           "deploy": dict(grid="full", ste_clip=None, arithmetic="float"),
           "vllm": dict(grid="paper", ste_clip=2.0, arithmetic="vllm")}
# vLLM's CPU int4 weight-only kernel holds the scales and the dequantized weights in bfloat16 (docs/EXPORT.md).
VLLM_WEIGHT_ONLY_DTYPE = torch.bfloat16


class _RecipeDefault:
    """The default of an option that the recipe sets (distinct from None, which ste_clip uses)."""

    def __repr__(self):
        return "the recipe's"


RECIPE_DEFAULT = _RecipeDefault()


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize and how; its fields are also train.py's command-line flags (see `from_flags`)."""

    w_bits: int = field(default=16, metadata={"help": "weight bits, 2..8 or 16 (not quantized)"})
    a_bits: int = field(default=16, metadata={"help": "input-activation bits, 2..8 or 16"})
    kv_bits: int = field(default=16, metadata={"help": "KV-cache bits (k_proj/v_proj outputs), 2..8 or 16"})
    act_symmetric: bool = field(default=True, metadata={
        "help": "symmetric per-token activations; --no_act_symmetric: asymmetric MinMax with a zero point"})
    ste_clip: float | None = field(default=RECIPE_DEFAULT, metadata={
        "help": "zero the straight-through gradient where |x| >= this (released code, recipe paper: 2); 0 = never "
                "clip (recipe deploy)"})
    w_group_size: int | None = field(default=None, metadata={
        "help": "one weight scale per group of this many input columns (e.g. 128); default: per output channel"})
    kv_placement: str = field(default="pre_rope", metadata={
        "help": "pre_rope: quantize the k/v projection outputs (released code); post_rope: keys after rotary "
                "embedding, as a serving engine's KV cache holds them", "choices": KV_PLACEMENTS})
    recipe: str = field(default="paper", metadata={
        "help": "paper: reproduce the paper (grid paper, ste_clip 2); deploy: what compressed-tensors / vLLM run "
                "(grid full, ste_clip 0); the other options override it", "choices": tuple(RECIPES)})
    grid: str = field(default=RECIPE_DEFAULT, metadata={
        "help": "paper: 2^b - 1 levels, scale max|x| / (2^(b-1) - 1); full: compressed-tensors' 2^b levels, scale "
                "max|x| / (2^(b-1) - 0.5), gradient zero where it clips", "choices": GRIDS})
    arithmetic: str = field(default=RECIPE_DEFAULT, metadata={
        "help": "float: multiply the dequantized values in float (the paper, transformers); vllm: what vLLM's CPU "
                "kernels compute (int products summed exactly, then scaled; weight-only scales in bfloat16)",
        "choices": ARITHMETICS})
    rotate: str = field(default="none", metadata={
        "help": "rotate the float model before quantizing (folded into the weights, plus online rotations of "
                "down_proj's input and of post-RoPE keys): none (the paper), hadamard, random", "choices": ROTATIONS})
    rotate_seed: int = field(default=0, metadata={"help": "seed of the random signs / matrices of --rotate"})
    scheme: str | None = field(default=None, metadata={
        "help": "floating-point weights and input activations, a compressed-tensors preset (instead of --w_bits / "
                "--a_bits): FP8 and FP8_DYNAMIC (E4M3), NVFP4, MXFP4, or NVFP4A16 / MXFP4A16 (weights only)",
        "choices": tuple(SCHEMES)})
    kv_scheme: str | None = field(default=None, metadata={
        "help": "floating-point KV cache (instead of --kv_bits): FP8 (E4M3, one scale per token), FP8_TENSOR (one "
                "per tensor)", "choices": tuple(KV_SCHEMES)})
    learn_ranges: str = field(default="none", metadata={
        "help": "none: MinMax weight scales at every step (the paper); weights: each weight row (channel, or group) "
                "times a clipping factor that starts at 1 (MinMax) and trains with LSQ's step-size gradient at "
                "--range_learning_rate", "choices": LEARNED_RANGES})

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not one of {', '.join(RECIPES)}")
        for name, value in RECIPES[self.recipe].items():  # frozen: options left to the recipe are set here
            if isinstance(getattr(self, name), _RecipeDefault):  # not `is`: flags reach here deep-copied
                object.__setattr__(self, name, value)
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r} is not one of {', '.join(GRIDS)}")
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic={self.arithmetic!r} is not one of {', '.join(ARITHMETICS)}")
        if self.integer_product and self.w_group_size is not None:
            raise ValueError("arithmetic=vllm multiplies int activations by weights with one scale per output "
                             "channel (vLLM's int8 kernel); drop --w_group_size or use --a_bits 16")
        if self.integer_product and not self.act_symmetric:
            raise ValueError("arithmetic=vllm multiplies symmetric int activations (vLLM's asymmetric ones use another "
                             "range); drop --no_act_symmetric")
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(getattr(self, name), name)
        if self.w_group_size is not None and not (isinstance(self.w_group_size, int) and self.w_group_size > 0):
            raise ValueError(f"w_group_size={self.w_group_size!r} must be a positive integer, or None for one scale "
                             "per output channel")
        if self.kv_placement not in KV_PLACEMENTS:
            raise ValueError(f"kv_placement={self.kv_placement!r} is not one of {', '.join(KV_PLACEMENTS)}")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate={self.rotate!r} is not one of {', '.join(ROTATIONS)}")
        self._check_schemes()
        self._check_learned_ranges()
        if self.rotate != "none" and self.kv_quantized and self.kv_placement == "pre_rope":
            raise ValueError(f"rotate={self.rotate} rotates keys after rotary embedding, where they are quantized "
                             "with kv_placement=post_rope: pass --kv_placement post_rope")
        if self.ste_clip is not None and not self.ste_clip > 0:
            raise ValueError(f"ste_clip={self.ste_clip!r} must be a positive number, or None to never clip "
                             f"(--ste_clip {NEVER_CLIP_FLAG} on a command line)")

    def _check_learned_ranges(self):
        if self.learn_ranges not in LEARNED_RANGES:
            raise ValueError(f"learn_ranges={self.learn_ranges!r} is not one of {', '.join(LEARNED_RANGES)}")
        if self.learn_ranges == "none":
            return
        if self.scheme or self.w_bits == FULL_PRECISION:
            raise ValueError(f"learn_ranges={self.learn_ranges} learns the clipping of integer weights; pass --w_bits "
                             "2..8 without --scheme, or drop --learn_ranges")

    def _check_schemes(self):
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.kv_scheme is not None and self.kv_scheme not in KV_SCHEMES:
            raise ValueError(f"kv_scheme={self.kv_scheme!r} is not one of {', '.join(KV_SCHEMES)}")
        if self.kv_scheme and self.kv_bits != FULL_PRECISION:
            raise ValueError(f"kv_scheme={self.kv_scheme} is the KV cache's format, kv_bits={self.kv_bits} another: "
                             "drop one of --kv_scheme and --kv_bits")
        if not self.scheme:
            return
        conflicts = [flag for flag, given in (
            ("--w_bits", self.w_bits != FULL_PRECISION), ("--a_bits", self.a_bits != FULL_PRECISION),
            ("--w_group_size", self.w_group_size is not None), ("--no_act_symmetric", not self.act_symmetric),
            ("--recipe/--arithmetic vllm (vLLM's integer kernels)", self.arithmetic == "vllm")) if given]
        if conflicts:
            raise ValueError(f"scheme={self.scheme} sets the weight and activation formats; drop "
                             f"{', '.join(conflicts)}")

    @property
    def weight_spec(self) -> QuantSpec | None:
        """The floating-point format of the weights; None: integer (`w_bits`)."""
        return SCHEMES[self.scheme].weights if self.scheme else None

    @property
    def input_spec(self) -> QuantSpec | None:
        """The floating-point format of the input activations; None: integer (`a_bits`, 16 for a weight-only scheme)."""
        return SCHEMES[self.scheme].input_activations if self.scheme else None

    @property
    def kv_spec(self) -> QuantSpec | None:
        """The floating-point format of the KV cache; None: integer (`kv_bits`)."""
        return KV_SCHEMES[self.kv_scheme] if self.kv_scheme else None

    @property
    def kv_quantized(self) -> bool:
        return self.kv_bits != FULL_PRECISION or self.kv_scheme is not None

    @property
    def linears_quantized(self) -> bool:
        return self.scheme is not None or {self.w_bits, self.a_bits} != {FULL_PRECISION}

    @property
    def integer_product(self) -> bool:
        """Whether quantized layers multiply integer codes (vLLM's int8 kernel) instead of dequantized floats."""
        return self.arithmetic == "vllm" and FULL_PRECISION not in (self.w_bits, self.a_bits)

    @property
    def weight_scale_dtype(self) -> torch.dtype | None:
        """The dtype weight scales and dequantized weights are held in: bfloat16 in vLLM's weight-only kernel."""
        return VLLM_WEIGHT_ONLY_DTYPE if self.arithmetic == "vllm" and self.a_bits == FULL_PRECISION else None

    @classmethod
    def from_flags(cls, **flags) -> QATConfig:
        """The config from command-line values, where a flag cannot say None: `--ste_clip 0` means never clip."""
        if flags.get("ste_clip") == NEVER_CLIP_FLAG:
            flags["ste_clip"] = None
        return cls(**flags)

    def label(self) -> str:
        """W-A-KV as the paper writes it, with the options that change the model: `4g128-8-4` for group-wise
        weights, a `k` after KV for keys quantized after rotary embedding (`4-8-4k`); then the recipe unless it is
        the paper's, and each option that differs from the recipe (`4-8-4+deploy`, `4-8-4+grid=full`); none of
        these when nothing is quantized (`16-16-16`); learned ranges (`+learned-weights`); last the rotation
        (`4-4-4k+hadamard`, `+hadamard.seed1`).
        A scheme replaces W-A (`NVFP4-kv4`), and a KV scheme the KV bits, in lower case without underscores
        (`4-8-fp8`, `FP8_DYNAMIC-kvfp8tensor`)."""
        weights = f"{self.w_bits}g{self.w_group_size}" if self.w_group_size and self.w_bits != FULL_PRECISION \
            else f"{self.w_bits}"
        kv = self.kv_scheme.lower().replace("_", "") if self.kv_scheme else f"{self.kv_bits}"
        keys = "k" if self.kv_placement == "post_rope" and self.kv_quantized else ""
        recipe = [self.recipe] if self.recipe != "paper" else []
        recipe += [f"{name}={getattr(self, name)}".lower() for name, value in RECIPES[self.recipe].items()
                   if getattr(self, name) != value]
        if not (self.linears_quantized or self.kv_quantized):  # nothing quantized: no recipe to tell
            recipe = []
        if self.learn_ranges != "none":
            recipe.append(f"learned-{self.learn_ranges}")
        if self.rotate != "none":
            recipe.append(self.rotate + (f".seed{self.rotate_seed}" if self.rotate_seed else ""))
        bits = f"{self.scheme}-kv{kv}" if self.scheme else f"{weights}-{self.a_bits}-{kv}"
        return f"{bits}{keys}" + "".join(f"+{part}" for part in recipe)


class IntQuantizer(nn.Module):
    """An integer fake quantizer (`models.quantizers.fake_quantize`) per row of the last dimension, or per group of
    `group_size` values of it; 16 bits is the identity. With `learned_rows` (the shape of a weight's rows: [out] or
    [out, in / G]) each row's MinMax scale is times a learned clipping factor, the parameter `learned_clip`, which
    starts at 1 (`models.quantizers.fake_quantize_learned`). A module, so that hooks can count its calls."""

    def __init__(self, bits: int, symmetric: bool = True, ste_clip: float | None = 2.0, group_size: int | None = None,
                 grid: str = "paper", scale_dtype: torch.dtype | None = None,
                 learned_rows: tuple[int, ...] | None = None, device: torch.device | None = None):
        super().__init__()
        self.bits, self.symmetric, self.ste_clip = bits, symmetric, ste_clip
        self.group_size, self.grid, self.scale_dtype = group_size, grid, scale_dtype
        clip = nn.Parameter(torch.ones(*learned_rows, 1, device=device)) if learned_rows else None
        self.register_parameter(LEARNED_CLIP, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learned_clip is not None:
            return fake_quantize_learned(x, self.learned_clip, self.bits, self.ste_clip, self.group_size, self.grid,
                                         self.scale_dtype)
        return fake_quantize(x, self.bits, self.symmetric, self.ste_clip, self.group_size, self.grid, self.scale_dtype)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric integer codes of `x` (float, x's shape) and their scales ([..., 1] per row, [..., n / G] per
        group), with codes * scales == this quantizer's output."""
        rows = grouped(x, self.group_size)
        codes, scales = (learned_codes(rows, self.learned_clip.detach(), self.bits, self.grid, self.scale_dtype)
                         if self.learned_clip is not None else
                         symmetric_codes(rows, self.bits, self.grid, self.scale_dtype))
        return (codes.reshape(x.shape), scales.squeeze(-1)) if self.group_size else (codes, scales)

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.group_size else ""
        symmetric = "" if self.symmetric else ", asymmetric"
        scale_dtype = f", scale_dtype={self.scale_dtype}" if self.scale_dtype else ""
        learned = ", learned clipping" if self.learned_clip is not None else ""
        return f"bits={self.bits}{group}{symmetric}, grid={self.grid}{scale_dtype}{learned}"


class FloatQuantizer(nn.Module):
    """A floating-point fake quantizer (FP8, NVFP4, MXFP4: `models.float_quantizers`) of the format `spec`."""

    scale_dtype = None  # an export's weights are held as stored: float32 holds code * scale exactly

    def __init__(self, spec: QuantSpec, ste_clip: float | None):
        super().__init__()
        self.spec, self.ste_clip = check_float_spec(spec), ste_clip

    @property
    def bits(self) -> int:
        return self.spec.num_bits

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_float(x, self.spec, self.ste_clip)

    def scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales compressed-tensors stores for `weight` ([out, in]) in this format: [1] per tensor, [out, 1] per
        channel, [out, in / G] per group; and NVFP4's global scale [1] (None for the others)."""
        scale, global_scale = stored_scales(grouped(upcast(weight), self.group_size), self.spec)
        return (scale.reshape(1) if self.spec.strategy == "tensor" else
                scale.squeeze(-1) if self.group_size else scale), global_scale

    def extra_repr(self):
        return ", ".join(f"{name}={value}" for name, value in asdict(self.spec).items() if value is not None)


def _quantizer(spec: QuantSpec | None, bits: int, config: QATConfig, **integer) -> IntQuantizer | FloatQuantizer:
    """The floating-point quantizer of `spec`, else the integer one of `bits` with `config`'s grid."""
    if spec is not None:
        return FloatQuantizer(spec, config.ste_clip)
    return IntQuantizer(bits, ste_clip=config.ste_clip, grid=config.grid, **integer)


def weight_quantizer(config: QATConfig, weight: torch.Tensor | None = None) -> IntQuantizer | FloatQuantizer:
    """The weight quantizer of `config`; with learned ranges, its clipping factors for the rows of `weight`."""
    learned = {}
    if config.learn_ranges == "weights" and weight is not None:
        out, columns = weight.shape
        rows = (out, columns // config.w_group_size) if config.w_group_size else (out,)
        learned = dict(learned_rows=rows, device=weight.device)
    return _quantizer(config.weight_spec, config.w_bits, config, group_size=config.w_group_size,
                      scale_dtype=config.weight_scale_dtype, **learned)


def input_quantizer(config: QATConfig) -> IntQuantizer | FloatQuantizer:
    return _quantizer(config.input_spec, config.a_bits, config, symmetric=config.act_symmetric)


def kv_quantizer(config: QATConfig) -> IntQuantizer | FloatQuantizer:
    return _quantizer(config.kv_spec, config.kv_bits, config)


class KVQuantizer(nn.Module):
    """The KV-cache quantizer (paper section 2.2): keys or values fake-quantized per token, one scale across all
    heads, on rows [..., tokens, heads * head_dim], by `quantizer` (`kv_quantizer(config)`). With a rotation (keys
    after RoPE, R3) each head is quantized in the rotated basis and turned back, Q(k R3) R3^T, which is what rotating
    queries and cached keys gives attention.
    A module, so that hooks can count its calls: tests prove it runs instead of inferring it from the logits."""

    def __init__(self, quantizer: IntQuantizer | FloatQuantizer, rotation: str = "none", rotate_seed: int = 0,
                 head_dim: int | None = None):
        super().__init__()
        self.quantizer = quantizer
        self.rotation, self.rotate_seed, self.head_dim = rotation, rotate_seed, head_dim

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.rotation == "none":
            return self.quantizer(rows)
        heads = rows.unflatten(-1, (-1, self.head_dim))
        rotated = rotate(heads, self.rotation, self.rotate_seed, KEY).flatten(-2)
        return rotate(self.quantizer(rotated).unflatten(-1, (-1, self.head_dim)), self.rotation, self.rotate_seed,
                      KEY, inverse=True).flatten(-2)

    def extra_repr(self):
        return f"rotation={self.rotation}, seed={self.rotate_seed}" if self.rotation != "none" else ""


class QuantLinear(nn.Linear):
    """`nn.Linear` with fake-quantized input and weight (`input_quantizer`, `weight_quantizer`); an `input_rotation`
    (down_proj's R4) turns the input before it is quantized, and an `output_quantizer` (k_proj / v_proj with pre-RoPE
    KV) quantizes the output."""

    def __init__(self, linear: nn.Linear, config: QATConfig, output_quantizer: KVQuantizer | None = None,
                 input_rotation: nn.Module | None = None, weight_on_grid: bool = False):
        nn.Module.__init__(self)  # reuse `linear`'s parameters as they are: no copy, no re-initialisation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        # an export's weight is on its grid already: its scales are stored, nothing is learned
        self.weight_quantizer = weight_quantizer(config, None if weight_on_grid else linear.weight)
        self.input_quantizer = input_quantizer(config)
        self.grid, self.integer_product = config.grid, config.integer_product
        self.input_rotation, self.output_quantizer = input_rotation, output_quantizer
        self.weight_on_grid = weight_on_grid  # an export's weight: codes * scales as stored, never re-derived
        self.register_buffer("weight_scale", None, persistent=False)  # an export's stored scales (models.packed)

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int:
        return self.input_quantizer.bits

    @property
    def w_group_size(self) -> int | None:
        return self.weight_quantizer.group_size

    @property
    def act_symmetric(self) -> bool:
        return self.input_quantizer.symmetric

    @property
    def out_bits(self) -> int:
        return self.output_quantizer.bits if self.output_quantizer is not None else FULL_PRECISION

    def quantized_weight(self):
        if self.weight_on_grid:  # re-deriving the scales is not idempotent on the full grid (int4: max 8s vs 7.5s)
            return in_scale_dtype(self.weight, self.weight_quantizer.scale_dtype)  # as the engine dequantizes them
        return self.weight_quantizer(self.weight)

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's integer codes (float, [out, in]) and scales ([out, 1] per channel, [out, in / G] per group),
        with codes * scales == `quantized_weight()`: an export's stored scales, or this grid's."""
        weight = self.weight.detach()
        if self.weight_on_grid and self.weight_scale is not None:
            weight, scales = upcast(weight), self.weight_scale.to(upcast(weight).dtype)
            return torch.round(weight / scales.repeat_interleave(weight.shape[-1] // scales.shape[-1], -1)), scales
        return self.weight_quantizer.codes(weight)

    def forward(self, x):
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        x_q = self.input_quantizer(x)
        if self.integer_product:
            x_codes, x_scale = self.input_quantizer.codes(x.detach())
            y = integer_linear(x_q, self.quantized_weight(), self.bias, x_codes, x_scale, *self.weight_codes())
        else:
            y = F.linear(x_q, self.quantized_weight(), self.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def extra_repr(self):
        return f"{super().extra_repr()}{', integer product' if self.integer_product else ''}"


# ---- post-RoPE KV: quantized where attention reads the cache ----
# transformers hands every attention module's keys and values, after rotary embedding and the cache update, to the
# function registered under `config._attn_implementation` (its AttentionInterface). The student registers one that
# quantizes them and then calls the implementation the model had: no argument name or cache class of transformers
# is involved, so a release that renames them cannot route around the quantizer (one did: `past_key_values` ->
# `cache` in 5.24). The cache keeps the float keys; re-quantizing them per token at every step gives attention the
# same values as a cache holding quantized ones. A forward hook on each attention module raises if the function was
# not called, so an attention class that does not use the interface fails loudly instead of running unquantized.
POST_ROPE_ATTENTION = "llm_qat_post_rope_kv_"  # + the implementation it wraps, e.g. "llm_qat_post_rope_kv_sdpa"


def _in_attention_layout(quantizer: KVQuantizer, states: torch.Tensor) -> torch.Tensor:
    """`quantizer` applied to [batch, heads, tokens, head_dim] as one row per token across all heads."""
    rows = states.transpose(1, 2)
    return quantizer(rows.flatten(-2)).unflatten(-1, rows.shape[-2:]).transpose(1, 2)


def _base_attention(module: nn.Module, base: str):
    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to run post-RoPE KV quantization "
                           "with; load the model with attn_implementation='sdpa', or use kv_placement=pre_rope")
    return eager


def post_rope_attention(base: str) -> str:
    """Register (once) the attention function that quantizes K and V before `base` and return its name."""
    name = POST_ROPE_ATTENTION + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        def attention(module, query, key, value, *args, **kwargs):
            key = _in_attention_layout(module.key_quantizer, key)
            value = _in_attention_layout(module.value_quantizer, value)
            module.kv_quantized = True
            return _base_attention(module, base)(module, query, key, value, *args, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the masks `base` expects
    return name


def _expect_quantized_kv(module, args):
    module.kv_quantized = False


def _check_quantized_kv(module, args, output):
    if not module.kv_quantized:
        raise RuntimeError(f"{type(module).__name__}.forward did not call transformers' attention interface, so the "
                           "post-RoPE KV quantizer did not run; use kv_placement=pre_rope with this model or transformers "
                           "version")


def _set_post_rope_kv(model: nn.Module, attentions: list[nn.Module], config: QATConfig | None) -> None:
    """Put the post-RoPE KV quantizers on `attentions` (config given) or take them off (None), with the attention
    function that runs them."""
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    base = implementation.removeprefix(POST_ROPE_ATTENTION)
    for attention in attentions:
        for handle in getattr(attention, "_llm_qat_kv_hooks", ()):
            handle.remove()
        for name in ("key_quantizer", "value_quantizer", "_llm_qat_kv_hooks", "kv_quantized"):
            if hasattr(attention, name):
                delattr(attention, name)
        if config is not None:
            head_dim = attention.k_proj.out_features // model.config.num_key_value_heads
            attention.key_quantizer = KVQuantizer(kv_quantizer(config), config.rotate, config.rotate_seed, head_dim)
            attention.value_quantizer = KVQuantizer(kv_quantizer(config))
            attention._llm_qat_kv_hooks = (attention.register_forward_pre_hook(_expect_quantized_kv),
                                           attention.register_forward_hook(_check_quantized_kv))
    wanted = post_rope_attention(base) if config is not None else base
    if implementation != wanted:
        model.set_attn_implementation(wanted)
        if model.config._attn_implementation != wanted:
            raise ValueError(f"{type(model).__name__} does not let transformers set its attention function, which "
                             "post-RoPE KV quantization needs; use kv_placement=pre_rope")


def _stored_on_grid(model: nn.Module, config: QATConfig) -> bool:
    """Whether the model's weights are an export's, already on the grid `config` asks for (used as they are), after
    refusing a weight quantizer other than the one that wrote them."""
    exported = getattr(model.config, EXPORT_KEY, None)
    if not exported or config.weight_spec is None and config.w_bits == FULL_PRECISION:
        return False
    saved = QATConfig(**getattr(model.config, CONFIG_KEY))
    integer = ("w_bits", "w_group_size", "grid")
    if any(getattr(saved, name) != getattr(config, name) for name in (*integer, "weight_spec")):
        described = f"scheme={saved.scheme}" if saved.scheme else ", ".join(f"{name}={getattr(saved, name)}"
                                                                            for name in integer)
        raise ValueError(f"this model's weights are a {exported} export's, on the grid of {described}; keep those "
                         "settings, or quantize the checkpoint it was exported from")
    return True


def check_group_size(config: QATConfig, layers: dict[str, nn.Linear]) -> None:
    """Group-wise weights (and a scheme's group-wise activations) need G to divide every quantized layer's input
    width."""
    group_size = config.weight_spec.group_size if config.scheme else config.w_group_size
    bad = {name: layer.in_features for name, layer in layers.items() if group_size and layer.in_features % group_size}
    if not bad:
        return
    name, width = next(iter(bad.items()))
    if config.scheme:
        ungrouped = [scheme for scheme, formats in SCHEMES.items() if formats.weights.group_size is None]
        raise ValueError(f"scheme={config.scheme} quantizes groups of {group_size} input columns, which do not divide "
                         f"the {width} of {name}; use a scheme without groups ({', '.join(ungrouped)})")
    common = math.gcd(*(layer.in_features for layer in layers.values()))
    divisors = [str(d) for d in range(1, common + 1) if common % d == 0]
    raise ValueError(f"w_group_size={group_size} does not divide the {width} input columns of {name}; use one "
                     f"of: {', '.join(divisors)}")


def quantize_model(model: nn.Module, *bits, **options) -> nn.Module:
    """Make `model` the LLM-QAT student in place (and return it): `quantize_model(model, config)` with a
    `QATConfig`, or `quantize_model(model, w_bits, a_bits, kv_bits, **options)` with its fields."""
    config = bits[0] if len(bits) == 1 and isinstance(bits[0], QATConfig) and not options else QATConfig(*bits, **options)
    output_layer = model.get_output_embeddings()
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not output_layer}
    if not targets and config.linears_quantized:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize (GPT-2, for one, uses Conv1D); "
                         "use a LLaMA-family model")
    if config.kv_quantized and not any(name.rpartition(".")[2] in KV_PROJECTIONS for name in targets):
        kv = f"kv_scheme={config.kv_scheme}" if config.kv_scheme else f"kv_bits={config.kv_bits}"
        raise ValueError(f"{kv} needs k_proj/v_proj layers, which {type(model).__name__} does not have; use "
                         "kv_bits=16 for this architecture")
    if config.w_bits != FULL_PRECISION or config.scheme:
        check_group_size(config, targets)
    rotated = QATConfig(**getattr(model.config, CONFIG_KEY, None) or {})  # what the weights hold already
    if (rotated.rotate, rotated.rotate_seed) != (config.rotate, config.rotate_seed):
        if rotated.rotate != "none":
            raise ValueError(f"the weights of this student are rotated (rotate={rotated.rotate}, rotate_seed="
                             f"{rotated.rotate_seed}); keep those settings, or start from the float model")
        rotate_model(model, config.rotate, config.rotate_seed)
    weights_on_grid = _stored_on_grid(model, config)
    pre_rope = config.kv_placement == "pre_rope"
    kv_quantized = config.kv_quantized
    for name, linear in targets.items():  # a QuantLinear (re-quantizing a student) is rebuilt with the new bits
        parent_name, _, child = name.rpartition(".")
        output_quantizer = KVQuantizer(kv_quantizer(config)) if child in KV_PROJECTIONS and pre_rope and kv_quantized \
            else None
        input_rotation = OnlineRotation(config.rotate, linear.in_features, config.rotate_seed, DOWN_PROJ_INPUT) \
            if child == "down_proj" and config.rotate != "none" else None
        setattr(model.get_submodule(parent_name), child,
                QuantLinear(linear, config, output_quantizer, input_rotation, weights_on_grid))
    attentions = [module for module in model.modules() if isinstance(getattr(module, "k_proj", None), QuantLinear)]
    _set_post_rope_kv(model, attentions, config if kv_quantized and not pre_rope else None)
    model.config.llm_qat = asdict(config)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def start_ranges_at(model: nn.Module, scales: dict[str, torch.Tensor]) -> nn.Module:
    """Set the learned clipping factors of every quantized layer (`learn_ranges="weights"`) so that its weight's step
    sizes are `scales[layer name]` ([out, 1] per channel, [out, in / G] per group), e.g. GPTQ's for the weights it
    wrote: the student then starts as that quantized model (its codes, its scales to an ulp) and learns on from it."""
    for name, layer in quantized_modules(model).items():
        quantizer = layer.weight_quantizer
        if getattr(quantizer, LEARNED_CLIP, None) is None:
            raise ValueError(f"{name} has no learned weight ranges to start; quantize with learn_ranges='weights'")
        if name not in scales:
            raise ValueError(f"no weight scales for {name}")
        rows = grouped(layer.weight.detach(), quantizer.group_size)
        with torch.no_grad():
            quantizer.learned_clip.copy_(clip_for_scale(rows, scales[name].reshape(*rows.shape[:-1], 1),
                                                        quantizer.bits, quantizer.grid))
    return model
