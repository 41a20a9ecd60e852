"""Export a QAT student as a checkpoint that is actually small (`packed`) or plain float (`folded`): the writer.

LLM-QAT (Liu et al., 2023) only fake-quantizes: its checkpoints hold full-size float weights. An export writes the
quantized weights of every `QuantLinear` as what they are:

  - `packed`: integer codes (or FP8 / FP4 values) and scales in the compressed-tensors format that vLLM and
    llm-compressor load (models/packed.py: the format, and loading it back). The exact settings also stay under
    `llm_qat`, which `load_packed` uses to rebuild the student with this repo's own quantizers.
  - `folded`: a plain Hugging Face checkpoint whose float weights already hold the dequantized values;
    `llm_qat` stays in its config, so `load_student` rebuilds the same student from it.
Both record their format under `llm_qat_export`, and whatever loads them uses the stored weights (codes * scales) as
they are, never re-deriving the scales: on the full grid that is not idempotent (an int4 row whose largest code is
-8 would come back with scale max / 7.5 = 8s / 7.5), so re-quantizing moved a deploy student's logits by 1-16 %.
Embeddings, norms and lm_head stay float, in the dtype the checkpoint was saved in. A rotated student
(`rotate`, models/rotations.py) exports its weights with R1, R2 and R4's inverse folded in, as it trained them;
its online rotations are recorded under `llm_qat` only, so only `load_packed` / `load_student` run it as trained.

An export never writes into a training run or over files the user did not ask to replace, and is written beside its
target and renamed into place, so an interrupted export leaves nothing half-written. (utils/safety.py has the same
staged write for the stages above; models/ imports nothing of them, so this one is its own.)
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_student, saved_config, saved_settings
from .packed import compressed_tensors_config, stored_weight
from .quantize import CONFIG_KEY, EXPORT_KEY, QATConfig, quantized_modules

logger = logging.getLogger(__name__)

PACKED, FOLDED = "packed", "folded"
FORMATS = (PACKED, FOLDED)
PACKABLE_BITS = range(2, 9)
# Files of a checkpoint that an export rewrites itself or leaves behind; the rest (tokenizer files) is copied.
_NOT_COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json", "trainer_state.json")
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".py", ".pt", ".pth")


def checkpoint_settings(path: Path) -> QATConfig:
    """The `llm_qat` settings of a QAT checkpoint directory, or one clear error if it has none."""
    settings = saved_settings(path)
    if settings is None:
        raise ValueError(f"{path} is not a QAT checkpoint (its config.json has no '{CONFIG_KEY}'): quantize/train "
                         "it first (models.quantize_model + save_quantized), or pass a directory a QAT run saved")
    return settings


def saved_dtype(path: str | Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (its float parts are exported in it, losslessly)."""
    config = saved_config(path)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def is_training_run(directory: Path) -> bool:
    """A Trainer output directory or one of its checkpoints: exporting there would replace what a resumed run
    loads (its weights would become the export's)."""
    return (re.fullmatch(r"checkpoint-\d+", directory.name) is not None or (directory / "trainer_state.json").exists()
            or any(directory.glob("checkpoint-*")))


def check_export_target(checkpoint: Path, out_dir: Path, force: bool) -> None:
    """Before any model loads: never over the checkpoint or into a training run; a non-empty directory only with
    `force`."""
    if out_dir.resolve() == checkpoint.resolve():
        raise ValueError(f"the output {out_dir} is the checkpoint itself, whose float weights an export would "
                         "overwrite; pass another output directory")
    if out_dir.is_dir() and is_training_run(out_dir):
        raise ValueError(f"the output {out_dir} is a training run or one of its checkpoints, which a resumed run "
                         "would load; pass a new output directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output {out_dir} is a file; pass a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"the output {out_dir} is not empty; pass --force to replace its contents, or a new "
                         "output directory")


def _load_student(checkpoint: Path, export_format: str, out_dir: Path, force: bool):
    checkpoint = Path(checkpoint)
    settings = checkpoint_settings(checkpoint)
    if export_format == PACKED and settings.input_spec and settings.input_spec.dynamic == "local":
        raise ValueError(f"{checkpoint} ({settings.label()}) quantizes activations with a global scale that "
                         "compressed-tensors and vLLM take from calibration, where the student computes one per "
                         "forward; export it --format folded, or train weights only (--scheme NVFP4A16) to pack it")
    if export_format == PACKED and not settings.scheme and settings.w_bits not in PACKABLE_BITS:
        raise ValueError(f"the packed format needs w_bits in 2..8 but {checkpoint} has w_bits={settings.w_bits} "
                         "(its weights are not quantized); use --format folded, or train with --w_bits 2..8")
    if export_format == FOLDED and settings.learn_ranges != "none" and settings.integer_product:
        raise ValueError(f"{checkpoint} ({settings.label()}) multiplies integer codes by scales that its learned "
                         "ranges set, and a folded export keeps no scales (they would be re-derived from the largest "
                         "weights); use --format packed, which stores them")
    if saved_config(checkpoint).get(EXPORT_KEY):
        raise ValueError(f"{checkpoint} is a {saved_config(checkpoint)[EXPORT_KEY]} export already; export the QAT "
                         "checkpoint it was exported from")
    check_export_target(checkpoint, out_dir, force)
    if settings.rotate != "none":  # R1, R2 and R4's inverse are in the weights; R4 and R3 run at inference
        logger.warning("%s is rotated (%s): the export records its online rotations (down_proj's input, post-RoPE "
                       "keys) under %s, which load_model applies; engines that do not (plain transformers, vLLM) "
                       "would not compute the student", checkpoint, settings.label(), CONFIG_KEY)
    # float32: the student's quantizers ran in float32 during QAT, and its scales are float32 values.
    return load_student(checkpoint, dtype=torch.float32), checkpoint


