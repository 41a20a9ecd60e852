"""The floating-point fake quantizers (models/float_quantizers.py) and their presets (models/schemes.py), against
compressed-tensors' own code, the independent reference: its presets (`preset_name_to_scheme`), its scales
(`calculate_qparams` as its min-max observers call it, `compute_dynamic_scales_and_zp`, `generate_gparam`) and its
`fake_quantize`, compared with torch.equal."""
import pytest
import torch
from compressed_tensors.quantization import FP4_E2M1_DATA, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as library_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam

from models.float_quantizers import FORMAT_MAX, check_float_spec, fake_quantize_float, round_to_e2m1
from models.schemes import GROUPED, SCHEMES, QuantSpec

ROLES = ("weights", "input_activations")
CASES = [(name, role) for name, scheme in SCHEMES.items() for role in ROLES if getattr(scheme, role) is not None]


def library_args(name, role):
    return getattr(preset_name_to_scheme(name, ["Linear"]), role)


def test_presets_are_compressed_tensors_presets_field_for_field():
    for name, scheme in SCHEMES.items():
        for role in ROLES:
            ours, theirs = getattr(scheme, role), library_args(name, role)
            assert (ours is None) == (theirs is None), (name, role)
            if ours is not None:
                scale_dtype = str(theirs.scale_dtype).removeprefix("torch.") if theirs.scale_dtype else None
                assert ours == QuantSpec(theirs.num_bits, theirs.type, theirs.strategy, theirs.group_size,
                                         theirs.symmetric, theirs.dynamic, scale_dtype), (name, role)


def library_qparams(x, args, weight):
    """compressed-tensors' scales, zero points and NVFP4 global scale of `x`: for weights what its min-max observer
    hands `calculate_qparams` (the whole tensor, each row, or each group), for activations its dynamic path; the
    global scale from the whole tensor's range."""
    global_scale = generate_gparam(x.amin(), x.amax()) if args.strategy == "tensor_group" else None
    if not weight:
        return (*compute_dynamic_scales_and_zp(x, args, module=None, global_scale=global_scale), global_scale)
    if args.strategy == "tensor":
        low, high = x.amin(), x.amax()
    elif args.strategy == "channel":
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        groups = x.unflatten(-1, (-1, args.group_size))
        low, high = groups.amin(-1), groups.amax(-1)
    return (*calculate_qparams(low, high, args, global_scale=global_scale), global_scale)


def library_result(x, args, weight):
    scale, zero_point, global_scale = library_qparams(x, args, weight)
    return library_fake_quantize(x, scale, zero_point, args, global_scale=global_scale)


def library_inside(x, args, weight):
    """Where |x / s| <= the format's max, s the scale compressed-tensors divides by: where the gradient passes."""
    scale, _, global_scale = library_qparams(x, args, weight)
    scale = scale if global_scale is None else scale / global_scale
    if args.strategy in GROUPED:
        scaled = (x.unflatten(-1, (-1, args.group_size)) / scale.unsqueeze(-1)).flatten(-2)
    else:
        scaled = x / scale
    return scaled.abs() <= FORMAT_MAX[args.num_bits]


def tensor_with_outliers(role, dtype=torch.float32, seed=0):
    """Rows of very different ranges with outliers, a row of zeros, groups far below the tensor's max (an NVFP4 group
    scale that underflows E4M3), and group maxima on and just below MX's round-up point 1.75 * 2^k."""
    generator = torch.Generator().manual_seed(seed)
    shape = (48, 256) if role == "weights" else (2, 9, 256)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x *= torch.logspace(-4, 1, shape[-1], dtype=torch.float64)[torch.randperm(shape[-1], generator=generator)]
    rows = x.view(-1, shape[-1])
    rows[1] = 0
    rows[2, :32] = 1e-30
    rows[3, ::17] *= 100
    rows[4, :128] = torch.rand(128, generator=generator, dtype=torch.float64)
    rows[4, [0, 32, 64, 96]] = torch.tensor([14.0, torch.nextafter(torch.tensor(14.0), torch.tensor(0.0)), -14.0, 8.0],
                                            dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,role", CASES)
def test_fake_quantization_equals_compressed_tensors(name, role, dtype):
    spec, args = getattr(SCHEMES[name], role), library_args(name, role)
    for seed in range(3):
        x = tensor_with_outliers(role, dtype, seed)
        quantized = fake_quantize_float(x, spec)
        assert quantized.dtype == dtype
        assert torch.equal(quantized, library_result(x, args, role == "weights"))
        assert not torch.equal(quantized, x)
        assert torch.equal(quantized.view(-1, x.shape[-1])[1], torch.zeros(x.shape[-1], dtype=dtype))


def test_e2m1_rounding_is_compressed_tensors_with_ties_to_even():
    x = torch.arange(-6, 6.0001, 1 / 64, dtype=torch.float64)  # every midpoint between E2M1 values, and around them
    expected = FP4_E2M1_DATA.cast_to_fp4(x)
    assert torch.equal(round_to_e2m1(x), expected) and torch.equal(round_to_e2m1(x.float()), expected.float())
    assert set(expected.abs().tolist()) == {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert round_to_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == [0, 1, 1, 2, 2, 4, 4]


@pytest.mark.parametrize("name,role", CASES)
def test_gradient_passes_exactly_where_the_format_does_not_clip(name, role):
    spec, args = getattr(SCHEMES[name], role), library_args(name, role)
    x = tensor_with_outliers(role).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (fake_quantize_float(x, spec) * upstream).sum().backward()
    inside = library_inside(x.detach(), args, role == "weights")
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    if spec.scale_dtype == "uint8":  # MX scales are powers of two: a group's max lands 3.5 to 7 steps up
        assert not inside.all()


def test_gradient_is_also_zero_where_magnitude_reaches_ste_clip():
    spec = SCHEMES["NVFP4"].weights
    x = tensor_with_outliers("weights").requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (fake_quantize_float(x, spec, ste_clip=2.0) * upstream).sum().backward()
    inside = library_inside(x.detach(), library_args("NVFP4", "weights"), True) & (x.detach().abs() < 2.0)
    assert not inside.all()
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


@pytest.mark.parametrize("name,role", CASES)
def test_bfloat16_inputs_are_quantized_with_float32_math(name, role):
    spec = getattr(SCHEMES[name], role)
    x = tensor_with_outliers(role).bfloat16().requires_grad_()
    quantized = fake_quantize_float(x, spec)
    assert quantized.dtype == torch.bfloat16
    assert torch.equal(quantized, fake_quantize_float(x.detach().float(), spec).bfloat16())
    quantized.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_float64_stays_float64_with_a_float32_nvfp4_global_scale():
    x = tensor_with_outliers("weights", torch.float64)
    quantized = fake_quantize_float(x, SCHEMES["NVFP4"].weights)
    assert quantized.dtype == torch.float64
    assert not torch.equal(quantized, fake_quantize_float(x.float(), SCHEMES["NVFP4"].weights).double())


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(6, "float"), QuantSpec(4, "float", "channel"),
                                  QuantSpec(8, "float", symmetric=False),
                                  QuantSpec(4, "float", "group", group_size=16, scale_dtype="uint8")])
def test_formats_other_than_fp8_nvfp4_and_mxfp4_are_refused(spec):
    with pytest.raises(ValueError, match="not a format these quantizers compute"):
        check_float_spec(spec)


def test_a_spec_needs_a_group_size_exactly_with_a_group_strategy():
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, "float", "group")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(8, "float", "channel", group_size=32)
