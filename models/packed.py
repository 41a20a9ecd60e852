"""The packed format: a QAT student as a compressed-tensors checkpoint of integer or float weights, and back.

The quantized weight of every `QuantLinear` is what it is, integer codes times one scale per output channel (or per
group of columns): paper eq. 1, symmetric MinMax; on the full grid of the "deploy" recipe, compressed-tensors'.
compressed-tensors (what vLLM and llm-compressor load) stores W2..W7 in its `pack-quantized` layout (32 codes of b bits
densely in b int32 words: two 4-bit codes per byte) and W8 in its `int-quantized` layout (one int8 per code); scales
stay float32, so codes * scale is the student's weight bit for bit. Activations are described as dynamic per-token at
A bits (`input_activations`); the KV quantizer, which the paper puts on the k/v projection outputs, as dynamic
per-token `output_activations` of k_proj/v_proj (post-RoPE keys: the `kv_cache_scheme`). With the full grid those
schemes are the student's own quantizers, so plain transformers + compressed-tensors run the export as trained
(pre-RoPE KV; docs/EXPORT.md says which engine runs what).

A floating-point scheme (models/schemes.py) is stored in compressed-tensors' own formats, by its own compressors
given the student's scales: FP8 E4M3 weights (`float-quantized`, float32 scales per tensor or channel), NVFP4
(`nvfp4-pack-quantized`: two E2M1 values per uint8, E4M3 `weight_scale` per group of 16 and the FP32
`weight_global_scale` g, a value being code * weight_scale / g) and MXFP4 (`mxfp4-pack-quantized`, uint8 E8M0
exponents per group of 32). Its activation and KV formats are described as they are, every scale dynamic as the
student computes it. compressed-tensors 0.20 decompresses FP4 weights in bfloat16 only, so plain transformers runs
those exports in bfloat16; FP8 ones run as trained in float32.

This module owns the format: the codes and scales (`integer_weight`, `stored_weight`), the mapping of a student's `llm_qat` settings
to compressed-tensors' words (`compressed_tensors_config`), recognising an export (`is_packed_export`) and reading it
back as the student (`load_packed`), from its stored codes and scales, never re-derived. models/export.py writes it.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import saved_config
from .quantize import CONFIG_KEY, KV_PROJECTIONS, FloatQuantizer, QATConfig, QuantLinear, quantize_model
from .quantizers import FULL_PRECISION
from .schemes import QuantSpec


def integer_weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes (int8, [out, in]) and scales (float: [out, 1] per channel, [out, in / G] per group of
    G columns) of `layer`'s weight, with codes * scales (per group) == `layer.quantized_weight()` bit for bit: the
    same scale and rounding as `models.quantizers` on the layer's grid."""
    codes, scales = layer.weight_codes()
    return codes.to(torch.int8), scales


def dequantized_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes * scales, each scale applied to its channel or group of columns."""
    return codes.float() * scales.repeat_interleave(codes.shape[-1] // scales.shape[-1], dim=-1)


def stored_weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What compressed-tensors' compressor is handed for `layer`: the weight on its grid (float32, equal to
    `layer.quantized_weight()`), the scales to store (`weight_scale`) and NVFP4's global scale (None otherwise).
    The compressor re-derives the codes as round(weight / scale); from codes * scale that division is exact, so the
    stored codes are the student's."""
    if isinstance(layer.weight_quantizer, FloatQuantizer):
        scales, global_scale = layer.weight_quantizer.scales(layer.weight.detach())
        return layer.quantized_weight().detach(), scales, global_scale
    codes, scales = integer_weight(layer)
    # An all-zero row gets scale 1 instead of 0 (0 / 0 would be nan); its codes stay 0.
    return dequantized_weight(codes, scales), torch.where(scales > 0, scales, torch.ones_like(scales)), None


def quantization_args(spec: QuantSpec, **override):
    """compressed-tensors' QuantizationArgs of `spec`, which uses its words already."""
    from compressed_tensors.quantization import QuantizationArgs

    fields = {**asdict(spec), **override}
    scale_dtype = fields.pop("scale_dtype")
    return QuantizationArgs(**fields, scale_dtype=getattr(torch, scale_dtype) if scale_dtype else None)


