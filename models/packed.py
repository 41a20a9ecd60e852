"""The packed format: a QAT student as a compressed-tensors checkpoint of integer weights, and back.

The quantized weight of every `QuantLinear` is what it is, integer codes times one scale per output channel (or per
group of columns): paper eq. 1, symmetric MinMax; on the full grid of the "deploy" recipe, compressed-tensors'.
compressed-tensors (what vLLM and llm-compressor load) stores W2..W7 in its `pack-quantized` layout (32 codes of b bits
densely in b int32 words: two 4-bit codes per byte) and W8 in its `int-quantized` layout (one int8 per code); scales
stay float32, so codes * scale is the student's weight bit for bit. Activations are described as dynamic per-token at
A bits (`input_activations`); the KV quantizer, which the paper puts on the k/v projection outputs, as dynamic
per-token `output_activations` of k_proj/v_proj (post-RoPE keys: the `kv_cache_scheme`). With the full grid those
schemes are the student's own quantizers, so plain transformers + compressed-tensors run the export as trained
(pre-RoPE KV; docs/EXPORT.md says which engine runs what).

This module owns the format: the codes and scales (`integer_weight`), the mapping of a student's `llm_qat` settings
to compressed-tensors' words (`compressed_tensors_config`), recognising an export (`is_packed_export`) and reading it
back as the student (`load_packed`), from its stored codes and scales, never re-derived. models/export.py writes it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import saved_config
from .quantize import CONFIG_KEY, KV_PROJECTIONS, QuantLinear, quantize_model
from .quantizers import FULL_PRECISION


def integer_weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes (int8, [out, in]) and scales (float: [out, 1] per channel, [out, in / G] per group of
    G columns) of `layer`'s weight, with codes * scales (per group) == `layer.quantized_weight()` bit for bit: the
    same scale and rounding as `models.quantizers` on the layer's grid."""
    codes, scales = layer.weight_codes()
    return codes.to(torch.int8), scales


def dequantized_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes * scales, each scale applied to its channel or group of columns."""
    return codes.float() * scales.repeat_interleave(codes.shape[-1] // scales.shape[-1], dim=-1)


def compressed_tensors_config(settings: dict, layer_names: list[str], output_layer: str):
    """The compressed-tensors QuantizationConfig describing a student with `settings` (llm_qat dict)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    w_bits, a_bits, kv_bits = settings["w_bits"], settings["a_bits"], settings["kv_bits"]
    storage = "int-quantized" if w_bits == 8 else "pack-quantized"
    group_size = settings.get("w_group_size")
    weights = QuantizationArgs(num_bits=w_bits, type="int", symmetric=True, strategy="group" if group_size else
                               "channel", group_size=group_size)
    activations = None if a_bits == FULL_PRECISION else QuantizationArgs(
        num_bits=a_bits, type="int", symmetric=settings["act_symmetric"], strategy="token", dynamic=True)
    kv = None if kv_bits == FULL_PRECISION else QuantizationArgs(
        num_bits=kv_bits, type="int", symmetric=True, strategy="token", dynamic=True)

    def leaf_regex(names):  # one target per projection kind, e.g. "re:.*\.(q_proj|o_proj)$"
        leaves = sorted({name.rpartition(".")[2] for name in names})
        return [rf"re:.*\.({'|'.join(leaves)})$"]

    # pre_rope: the KV quantizer sits on the k/v projection outputs; post_rope: on the cache (keys after rotary
    # embedding), which is what compressed-tensors' kv_cache_scheme describes.
    post_rope = settings.get("kv_placement") == "post_rope"
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
    """A `scripts/export.py --format packed` checkpoint (compressed-tensors integer weights plus `llm_qat`)."""
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


def load_packed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a `packed` export back as the quantized student (float32).

    compressed-tensors' own decompressor turns each layer's packed codes and scales back into weights,
    bit-identical to the student's fake-quantized weights. The student's activation and KV quantizers are
    then put back from `llm_qat`: on the paper's grid compressed-tensors' dynamic quantizers use a different
    range (scale = max|x| / (2^(b-1) - 0.5), codes down to -2^(b-1)), so running its forward would not give the
    student's logits; on the full grid they would (pre-RoPE KV), and this gives the same."""
    from compressed_tensors.compressors import BaseCompressor
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
        stored_scales[name] = local["weight_scale"].to(torch.float32)
        decompressor = BaseCompressor.get_value_from_registry(scheme.format)
        weight = decompressor.decompress(local, scheme)["weight"]
        state[f"{prefix}weight"] = weight.to(torch.float32)
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
