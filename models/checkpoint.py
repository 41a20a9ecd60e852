"""Saved students: the checkpoint format that reloads as the quantized model, here or anywhere.

A student checkpoint is a Hugging Face checkpoint of the float (latent) weights whose `config.json` holds the
quantizer settings under `llm_qat`. `save_quantized` (and every training checkpoint, through
`write_remote_code`) also puts the quantizer sources and a small modeling file beside the weights, with an
`auto_map` entry, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `lm_eval --model hf
--model_args pretrained=dir,trust_remote_code=True` build the quantized student, not the float model.
`load_student` is the same in this repository, without remote code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .quantize import CONFIG_KEY, LEARNED_CLIP, QATConfig, quantize_model

# The files `trust_remote_code` imports: they may import only torch, transformers, the standard library and
# each other (see models/quantize.py).
REMOTE_CODE_SOURCES = ("quantizers.py", "float_quantizers.py", "schemes.py", "rotations.py", "quantize.py")
REMOTE_MODELING_FILE = "modeling_llm_qat.py"

_REMOTE_MODELING = '''"""Loads this checkpoint as the LLM-QAT quantized student: written by models/checkpoint.py."""
from transformers import {base} as _Base

from .quantize import quantize_model


class QAT{base}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        quantize_model(self, **config.{key})
'''


def saved_config(directory: str | Path) -> dict:
    """The config.json of a saved checkpoint directory, or {} where there is none."""
    config_file = Path(directory) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def saved_settings(directory: str | Path) -> QATConfig | None:
    """The quantizer settings a checkpoint was saved with; None for a float checkpoint."""
    settings = saved_config(directory).get(CONFIG_KEY)
    return QATConfig(**settings) if settings else None


def write_remote_code(save_dir: str | Path) -> None:
    """Put the quantizer sources and the modeling file beside a saved checkpoint and point `auto_map` at it."""
    save_dir = Path(save_dir)
    config_file = save_dir / "config.json"
    config = json.loads(config_file.read_text())
    architecture = config["architectures"][0].removeprefix("QAT")  # re-saved from a remote-code load
    config["architectures"] = [architecture]
    here = Path(__file__).parent
    for source in REMOTE_CODE_SOURCES:
        shutil.copyfile(here / source, save_dir / source)
    (save_dir / REMOTE_MODELING_FILE).write_text(_REMOTE_MODELING.format(base=architecture, key=CONFIG_KEY))
    config["auto_map"] = {"AutoModelForCausalLM": f"{Path(REMOTE_MODELING_FILE).stem}.QAT{architecture}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_quantized(model: nn.Module, save_dir: str | Path, tokenizer=None, **save_kwargs) -> None:
    """`save_pretrained` plus the remote-code files; the weights stay the float (latent) weights."""
    if not getattr(model.config, CONFIG_KEY, None):
        raise ValueError("save_quantized needs a model prepared with quantize_model")
    model.save_pretrained(save_dir, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    write_remote_code(save_dir)


def damaged_weight_file(directory: str | Path) -> Path | None:
    """The first *.safetensors file in `directory` whose header or size does not read back, if any."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # reading each slice's metadata checks the file holds its bytes
                    handle.get_slice(key)
        except (SafetensorError, OSError):
            return file
    return None


def _model_class(path: str | Path):
    """AutoModelForCausalLM; for a student with learned ranges, its architecture told that the clipping factors in
    its weight files are expected (`load_learned_ranges` reads them), so that loading does not report them lost."""
    if (saved_config(path).get(CONFIG_KEY) or {}).get("learn_ranges", "none") == "none":
        return AutoModelForCausalLM
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    return type(base.__name__, (base,), {"__module__": base.__module__,
                                         "_keys_to_ignore_on_load_unexpected": [rf"\.{LEARNED_CLIP}$"]})


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, with a truncated or damaged weight file named in one line."""
    try:
        return _model_class(path).from_pretrained(path, dtype=dtype)
    except SafetensorError as err:
        damaged = damaged_weight_file(path) if Path(path).is_dir() else None
        raise OSError(f"{damaged or path} cannot be read ({err}); the file is truncated or damaged: save, export or "
                      "download that model again") from None


def with_saved_structure(model: nn.Module, quantized: bool = True) -> nn.Module:
    """`model`, just built from a saved config, made what its `llm_qat` settings say: the quantized student, or with
    `quantized=False` its float function (16 bits, with the online rotations of a rotated student, without which its
    float weights would not compute it). Every process builds a saved model through here, whether it reads the
    weights or receives them (FSDP2's RAM-efficient loading), so all build the same one."""
    settings = getattr(model.config, CONFIG_KEY, None)
    saved = QATConfig(**settings) if settings else None
    if saved and quantized:
        quantize_model(model, saved)
    elif saved and saved.rotate != "none":  # 16 bits everywhere, the rotations kept
        quantize_model(model, QATConfig(rotate=saved.rotate, rotate_seed=saved.rotate_seed))
    return model


def load_learned_ranges(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy a student's learned clipping factors (`learn_ranges`) from the weight files of `path` into `model`: the
    float model that `from_pretrained` builds has no place for them, so it leaves them out."""
    wanted = {name: parameter for name, parameter in model.named_parameters() if name.endswith(LEARNED_CLIP)}
    found = {}
    for file in sorted(Path(path).glob("*.safetensors")) if wanted else ():
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys() if key in wanted})
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        raise ValueError(f"{path} says its weight ranges are learned (learn_ranges) but holds no {missing[0]}; save "
                         "the student again, or load it with quantized=False and quantize it anew")
    with torch.no_grad():
        for name, value in found.items():
            wanted[name].copy_(value)
    return model


def load_student(path: str | Path, dtype: torch.dtype = torch.float32, quantized: bool = True) -> nn.Module:
    """A saved model; a student (its config holds `llm_qat`) comes back quantized unless `quantized=False` (its
    float latent weights, e.g. as a teacher; see `with_saved_structure`), with its learned ranges if it has them."""
    model = with_saved_structure(from_pretrained(path, dtype), quantized)
    return load_learned_ranges(model, path) if quantized else model
