"""How a tensor is quantized, in compressed-tensors' words, and the floating-point schemes by name.

`QuantSpec` has the fields of compressed-tensors' `QuantizationArgs` that decide the numbers (not its observer or
calibration ones), and `SCHEMES` are its presets of the same names (`preset_name_to_scheme`), field for field
(tests/test_float_quantizers.py compares them): FP8 E4M3 per tensor (FP8) or per channel with per-token activations
(FP8_DYNAMIC), NVFP4 (E2M1 values in groups of 16, FP8 E4M3 group scales under one FP32 scale per tensor:
`tensor_group`), MXFP4 (E2M1 in groups of 32, power-of-two E8M0 scales held as uint8 exponents). `KV_SCHEMES` are the
KV-cache formats, per token or per tensor.

`dynamic` says where a deployed model takes its scales from (calibration or each tensor); a QAT student computes
every scale from the tensor it quantizes, at every forward, as it does for integer weights.

Rule: copied into every saved checkpoint with `quantize.py`: imports only the standard library.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("tensor", "channel", "group", "tensor_group", "token")
GROUPED = ("group", "tensor_group")


@dataclass(frozen=True)
class QuantSpec:
    """One tensor's quantizer: compressed-tensors' `QuantizationArgs` (`scale_dtype` spelled as torch's dtype name)."""

    num_bits: int
    type: str = "int"
    strategy: str = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool | str = False
    scale_dtype: str | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if (self.strategy in GROUPED) != (self.group_size is not None):
            raise ValueError(f"strategy={self.strategy} needs group_size only with {' or '.join(GROUPED)}")


@dataclass(frozen=True)
class Scheme:
    """compressed-tensors' `QuantizationScheme` of a Linear layer: its weight and input activations (None: A16)."""

    weights: QuantSpec
    input_activations: QuantSpec | None = None


def _float(num_bits: int, **args) -> QuantSpec:
    return QuantSpec(num_bits, "float", **args)


_NVFP4 = dict(strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn")
_MXFP4 = dict(strategy="group", group_size=32, scale_dtype="uint8")

SCHEMES = {
    "FP8": Scheme(_float(8), _float(8)),
    "FP8_DYNAMIC": Scheme(_float(8, strategy="channel"), _float(8, strategy="token", dynamic=True)),
    "NVFP4": Scheme(_float(4, **_NVFP4), _float(4, dynamic="local", **_NVFP4)),
    "NVFP4A16": Scheme(_float(4, **_NVFP4)),
    "MXFP4": Scheme(_float(4, **_MXFP4), _float(4, dynamic=True, **_MXFP4)),
    "MXFP4A16": Scheme(_float(4, **_MXFP4)),
}

KV_SCHEMES = {
    "FP8": _float(8, strategy="token", dynamic=True),  # one scale per token across all heads, as integer KV
    "FP8_TENSOR": _float(8, strategy="tensor", dynamic=True),  # one scale for a layer's keys (values) per forward
}
