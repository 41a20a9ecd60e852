"""Fake quantizers of LLM-QAT (Liu et al., 2023, section 2.2) with a straight-through gradient.

Rule: copied into every saved checkpoint with `quantize.py` (see there): imports only torch and the standard library.

Every quantizer here works per row of the last dimension, which covers all three uses in the paper:
  - weights   [out, in]        -> one scale per output channel (row),
  - activations [..., tokens, d] -> one scale per token,
  - KV (k_proj/v_proj outputs)  -> one scale per token across all heads.
With `group_size` G the last dimension is cut into groups of G values, each its own row: group-wise weights,
one scale per G input columns of an output channel (what torchao's QAT and vLLM's 4-bit kernels use).

Symmetric MinMax (paper eq. 1), the default for all three:
    alpha = max|X_row|,   s = alpha / (2^(b-1) - 1),   X_q = s * clamp(round(X / s), -(2^(b-1)-1), 2^(b-1)-1)
Asymmetric MinMax (an option for activations), with zero kept representable:
    s = (max(X_row, 0) - min(X_row, 0)) / (2^b - 1),   z = round(-min / s),
    X_q = s * (clamp(round(X / s) + z, 0, 2^b - 1) - z)
Rounding is half-to-even and X / s is computed as X * (1 / s), the arithmetic of PyTorch's own
`torch.fake_quantize_per_channel_affine`, so the two agree to the bit in float32. No epsilon is added to
the scale: a row whose range is 0 quantizes to 0 instead of moving other values across rounding boundaries.
The math runs in float32 whatever the input's dtype (float64 stays float64) and the result comes back in the
input's dtype: in bfloat16 (autocast, or FSDP2 with bf16 params) x * (1/s) and codes * s would round to other
codes than the float32 export computes. None of these ops is one that autocast lowers, so it needs no guard.

Full grid (`grid="full"`, the "deploy" recipe): the 2^b-level integer grid of compressed-tensors, which vLLM and
transformers run, computed as its `calculate_qparams` and `fake_quantize` do (codes signed, 0 representable):
    symmetric:  s = max|X_row| / ((2^b - 1) / 2),  z = 0          (int4: codes -8..7, s = max / 7.5)
    asymmetric: s = (max(X_row, 0) - min(X_row, 0)) / (2^b - 1),  z = round(clamp(-2^(b-1) - min / s, grid))
    X_q = (round(clamp(X / s + z, -2^(b-1), 2^(b-1) - 1)) - z) * s
with a true division X / s, so the result equals compressed-tensors' bit for bit in float32 and float64.

Learned ranges (`fake_quantize_learned`, train.py --learn_ranges weights; beyond the paper): the symmetric MinMax
scale of each row times a learned clipping factor c (OmniQuant's learnable weight clipping, Shao et al. 2024), so the
scale still follows the weight as it trains and c = 1 is exactly the MinMax quantizer above. The step size gets LSQ's
gradient (Esser et al. 2020): d x_q / d s = round(x / s) - x / s where x is inside the grid, its clipped code where
it is not; x gets the straight-through gradient inside the grid and none where it clips; MinMax itself passes none.

Backward is the straight-through estimator: the gradient passes unchanged, except that (as in the
released LLM-QAT code) it is zeroed where |X| >= ste_clip. `ste_clip=None` passes it everywhere.
On the full grid it is also zeroed where the grid clips, i.e. where round(X / s + z) falls outside the codes
(the mask of PyTorch's and torchao's fake quantizers); the paper's grid gives every value a code.
"""
from __future__ import annotations

from functools import partial

import torch

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
FULL_PRECISION = 16
GRIDS = ("paper", "full")


def check_bits(bits, what: str = "bits") -> int:
    """Validate a bit-width: integers 2..8, or 16 for 'not quantized' (the paper's tables write 16 for FP)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; use an integer in 2..8, or 16 for full precision")
    return bits


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the math runs in: float32, or float64 for float64."""
    return x if x.dtype == torch.float64 else x.float()


