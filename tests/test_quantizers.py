"""The fake quantizers (models/quantizers.py): exact grids, per-row scales, straight-through gradient, float32 math."""
import contextlib

import pytest
import torch

import models.quantize
from models import quantize_model
from models.quantizers import (check_bits, fake_quantize, fake_quantize_learned, integer_linear, integer_matmul,
                               learned_codes, symmetric_codes)

QUANTIZED_BITS = range(2, 9)


def symmetric_reference(x, bits):
    """PyTorch's own per-channel fake quantizer over the rows of `x` (last dim), with the paper's
    symmetric MinMax scale max|row| / (2^(b-1) - 1) and zero point 0. Rows must not be all zero."""
    rows = x.reshape(-1, x.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    scale = (rows.abs().amax(dim=1) / qmax).float()
    zero_point = torch.zeros(rows.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, -qmax, qmax).reshape(x.shape)


def asymmetric_reference(x, bits):
    """PyTorch's per-channel fake quantizer with per-row zero points: the range [min, max] of each row,
    widened to include 0, is split into 2^b - 1 steps."""
    rows = x.reshape(-1, x.shape[-1])
    qmax = 2 ** bits - 1
    low, high = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
    scale = ((high - low) / qmax).float()
    zero_point = torch.round(-low / scale).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, 0, qmax).reshape(x.shape)