def compressed_tensors_config(settings: dict, layer_names: list[str], output_layer: str):
    """The compressed-tensors QuantizationConfig describing a student with `settings` (llm_qat dict)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config = QATConfig(**settings)
    if config.scheme:
        weights = quantization_args(config.weight_spec)
        # The student computes every activation scale at each forward; a static one (FP8's) would be calibrated.
        activations = config.input_spec and quantization_args(config.input_spec, dynamic=True)
        # FP8: compressed-tensors' name for float weights (its inference picks the generic naive-quantized)
        storage = "float-quantized" if weights.num_bits == 8 else \
            infer_module_format(nn.Linear, QuantizationScheme(targets=[], weights=weights)).value
    else:
        group_size = config.w_group_size
        weights = QuantizationArgs(num_bits=config.w_bits, type="int", symmetric=True, group_size=group_size,
                                   strategy="group" if group_size else "channel")
        activations = None if config.a_bits == FULL_PRECISION else QuantizationArgs(
            num_bits=config.a_bits, type="int", symmetric=config.act_symmetric, strategy="token", dynamic=True)
        storage = "int-quantized" if config.w_bits == 8 else "pack-quantized"
    kv = quantization_args(config.kv_spec) if config.kv_spec else None if config.kv_bits == FULL_PRECISION else \
        QuantizationArgs(num_bits=config.kv_bits, type="int", symmetric=True, strategy="token", dynamic=True)

    def leaf_regex(names):  # one target per projection kind, e.g. "re:.*\.(q_proj|o_proj)$"
        leaves = sorted({name.rpartition(".")[2] for name in names})
        return [rf"re:.*\.({'|'.join(leaves)})$"]

    # pre_rope: the KV quantizer sits on the k/v projection outputs; post_rope: on the cache (keys after rotary
    # embedding), which is what compressed-tensors' kv_cache_scheme describes.
    post_rope = config.kv_placement == "post_rope"
    kv_layers = [] if post_rope else [name for name in layer_names if name.rpartition(".")[2] in KV_PROJECTIONS]
    other_layers = [name for name in layer_names if name not in kv_layers]
    groups = {}
    if other_layers:
        groups["group_0"] = QuantizationScheme(targets=leaf_regex(other_layers), weights=weights,
                                               input_activations=activations, format=storage)
    if kv_layers:
        groups["group_1"] = QuantizationScheme(targets=leaf_regex(kv_layers), weights=weights,
                                               input_activations=activations, output_activations=kv, format=storage)
    return QuantizationConfig(config_groups=groups, ignore=[output_layer], format=storage,
                              kv_cache_scheme=kv if post_rope else None, quantization_status="frozen")


def is_packed_export(path: str | Path) -> bool:
    """A `scripts/export.py --format packed` checkpoint (compressed-tensors weights plus `llm_qat`)."""
    config = saved_config(path)
    return bool(config.get(CONFIG_KEY)) and (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except SafetensorError as err:
            raise OSError(f"{file} cannot be read ({err}); the file is truncated or damaged: export it again") from None
    return tensors


def decompressed(tensors: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """A layer's float32 weight from its stored `tensors` (local names), by compressed-tensors' decompressor of
    `scheme.format`. Its NVFP4 decompressor unpacks the E2M1 values in bfloat16 (`unpack_fp4_from_uint8`'s default
    dtype), which rounds code * scale / g; float32 holds it exactly, so that one is unpacked here in float32 and
    dequantized by compressed-tensors' `dequantize`."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    if scheme.format != "nvfp4-pack-quantized":
        return BaseCompressor.get_value_from_registry(scheme.format).decompress(tensors, scheme)["weight"].float()
    packed = tensors["weight_packed"]
    values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    return dequantize(values, tensors["weight_scale"].float(), args=scheme.weights,
                      global_scale=tensors["weight_global_scale"], dtype=torch.float32)


def load_packed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a `packed` export back as the quantized student (float32).

    compressed-tensors' own decompressor turns each layer's packed codes and scales back into weights,
    bit-identical to the student's fake-quantized weights. The student's activation and KV quantizers are
    then put back from `llm_qat`: on the paper's grid compressed-tensors' dynamic quantizers use a different
    range (scale = max|x| / (2^(b-1) - 0.5), codes down to -2^(b-1)), so running its forward would not give the
    student's logits; on the full grid they would (pre-RoPE KV), and this gives the same."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules, match_targets
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    packing = getattr(config, "quantization_config", None)
    settings = getattr(config, CONFIG_KEY, None)
    if not packing or not settings:
        raise ValueError(f"{path} is not a packed export (its config.json needs 'quantization_config' and "
                         f"'{CONFIG_KEY}'); create one with: python scripts/export.py CKPT {path} --format packed")
    packing = QuantizationConfig.model_validate(packing)
    del config.quantization_config  # the weights are decompressed here, not by transformers' quantizer
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tensors = _read_tensors(path)
    schemes = {target: scheme for scheme in packing.config_groups.values() for target in scheme.targets}
    state, stored_scales = {}, {}
    for name, module in match_named_modules(model, schemes, packing.ignore):
        scheme = schemes[match_targets(name, module, schemes)[0]]
        prefix = f"{name}."
        local = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        if scheme.weights.type == "int":
            stored_scales[name] = local["weight_scale"].to(torch.float32)
        state[f"{prefix}weight"] = decompressed(local, scheme)
        if "bias" in local:
            state[f"{prefix}bias"] = local["bias"]
    state.update(tensors)  # embeddings, norms, lm_head
    result = model.load_state_dict(state, strict=False)
    tied = {f"{name}.weight" for name, module in model.named_modules()
            if module is model.get_output_embeddings() and config.tie_word_embeddings}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{path} does not match its config: missing {sorted(set(result.missing_keys) - tied)}, "
                         f"unexpected {result.unexpected_keys}; export it again with scripts/export.py")
    student = quantize_model(model, **settings)
    for name, scales in stored_scales.items():  # an integer product uses them as vLLM does, never re-derived
        student.get_submodule(name).weight_scale = scales
    return student.to(device).eval()