def in_scale_dtype(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """The scale as an engine holds it (vLLM's CPU int4 kernel: rounded to bfloat16 at load), in the math's dtype."""
    return scale if scale_dtype is None else scale.to(scale_dtype).to(scale.dtype)


def _minmax_scale(rows: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """The symmetric MinMax scale per row: max|row| / (2^(b-1) - 1) on the paper's grid, max|row| / ((2^b - 1) / 2) on
    the full one (divided by a 0-dim tensor, as compressed-tensors divides)."""
    if grid == "full":
        low, high = full_range(bits)
        return rows.abs().amax(dim=-1, keepdim=True) / (torch.tensor(high - low, dtype=rows.dtype) / 2)
    return rows.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)


def symmetric_codes(x: torch.Tensor, bits: int, grid: str = "paper",
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as float32 or float64, in [-(2^(b-1)-1), 2^(b-1)-1], on the full grid [-2^(b-1), 2^(b-1)-1])
    and per-row scales with x_q = codes * scale. A row whose max is 0 has scale 0 and codes 0 (0 * inf would be nan).
    With `scale_dtype` the scale is rounded to it first and the codes are those of the rounded scale."""
    x = upcast(x)
    if grid == "full":
        low, high = full_range(bits)
        rounded, scale, _ = _full_grid(x, bits, True, scale_dtype)
        codes = rounded.clamp(low, high)
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = in_scale_dtype(_minmax_scale(x, bits, grid), scale_dtype)
        codes = torch.round(x * scale.reciprocal()).clamp_(-qmax, qmax)
    return torch.where(scale > 0, codes, torch.zeros_like(codes)), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """codes * scale, rounded to `scale_dtype` where the engine dequantizes into it (vLLM's int4 kernel: bfloat16)."""
    return in_scale_dtype(codes * scale, scale_dtype)


def _symmetric(x: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    codes, scale = symmetric_codes(x, bits, "paper", scale_dtype)
    return dequantize(codes, scale, scale_dtype).to(x.dtype)


def _asymmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    dtype, x = x.dtype, upcast(x)
    qmax = 2 ** bits - 1
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low) / qmax
    inv_scale = scale.reciprocal()
    zero_point = torch.round(-low * inv_scale)
    q = (torch.round(x * inv_scale) + zero_point).clamp_(0, qmax)
    return torch.where(scale > 0, (q - zero_point) * scale, torch.zeros_like(q)).to(dtype)


def full_range(bits: int) -> tuple[int, int]:
    """The codes of the full grid: compressed-tensors' `calculate_range` for int types."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _full_grid(x: torch.Tensor, bits: int, symmetric: bool,
               scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """round(x / s + z) before clamping, s and z, per row, in x's dtype, as compressed-tensors computes them
    (clamping after rounding gives the same codes: the bounds are integers)."""
    low, high = full_range(bits)
    row_min, row_max = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = in_scale_dtype(_minmax_scale(x, bits, "full"), scale_dtype)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (row_max - row_min) / torch.tensor(high - low, dtype=x.dtype)  # divides as compressed-tensors' does
        zero_point = torch.round((low - row_min / scale).clamp(low, high))
    return torch.round(x / scale + zero_point), scale, zero_point


def _full(x: torch.Tensor, bits: int, symmetric: bool,
          scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-grid fake quantization of `x` and where it does not clip (a row of range 0 gives 0)."""
    dtype, x = x.dtype, upcast(x)
    low, high = full_range(bits)
    rounded, scale, zero_point = _full_grid(x, bits, symmetric, scale_dtype)
    inside = (rounded >= low) & (rounded <= high) | (scale == 0)  # a row of range 0 clips nothing (its codes are 0/0)
    x_q = dequantize(rounded.clamp(low, high) - zero_point, scale, scale_dtype)
    return torch.where(scale > 0, x_q, torch.zeros_like(x_q)).to(dtype), inside


def grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`x` [..., n] as [..., n / G, G], so that each group of G values is quantized as one row."""
    return x if group_size is None else x.unflatten(-1, (-1, group_size))


def _integer(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, grid: str,
             scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The integer fake quantization of `x` and where its gradient passes (None: everywhere; the paper's grid gives
    every value a code)."""
    rows = grouped(x, group_size)
    if grid == "full":
        x_q, inside = _full(rows, bits, symmetric, scale_dtype)
        return x_q.reshape(x.shape), inside.reshape(x.shape)
    x_q = _symmetric(rows, bits, scale_dtype) if symmetric else _asymmetric(rows, bits)
    return x_q.reshape(x.shape), None


MIN_CLIP = 0.01  # a learned clipping factor is used no smaller than this: a step size stays positive


def _learned_grid(rows: torch.Tensor, scale: torch.Tensor, bits: int, grid: str):
    """x / s, its rounding, and the code bounds, as the MinMax quantizer of `grid` computes them."""
    if grid == "full":
        low, high = full_range(bits)
        ratio = rows / scale
    else:
        low, high = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        ratio = rows * scale.reciprocal()
    return ratio, torch.round(ratio), low, high


class _LearnedStep(torch.autograd.Function):
    """s * clamp(round(x / s)) per row, with LSQ's gradients to x and s (see the module docstring)."""

    @staticmethod
    def forward(ctx, rows, scale, bits, grid, ste_clip, scale_dtype):
        _, rounded, low, high = _learned_grid(rows, scale, bits, grid)
        ctx.save_for_backward(rows, scale)
        ctx.bits, ctx.grid, ctx.ste_clip = bits, grid, ste_clip
        x_q = dequantize(rounded.clamp(low, high), scale, scale_dtype)  # its rounding to scale_dtype: straight through
        return torch.where(scale > 0, x_q, torch.zeros_like(rows))

    @staticmethod
    def backward(ctx, grad_output):
        rows, scale = ctx.saved_tensors
        ratio, rounded, low, high = _learned_grid(rows, scale, ctx.bits, ctx.grid)
        inside = (rounded >= low) & (rounded <= high) | (scale == 0)  # a row of range 0 clips nothing, as in MinMax
        passes = inside if ctx.ste_clip is None else inside & (rows.abs() < ctx.ste_clip)
        step = torch.where(inside, rounded - ratio, rounded.clamp(low, high))
        grad_scale = torch.where(scale > 0, (grad_output * step).sum(-1, keepdim=True), 0)
        return grad_output * passes, grad_scale, None, None, None, None


def learned_scale(rows: torch.Tensor, clip: torch.Tensor, bits: int, grid: str,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The step size of each row: its MinMax scale (a statistic, no gradient) times the learned clipping factor,
    rounded to `scale_dtype` where the engine holds it so (its gradient passes the rounding)."""
    scale = clip.clamp(min=MIN_CLIP).to(rows.dtype) * _minmax_scale(rows.detach(), bits, grid)
    return in_scale_dtype(scale, scale_dtype)


def clip_for_scale(rows: torch.Tensor, scale: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """The clipping factors that make `learned_scale` of `rows` equal `scale` ([..., 1], e.g. GPTQ's scales for the
    weights it wrote), to within an ulp; 1 where a row is all zeros (its scale is 0 either way)."""
    minmax = _minmax_scale(upcast(rows), bits, grid)
    return torch.where(minmax > 0, scale.to(minmax.dtype) / minmax, torch.ones_like(minmax)).float()


def fake_quantize_learned(x: torch.Tensor, clip: torch.Tensor, bits: int, ste_clip: float | None = 2.0,
                          group_size: int | None = None, grid: str = "paper",
                          scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric fake quantization of `x` per row (per group of `group_size`) with a learned clipping factor per row,
    `clip` ([..., 1], one per row of `grouped(x)`); float32 math, the result in x's dtype. `scale_dtype` as in
    `fake_quantize`."""
    rows = grouped(upcast(x), group_size)
    scale = learned_scale(rows, clip, bits, grid, scale_dtype)
    x_q = _LearnedStep.apply(rows, scale, bits, grid, ste_clip, scale_dtype)
    return x_q.reshape(x.shape).to(x.dtype)


def learned_codes(x: torch.Tensor, clip: torch.Tensor, bits: int, grid: str,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales per row of `x` (already grouped) under learned clipping: `dequantize(codes, scales,
    scale_dtype)` is `fake_quantize_learned`'s output."""
    rows = upcast(x)
    scale = learned_scale(rows, clip, bits, grid, scale_dtype)
    _, rounded, low, high = _learned_grid(rows, scale, bits, grid)
    return torch.where(scale > 0, rounded.clamp(low, high), torch.zeros_like(rows)), scale


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quantize, ste_clip):
        x_q, inside = quantize(x)
        if ste_clip is not None:
            small = x.abs() < ste_clip
            inside = small if inside is None else inside & small
        ctx.save_for_backward(inside)  # a bool mask (1 byte per value, not a copy of x), or None: pass everywhere
        return x_q

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output if inside is None else grad_output * inside, None, None


def straight_through(x: torch.Tensor, quantize, ste_clip: float | None) -> torch.Tensor:
    """`quantize(x)`, which returns the fake-quantized x and where its gradient passes (a bool mask, or None for
    everywhere), with that straight-through gradient, also zeroed where |x| >= `ste_clip` unless it is None."""
    return _StraightThrough.apply(x, quantize, ste_clip)


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool = True, ste_clip: float | None = 2.0,
                  group_size: int | None = None, grid: str = "paper",
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` per row of its last dimension (per group of `group_size` values of it, if given)
    on the paper's grid or the full one; identity for 16 bits. `scale_dtype` (symmetric only): scales and
    dequantized values rounded to it, as an engine that holds them in that dtype computes."""
    if bits == FULL_PRECISION:
        return x
    return straight_through(x, partial(_integer, bits=bits, symmetric=symmetric, group_size=group_size, grid=grid,
                                       scale_dtype=scale_dtype), ste_clip)


# Integer products are summed in float32 blocks of this many columns: every partial sum of int8 x int8 codes
# (|code| <= 128) then stays within 2^24, where float32 holds integers exactly, whatever order the GEMM adds in.
EXACT_BLOCK = 2 ** 24 // (128 * 128)


def integer_matmul(x_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """x_codes @ w_codes^T summed exactly (what an int32 accumulator holds), as float64, for codes of up to 8 bits.
    float32 blocks on CPU, where float32 GEMM is IEEE; float64 elsewhere (CUDA may run float32 as TF32)."""
    with torch.autocast(x_codes.device.type, enabled=False):
        if x_codes.device.type != "cpu":
            return x_codes.double() @ w_codes.double().T
        x_codes, w_codes = x_codes.float(), w_codes.float()
        return sum((x_codes[..., k:k + EXACT_BLOCK] @ w_codes[:, k:k + EXACT_BLOCK].T).double()
                   for k in range(0, x_codes.shape[-1], EXACT_BLOCK))


class _IntegerLinearSTE(torch.autograd.Function):
    """vLLM's int8 GEMM on the codes: y = fl(fl(fl(acc) * s_w) * s_x) (+ bias), acc the exact integer sum, in float32
    (measured against vLLM's CPU kernel, docs/EXPORT.md); backward is that of F.linear(x_q, w_q): straight through."""

    @staticmethod
    def forward(ctx, x_q, w_q, bias, x_codes, x_scale, w_codes, w_scale):
        ctx.save_for_backward(x_q, w_q)
        ctx.has_bias = bias is not None
        y = (integer_matmul(x_codes, w_codes).float() * w_scale.float().T) * x_scale.float()
        return (y if bias is None else y + bias.float()).to(x_q.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x_q, w_q = ctx.saved_tensors
        grad_x = (grad_y @ w_q.to(grad_y.dtype)).to(x_q.dtype)
        grad_w = (grad_y.flatten(0, -2).T @ x_q.to(grad_y.dtype).flatten(0, -2)).to(w_q.dtype)
        grad_bias = grad_y.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_bias, None, None, None, None


def integer_linear(x_q, w_q, bias, x_codes, x_scale, w_codes, w_scale) -> torch.Tensor:
    """F.linear(x_q, w_q, bias) computed as an integer kernel computes it, from the codes and scales of x_q (per
    token) and w_q (per output channel); gradients flow to x_q, w_q and bias as through F.linear."""
    return _IntegerLinearSTE.apply(x_q, w_q, bias, x_codes, x_scale, w_codes, w_scale)