def random_weight(zero_row=5):
    """A weight-like matrix with rows of very different ranges (some with outliers) and one all-zero row."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=generator) * torch.logspace(-3, 0, 48).unsqueeze(1)
    weight[::7, 3] *= 20
    weight[zero_row] = 0
    return weight


@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_weight_fake_quant_equals_pytorch_per_channel_reference(bits):
    weight = random_weight(zero_row=5)
    quantized = fake_quantize(weight, bits)
    nonzero = torch.ones(weight.shape[0], dtype=torch.bool)
    nonzero[5] = False
    # The reference op rejects scale 0, so the all-zero row is compared on its own.
    assert torch.equal(quantized[nonzero], symmetric_reference(weight[nonzero], bits))
    assert torch.isfinite(quantized).all()
    assert torch.equal(quantized[5], torch.zeros(weight.shape[1]))
    assert all(row.unique().numel() <= 2 ** bits - 1 for row in quantized)


@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_symmetric_activation_fake_quant_equals_reference_per_token(bits):
    activations = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(fake_quantize(activations, bits), symmetric_reference(activations, bits))


@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_asymmetric_fake_quant_equals_reference_with_per_row_zero_points(bits):
    generator = torch.Generator().manual_seed(2)
    activations = torch.randn(2, 10, 64, generator=generator) + 0.7
    activations[0, 3] = torch.rand(64, generator=generator) + 0.1  # all positive: min widened to 0, zero point 0
    activations[1, 6] = -torch.rand(64, generator=generator) - 0.1  # all negative: max widened to 0
    quantized = fake_quantize(activations, bits, symmetric=False)
    assert torch.equal(quantized, asymmetric_reference(activations, bits))
    assert all(row.unique().numel() <= 2 ** bits for row in quantized.reshape(-1, 64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_token_stays_zero(symmetric):
    activations = torch.randn(3, 16)
    activations[1] = 0
    quantized = fake_quantize(activations, 4, symmetric=symmetric)
    assert torch.isfinite(quantized).all()
    assert torch.equal(quantized[1], torch.zeros(16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_changing_one_token_changes_no_other_token(symmetric):
    activations = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    changed = activations.clone()
    changed[1, 4] *= 10  # a much wider range for this token only
    changed[1, 4, 0] = -50
    before, after = fake_quantize(activations, 4, symmetric), fake_quantize(changed, 4, symmetric)
    other_tokens = torch.ones(2, 10, dtype=torch.bool)
    other_tokens[1, 4] = False
    assert torch.equal(before[other_tokens], after[other_tokens])
    assert not torch.equal(before[1, 4], after[1, 4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_keep_dtype_and_grid(dtype):
    x = torch.randn(4, 32, dtype=dtype)
    quantized = fake_quantize(x, 4)
    assert quantized.dtype == dtype
    assert torch.isfinite(quantized).all()
    assert all(row.unique().numel() <= 15 for row in quantized)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_bfloat16_inputs_are_quantized_with_float32_math(bits, symmetric):
    """Training under bf16 (the paper-scale GPU path): quantizing in bf16 arithmetic gave other values than the
    float32 export for a few percent (4-bit) to about a third (8-bit) of them; the codes must be the float32 codes of
    the same values."""
    x = (random_weight() * 10).bfloat16()
    quantized = fake_quantize(x, bits, symmetric)
    assert quantized.dtype == torch.bfloat16
    assert torch.equal(quantized, fake_quantize(x.float(), bits, symmetric).bfloat16())
    codes, scale = symmetric_codes(x, bits)
    float32_codes, float32_scale = symmetric_codes(x.float(), bits)
    assert torch.equal(codes, float32_codes) and torch.equal(scale, float32_scale)


@pytest.mark.parametrize("precision", ["autocast", "bf16 params"])
def test_student_forward_in_bfloat16_quantizes_with_float32_math(tiny_llama, tiny_input_ids, monkeypatch, precision):
    """Under CPU autocast(bfloat16), or with bf16 parameters as FSDP2's MixedPrecisionPolicy gives them, every
    quantizer call of the student returns the float32 result of its own input, cast back to that input's dtype."""
    calls = []

    def recording_fake_quantize(x, *args):
        quantized = fake_quantize(x, *args)
        calls.append((x, args, quantized))
        return quantized

    monkeypatch.setattr(models.quantize, "fake_quantize", recording_fake_quantize)
    quantize_model(tiny_llama, 4, 4, 4, act_symmetric=False)
    if precision == "bf16 params":
        tiny_llama.bfloat16()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    with torch.no_grad(), context:
        logits = tiny_llama(tiny_input_ids).logits
    assert torch.isfinite(logits).all()
    # Both quantizers met bf16 inputs: symmetric (k/v outputs; weights too with bf16 params), asymmetric (activations)
    bf16_quantizers = {symmetric for x, (bits, symmetric, *_), _ in calls if x.dtype == torch.bfloat16 and bits < 16}
    assert bf16_quantizers == {True, False}
    for x, args, quantized in calls:
        assert quantized.dtype == x.dtype
        assert torch.equal(quantized, fake_quantize(x.float(), *args).to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("ste_clip", [2.0, None])
def test_gradient_keeps_the_input_dtype(dtype, ste_clip):
    x = (torch.randn(6, 32) * 2).to(dtype).requires_grad_()
    upstream = torch.randn(6, 32).to(dtype)
    (fake_quantize(x, 4, True, ste_clip) * upstream).sum().backward()
    assert x.grad.dtype == dtype
    inside = x.detach().abs() < 2.0 if ste_clip else torch.ones_like(x, dtype=torch.bool)
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_sixteen_bits_is_the_identity():
    x = torch.randn(4, 32)
    assert fake_quantize(x, 16) is x


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradient_is_straight_through_inside_clip_range(symmetric):
    x = (torch.randn(6, 32) * 0.6).clamp(-1.9, 1.9).requires_grad_()
    upstream = torch.randn(6, 32)
    (fake_quantize(x, 3, symmetric) * upstream).sum().backward()
    through_quantizer = x.grad.clone()
    x.grad = None
    (x * upstream).sum().backward()  # the same loss with the quantizer replaced by identity
    assert torch.equal(through_quantizer, x.grad)


def test_gradient_is_zero_where_magnitude_reaches_ste_clip():
    x = torch.tensor([[-3.0, -2.0, -1.99, 0.0, 0.5, 1.99, 2.0, 7.0]], requires_grad=True)
    upstream = torch.arange(1.0, 9.0).unsqueeze(0)
    (fake_quantize(x, 4) * upstream).sum().backward()
    inside = x.detach().abs() < 2.0
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_gradient_passes_everywhere_without_ste_clip():
    x = torch.tensor([[-3.0, -2.0, -1.99, 0.0, 0.5, 1.99, 2.0, 7.0]], requires_grad=True)
    upstream = torch.arange(1.0, 9.0).unsqueeze(0)
    (fake_quantize(x, 4, ste_clip=None) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_check_bits_accepts_allowed_values(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [0, 1, 9, 32, "four", 4.0, True, None, -4])
def test_check_bits_rejects_anything_else_naming_the_allowed_values(bits):
    with pytest.raises(ValueError, match=r"2\.\.8.*16"):
        check_bits(bits, "w_bits")


@pytest.mark.parametrize("bits", QUANTIZED_BITS)
@pytest.mark.parametrize("group_size", [8, 32])
def test_group_wise_weights_equal_the_per_channel_reference_on_each_group(bits, group_size):
    weight = random_weight()[:5].clone()  # rows 0-4: none of them the all-zero row
    out_features, in_features = weight.shape
    # Independently: every group of G columns of a row is its own channel of PyTorch's per-channel quantizer.
    groups = weight.reshape(out_features * in_features // group_size, group_size)
    expected = symmetric_reference(groups, bits).reshape(weight.shape)
    assert torch.equal(fake_quantize(weight, bits, group_size=group_size), expected)
    assert not torch.equal(fake_quantize(weight, bits, group_size=group_size), fake_quantize(weight, bits))


# The full grid (grid="full", recipe "deploy": README "Recipes") against compressed-tensors' own code, the
# independent reference: its scales and zero points (`calculate_qparams`, `compute_dynamic_scales_and_zp`) and `fake_quantize`.
def compressed_tensors_reference(x, bits, strategy, symmetric=True, group_size=None):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size, dynamic=strategy == "token")
    if strategy == "token":
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    else:
        rows = x if group_size is None else x.unflatten(-1, (-1, group_size))
        keep = group_size is None  # group scales are [out, in / G]
        scale, zero_point = calculate_qparams(rows.amin(-1, keepdim=keep), rows.amax(-1, keepdim=keep), args)
    return ct_fake_quantize(x, scale, zero_point, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_full_grid_weights_equal_compressed_tensors_per_channel_and_per_group(dtype, bits):
    weight = random_weight()[:5].to(dtype)  # without the all-zero row, which compressed-tensors gives scale eps
    expected = compressed_tensors_reference(weight, bits, "channel")
    assert torch.equal(fake_quantize(weight, bits, grid="full"), expected)
    assert not torch.equal(fake_quantize(weight, bits), expected)  # the paper's grid is another one
    expected = compressed_tensors_reference(weight, bits, "group", group_size=8)
    assert torch.equal(fake_quantize(weight, bits, group_size=8, grid="full"), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", QUANTIZED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_full_grid_activations_equal_compressed_tensors_dynamic_per_token(dtype, bits, symmetric):
    torch.manual_seed(bits)
    x = (torch.randn(2, 7, 96) * 3 + 0.5).to(dtype)  # [batch, tokens, features], off-centre for the zero point
    expected = compressed_tensors_reference(x, bits, "token", symmetric)
    assert torch.equal(fake_quantize(x, bits, symmetric, grid="full"), expected)


@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_full_grid_codes_use_all_2_to_the_b_levels(bits):
    weight = random_weight()
    codes, scale = symmetric_codes(weight, bits, "full")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.min() == low and codes.max() == high  # int4: -8..7
    assert torch.equal(scale.squeeze(-1)[:5], weight[:5].abs().amax(-1) / ((2 ** bits - 1) / 2))
    assert torch.equal(codes * scale, fake_quantize(weight, bits, grid="full"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_full_grid_gradient_is_zero_exactly_where_the_grid_clips(symmetric):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(4, 9, 64) * 3  # many |x| >= 2: the paper's clip rule would zero them
    x[0, 0] = 0  # a token of range 0: nothing clipped
    x.requires_grad_()
    upstream = torch.randn(4, 9, 64)
    (fake_quantize(x, 4, symmetric, ste_clip=None, grid="full") * upstream).sum().backward()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="token", dynamic=True)
    scale, zero_point = compute_dynamic_scales_and_zp(x.detach(), args, module=None)
    codes = torch.round(x.detach() / scale + zero_point)  # before compressed-tensors clamps them to -8..7
    clipped = (codes < -8) | (codes > 7)
    assert clipped.sum() < 0.05 * x.numel()
    assert clipped.any() or not symmetric  # symmetric: a row's max lands on 7.5 steps, beyond the top code 7
    assert torch.equal(x.grad, torch.where(clipped, torch.zeros_like(upstream), upstream))


def test_full_grid_keeps_the_paper_ste_clip_when_asked():
    x = torch.tensor([[-3.0, -2.0, -1.99, 0.0, 0.5, 1.99, 2.0, 7.0]], requires_grad=True)
    upstream = torch.arange(1.0, 9.0).unsqueeze(0)
    (fake_quantize(x, 4, grid="full") * upstream).sum().backward()
    inside = (x.detach().abs() < 2.0) & (x.detach() != 7.0)  # 7.0 is the row's max: 7.5 steps, clipped to 7
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_integer_matmul_sums_codes_exactly_where_a_float32_gemm_does_not():
    """The int32 accumulator of an int8 kernel, in float: exact past 2^24, where float32 sums round."""
    generator = torch.Generator().manual_seed(0)
    x_codes = torch.randint(100, 128, (4, 3000), generator=generator)
    w_codes = torch.randint(100, 128, (6, 3000), generator=generator) * torch.tensor([1, -1, 1, -1, 1, 1])[:, None]
    w_codes[0, :7] = -128  # the full grid's lowest code
    expected = x_codes @ w_codes.T  # int64
    assert torch.equal(integer_matmul(x_codes.float(), w_codes.float()), expected.double())
    assert not torch.equal((x_codes.float() @ w_codes.float().T).double(), expected.double())


def test_integer_linear_gradient_is_that_of_the_float_product():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64)
    weight, bias = torch.randn(5, 16, generator=generator, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_codes, x_scale = symmetric_codes(x, 8)
    w_codes, w_scale = symmetric_codes(weight, 8)
    upstream = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    leaves = [tensor.clone().requires_grad_() for tensor in (x_codes * x_scale, w_codes * w_scale, bias)]
    (integer_linear(*leaves, x_codes, x_scale, w_codes, w_scale) * upstream).sum().backward()
    expected = [tensor.clone().requires_grad_() for tensor in (x_codes * x_scale, w_codes * w_scale, bias)]
    (torch.nn.functional.linear(*expected) * upstream).sum().backward()
    for got, want in zip(leaves, expected):
        assert torch.allclose(got.grad, want.grad, rtol=1e-12, atol=0)


# ---- learned ranges: a clipping factor per row, LSQ's step-size gradient ----

@pytest.mark.parametrize("grid", ["paper", "full"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_learned_clipping_starts_as_the_minmax_quantizer(grid, group_size, dtype):
    """Clipping factors of 1 give the MinMax quantizer bit for bit, and the weight the same straight-through
    gradient: turning the lever on does not move the start."""
    weight = random_weight().to(dtype).requires_grad_()
    clip = torch.ones(48, *((96 // group_size,) if group_size else ()), 1)
    learned = fake_quantize_learned(weight, clip, 4, 2.0, group_size, grid)
    minmax = fake_quantize(weight, 4, True, 2.0, group_size, grid)
    assert learned.dtype == dtype and torch.equal(learned, minmax)
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(torch.autograd.grad(learned, weight, grad)[0], torch.autograd.grad(minmax, weight, grad)[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_learned_clipping_equals_pytorchs_learnable_fake_quantizer(bits, group_size):
    """PyTorch's LSQ fake quantizer (`_fake_quantize_learnable_per_channel_affine`) with the step sizes clip * MinMax:
    the same values bit for bit, and the same gradients to the weight and, through s = clip * MinMax, to the clip."""
    weight = random_weight().requires_grad_()
    rows = weight.detach().unflatten(-1, (-1, group_size)) if group_size else weight.detach()
    clip = (0.5 + 0.5 * torch.rand(*rows.shape[:-1], 1, generator=torch.Generator().manual_seed(2))).requires_grad_()
    ours = fake_quantize_learned(weight, clip, bits, None, group_size)
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    grad_weight, grad_clip = torch.autograd.grad(ours, (weight, clip), grad)

    minmax = rows.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    scale = (clip.detach() * minmax).flatten().requires_grad_()
    reference_input = rows.flatten(0, -2).clone().requires_grad_()
    qmax = 2 ** (bits - 1) - 1
    reference = torch._fake_quantize_learnable_per_channel_affine(reference_input, scale, torch.zeros_like(scale), 0,
                                                                 -qmax, qmax, 1.0)
    reference_grad_input, reference_grad_scale = torch.autograd.grad(reference, (reference_input, scale),
                                                                     grad.reshape(reference.shape))
    nonzero = torch.arange(48) != 5  # PyTorch's 0 * (1 / 0) in the all-zero row stops its gradient; ours passes
    assert torch.equal(ours, reference.reshape(weight.shape))
    assert torch.equal(grad_weight[nonzero], reference_grad_input.reshape(weight.shape)[nonzero])
    assert torch.equal(grad_weight[5], grad[5])
    torch.testing.assert_close(grad_clip.flatten(), reference_grad_scale * minmax.flatten(), rtol=1e-5, atol=1e-6)
    assert (ours != fake_quantize(weight, bits, True, None, group_size)).any()  # the clip < 1 clips


def test_learned_clipping_on_the_full_grid_has_lsq_gradients():
    """The full grid (recipe deploy) against LSQ written with autograd in float64: s = clip * max|x| / 7.5, codes
    clamp(round(x / s), -8, 7) with a straight-through round."""
    class RoundStraightThrough(torch.autograd.Function):
        forward = staticmethod(lambda ctx, v: torch.round(v))
        backward = staticmethod(lambda ctx, grad: grad)

    weight = random_weight().double().requires_grad_()
    clip = (0.5 + 0.5 * torch.rand(48, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    clip.requires_grad_()
    ours = fake_quantize_learned(weight, clip, 4, None, grid="full")
    scale = clip * weight.detach().abs().amax(-1, keepdim=True) / 7.5
    reference = torch.where(scale > 0, RoundStraightThrough.apply(weight / scale).clamp(-8, 7) * scale, 0)
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-15)
    ours_grads = torch.autograd.grad(ours, (weight, clip), grad)
    nonzero = torch.arange(48) != 5  # the reference's 0 / 0 in the all-zero row has no gradient
    for got, expected in zip(ours_grads, torch.autograd.grad(reference, (weight, clip), grad)):
        torch.testing.assert_close(got[nonzero], expected[nonzero], rtol=1e-12, atol=1e-12)
    assert (ours[5] == 0).all() and torch.equal(ours_grads[0][5], grad[5]) and ours_grads[1][5] == 0


@pytest.mark.parametrize("grid", ["paper", "full"])
def test_learned_clipping_holds_scales_in_bfloat16_as_the_minmax_quantizer_does(grid):
    weight = random_weight().requires_grad_()
    learned = fake_quantize_learned(weight, torch.ones(48, 1), 4, 2.0, grid=grid, scale_dtype=torch.bfloat16)
    assert torch.equal(learned, fake_quantize(weight, 4, True, 2.0, grid=grid, scale_dtype=torch.bfloat16))
    clip = torch.full((48, 1), 0.8, requires_grad=True)
    codes, scales = learned_codes(weight.detach(), clip.detach(), 4, grid, torch.bfloat16)
    assert torch.equal(scales, scales.bfloat16().float())
    clipped = fake_quantize_learned(weight, clip, 4, 2.0, grid=grid, scale_dtype=torch.bfloat16)
    assert torch.equal(clipped, (codes * scales).bfloat16().float())
    clipped.sum().backward()
    assert clip.grad.abs().sum() > 0  # the rounding of the scale passes its gradient


def test_learned_codes_times_scales_are_the_learned_fake_quantization():
    weight = random_weight()
    clip = 0.5 + 0.5 * torch.rand(48, 6, 1, generator=torch.Generator().manual_seed(2))
    for grid in ("paper", "full"):
        codes, scales = learned_codes(weight.unflatten(-1, (-1, 16)), clip, 4, grid)
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 8
        assert torch.equal((codes * scales).flatten(-2), fake_quantize_learned(weight, clip, 4, None, 16, grid))
