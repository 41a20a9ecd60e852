"""Floating-point fake quantizers (FP8 E4M3, NVFP4, MXFP4), bit for bit compressed-tensors' `fake_quantize` with the
scales its `calculate_qparams` / `generate_gparam` compute (tests/test_float_quantizers.py compares them).

A `QuantSpec` (models/schemes.py) says the format and granularity. Each row (one tensor, one output channel, one
token, or one group of G values of the last dimension) gets a scale from its largest magnitude:
  - FP8 E4M3: s = max|row| / 448, values rounded to E4M3 (torch's float8_e4m3fn cast, ties to even);
  - NVFP4 (`tensor_group`): one FP32 global scale g = 448 * 6 / max|tensor|, group scales max|group| / 6 * g rounded
    to E4M3, and s = that / g, so the group scales use E4M3's whole range; values rounded to E2M1;
  - MXFP4 (`group` with uint8 scales): s = 2^(e - 2), e the exponent of max|group| (one higher where its
    significand is at least 1.75), stored as the E8M0 exponent e - 2 + 127 in 0..255; values rounded to E2M1.
  X_q = round(clamp(X / s, -max, max)) * s, max the format's largest value (E4M3 448, E2M1 6), with a true division.
A scale of 0 (a row of zeros, or an NVFP4 group whose scale underflows E4M3) is replaced by compressed-tensors' stand-in
for it, so those values quantize to 0. "token" is per row of the last dimension whatever the rank (compressed-tensors
reduces 2-D inputs per tensor instead; a model's activations are [batch, tokens, features]).

The math runs in float32 whatever the input's dtype (float64 stays float64; NVFP4's global scale is FP32 in both, as
the format stores it) and the result comes back in the input's dtype. The straight-through gradient passes where
|X / s| <= max and is zero where the format clips, like the full integer grid's (and also where |X| >= ste_clip, if
given).

Rule: copied into every saved checkpoint with `quantize.py`: imports only torch, the standard library and its siblings.
"""
from __future__ import annotations

from functools import partial

import torch

from .quantizers import grouped, straight_through, upcast
from .schemes import GROUPED, QuantSpec

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
E2M1_MAX = 6.0
FORMAT_MAX = {8: E4M3_MAX, 4: E2M1_MAX}
E8M0_BIAS = 127
E2M1_TOP_EXPONENT = 2  # floor(log2(6)): an MX scale puts a group's max at 3.5 to 7 times it (above 6: clipped)
# compressed-tensors' stand-in for a zero scale, by scale dtype (its `_get_dtype_eps`); otherwise the dtype's eps
ZERO_SCALE = {"float8_e4m3fn": 0.125, "uint8": 1.0}


def check_float_spec(spec: QuantSpec) -> QuantSpec:
    """`spec`, if it is a format computed here: FP8 E4M3 (any granularity), NVFP4 or MXFP4."""
    fp8 = spec.num_bits == 8 and spec.scale_dtype is None
    nvfp4 = spec.num_bits == 4 and spec.strategy == "tensor_group" and spec.scale_dtype == "float8_e4m3fn"
    mxfp4 = spec.num_bits == 4 and spec.strategy == "group" and spec.group_size == 32 and spec.scale_dtype == "uint8"
    if spec.type != "float" or not spec.symmetric or not (fp8 or nvfp4 or mxfp4):
        raise ValueError(f"{spec} is not a format these quantizers compute; use FP8 E4M3, NVFP4 or MXFP4 "
                         "(models/schemes.py)")
    return spec


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(E4M3).to(x.dtype)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """`x` (within ±6) rounded to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (signed), ties to even: the spacing is
    0.5 below 2, 1 below 4 and 2 above, and dividing by it is exact."""
    magnitude = x.abs()
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0)).to(x.dtype)
    return torch.round(x / step) * step


ROUND = {8: round_to_e4m3, 4: round_to_e2m1}


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `generate_gparam`: 448 * 6 / max|x| as FP32, 1 where that is not finite."""
    absmax = x.abs().amax().clamp(min=torch.finfo(x.dtype).tiny)
    scale = E4M3_MAX * E2M1_MAX / absmax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def mx_scale(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' MX scale of groups whose largest magnitude is `absmax`: its `round_to_power_2` keeps one
    mantissa bit (a significand of 1.75 or more rounds up to the next power of two), then the E8M0 code of that
    exponent minus 2, clamped to 0..255 (a group of zeros: code 0), is turned back into 2^(code - 127)."""
    mantissa, exponent = torch.frexp(absmax)  # absmax = mantissa * 2^exponent, mantissa in [0.5, 1)
    rounded_exponent = exponent - 1 + (mantissa >= 0.875).int()
    code = torch.where(absmax > 0, rounded_exponent - E2M1_TOP_EXPONENT + E8M0_BIAS, 0).clamp(0, 255)
    return (2.0 ** (code - E8M0_BIAS).float()).to(absmax.dtype)


def stored_scales(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales compressed-tensors stores for `rows` (one per row; one for the whole tensor for "tensor"): for NVFP4
    the E4M3 group scales and the FP32 global scale g (`weight_scale`, `weight_global_scale`), otherwise the scales
    and None. A value's scale is scale / g (`float_scale`), as compressed-tensors' dequantization divides."""
    absmax = rows.abs().amax() if spec.strategy == "tensor" else rows.abs().amax(-1, keepdim=True)
    global_scale = nvfp4_global_scale(rows) if spec.strategy == "tensor_group" else None
    if spec.scale_dtype == "uint8":
        scale = mx_scale(absmax)
    else:
        scale = absmax / torch.tensor(FORMAT_MAX[spec.num_bits], dtype=absmax.dtype, device=absmax.device)
        if global_scale is not None:
            scale = global_scale * scale
        if spec.scale_dtype == "float8_e4m3fn":
            scale = round_to_e4m3(scale.clamp(-E4M3_MAX, E4M3_MAX))
    zero = ZERO_SCALE.get(spec.scale_dtype, torch.finfo(scale.dtype).eps)
    return torch.where(scale == 0, torch.tensor(zero, dtype=scale.dtype, device=scale.device), scale), global_scale


def float_scale(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale s of each row of `rows` (of the whole tensor for "tensor") with X_q = round(X / s) * s."""
    scale, global_scale = stored_scales(rows, spec)
    return scale if global_scale is None else scale / global_scale


def _float(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake quantization of `x` and where it does not clip."""
    dtype, upcast_x = x.dtype, upcast(x)
    rows = grouped(upcast_x, spec.group_size if spec.strategy in GROUPED else None)
    scale = float_scale(rows, spec)
    scaled = rows / scale
    top = FORMAT_MAX[spec.num_bits]
    x_q = ROUND[spec.num_bits](scaled.clamp(-top, top)) * scale
    return x_q.reshape(x.shape).to(dtype), (scaled.abs() <= top).reshape(x.shape)


def fake_quantize_float(x: torch.Tensor, spec: QuantSpec, ste_clip: float | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` in the floating-point format `spec` describes, with a straight-through gradient."""
    return straight_through(x, partial(_float, spec=spec), ste_clip)