def _copy_side_files(source: Path, target: Path) -> None:
    """Copy tokenizer and other side files; skip weights, configs, the student's remote code and a training run's
    state (with it the export would look like a training run, which a later export refuses to replace)."""
    for item in source.iterdir():
        if item.is_file() and item.suffix not in _NOT_COPIED_SUFFIXES and item.name not in _NOT_COPIED:
            shutil.copy2(item, target / item.name)


def _write_checkpoint(model: nn.Module, export_format: str, source: Path, out_dir: Path, compressor=None) -> None:
    """Save the exported model with the source's tokenizer files, without the student's remote code: into a
    temporary sibling first, renamed into place when whole (replacing `out_dir`, checked beforehand)."""
    if hasattr(model.config, "auto_map"):  # it points at the student's loader, which an export does not carry
        del model.config.auto_map
    setattr(model.config, EXPORT_KEY, export_format)  # loaders use the stored weights as they are (models.quantize)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        _copy_side_files(source, staging)
        if compressor is not None:
            compressor.update_config(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _with_plain_linears(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Swap each QuantLinear named in `weights` for an nn.Linear holding that weight (the quantizers are
    described by the export's config instead)."""
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
        plain.bias = layer.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)


def export_packed(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the QAT checkpoint directory as a compressed-tensors checkpoint of integer weights; return `out_dir`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    out_dir = Path(out_dir)
    model, source = _load_student(checkpoint, PACKED, out_dir, force)
    settings = model.config.llm_qat
    layers = quantized_modules(model)
    output_layer = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    stored = {name: stored_weight(layer) for name, layer in tqdm(layers.items(), desc="Quantizing weights")}

    model.to(saved_dtype(source))  # embeddings, norms, lm_head: stored as they were saved
    _with_plain_linears(model, {name: weight for name, (weight, _, _) in stored.items()})
    config = compressed_tensors_config(settings, list(layers), output_layer)
    apply_quantization_config(model, config)
    for name, (_, scales, global_scale) in stored.items():
        module = model.get_submodule(name)
        module.weight_scale.data = scales
        if global_scale is not None:
            module.weight_global_scale.data = global_scale

    compressor = ModelCompressor.from_pretrained_model(model)
    # compressed-tensors 0.20 re-derives the config from the modules and finds a cached attention by its forward's
    # `past_key_values` parameter, which transformers 5.24 renamed: the KV-cache scheme is ours to state.
    compressor.quantization_config.kv_cache_scheme = config.kv_cache_scheme
    compressor.compress_model(model)
    _write_checkpoint(model, PACKED, source, out_dir, compressor)
    logger.info("Wrote a packed %s checkpoint (%s, compressed-tensors %s) to %s", type(model).__name__,
                QATConfig(**settings).label(), config.format, out_dir)
    return out_dir


def export_folded(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the QAT checkpoint as a plain float checkpoint whose weights hold the quantized values."""
    out_dir = Path(out_dir)
    model, source = _load_student(checkpoint, FOLDED, out_dir, force)
    layers = quantized_modules(model)
    # float32, not the saved dtype: codes * scale needs float32 to stay exactly on the quantization grid.
    folded = {name: layer.quantized_weight().detach().clone() for name, layer in layers.items()}
    _with_plain_linears(model, folded)
    _write_checkpoint(model, FOLDED, source, out_dir)
    logger.info("Wrote a folded float32 checkpoint (weights on the grid of %s) to %s",
                QATConfig(**model.config.llm_qat).label(), out_dir)
    return out_dir


def export(checkpoint: str | Path, out_dir: str | Path, export_format: str = PACKED, force: bool = False) -> Path:
    """Export the QAT checkpoint directory `checkpoint` (a local path: resolve names before) to `out_dir`."""
    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; use one of: {', '.join(FORMATS)}")
    return (export_packed if export_format == PACKED else export_folded)(checkpoint, out_dir, force)
