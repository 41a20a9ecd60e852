"""The paper's training-free baselines besides RTN (Table 1): GPTQ (weights) and SmoothQuant (weights and
activations), run by llm-compressor's `oneshot` and calibrated on the teacher's own generated data, so they are
data-free as LLM-QAT is. Not written by hand: llm-compressor is the implementation the field uses.

llm-compressor 0.14 pins transformers <= 5.17, so it lives in its own environment: `make baselines` makes
.venv-baselines (`pip install -e '.[baselines]'`); the main environment does not need it.

A baseline is saved as a float model directory whose config.json records what was done (`BASELINE_KEY`):
- gptq: every decoder linear layer's weights on llm-compressor's W-bit symmetric grid, one scale per output channel
  (the paper's granularity) or per group of `w_group_size` input columns, stored dequantized. Evaluated at W-A-KV
  (with that group size), only the A and KV quantizers are added: rounding the weights again would be a second,
  different quantizer. Beside it, `compressed/` holds the same weights as llm-compressor saves them (integer codes
  and scales in the compressed-tensors format), which vLLM serves as a quantized model: W4A16, or with `a_bits` 8
  also dynamic per-token int8 activations (W8A8). GPTQ calibrates the weights only, with every quantizer off
  (llm-compressor's sequential pipeline), so `a_bits` changes the export's scheme, not the weights.
- smoothquant: activation outliers moved into the weights (scale alpha, SmoothQuant's eq. 4) through the RMSNorm
  scales; still float. Evaluated at W-A-KV, all three quantizers are applied exactly as for RTN.
So at one W-A-KV the methods differ only in their weights, as in the paper's Table 1.

A GPTQ model is also a start for QAT (train.py --init_from, run_train.sh INIT=gptq; beyond the paper, whose student
starts from the teacher's weights, i.e. from round-to-nearest). Starting from a better quantized model than RTN is
EfficientQAT's first stage (Chen et al. 2024, block-wise reconstruction before end-to-end training); here the
reconstruction is GPTQ on the teacher's own generated data, so the start stays data-free. The student's latent
weights are GPTQ's dequantized weights; the teacher stays the full-precision model. GPTQ's codes lie on
compressed-tensors' full grid (int4: -8..7), so the student takes that grid (`--recipe deploy`). Its steps:
- with `--learn_ranges weights` the clipping factors start at GPTQ's scale / MinMax scale of GPTQ's weights: the
  student starts as GPTQ's model (the same codes, the scales to an ulp) and learns weights and ranges from there;
- without, the MinMax quantizer re-derives each row's scale from GPTQ's weights: max|code| * s / 7.5 instead of
  GPTQ's s (int4), so a row keeps its codes but its scale moves by up to 1/15 before training starts.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import replace
from pathlib import Path

import torch

from models.checkpoint import saved_config
from models.quantize import QATConfig, start_ranges_at
from models.quantizers import FULL_PRECISION, check_bits
from utils.data.dataset import read_token_sequences
from utils.data.records import TeacherIdentity, model_display_name
from utils.safety import staged_directory
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

BASELINE_KEY = "llm_qat_baseline"
START_KEY = "llm_qat_start"  # a QAT student started from a baseline (train.py --init_from): that baseline's settings
BASELINES = ("gptq", "smoothquant")
INSTALL_HINT = "make baselines (llm-compressor in its own environment, .venv-baselines)"
COMPRESSED = "compressed"  # the compressed-tensors export inside a GPTQ baseline's directory
FLOAT_LAYERS = ["lm_head"]  # GPTQ leaves the head in full precision, as the paper does


def saved_baseline(directory: str | Path) -> dict | None:
    """What a baseline directory was made by ({"method": "gptq", "w_bits": 4, ...}); None for any other model."""
    return saved_config(directory).get(BASELINE_KEY)


def applied_quantization(baseline: dict, bits: QATConfig) -> QATConfig:
    """The quantizers evaluate.py puts on a baseline's model for the W-A-KV row `bits`."""
    if bits.rotate != "none":
        raise ValueError(f"{baseline['method']} weights were computed without a rotation; omit --rotate")
    if baseline["method"] != "gptq":
        return bits
    check_gptq_weights(baseline, bits)
    return replace(bits, w_bits=FULL_PRECISION, w_group_size=None)  # the weights are already GPTQ's


def check_gptq_weights(baseline: dict, bits: QATConfig) -> None:
    """Refuse W bits or a group size other than those the GPTQ model `baseline` was made with."""
    made, asked = (baseline["w_bits"], baseline.get("w_group_size")), (bits.w_bits, bits.w_group_size)
    if made != asked:
        raise ValueError(f"this GPTQ model has {_weights(*made)}, not {_weights(*asked)}; use it at W = "
                         f"{_weights_flags(*made)}, or run scripts/baseline.py gptq --w-bits "
                         f"{_weights_flags(*asked)}")


def gptq_scales(directory: str | Path) -> dict[str, torch.Tensor]:
    """The step sizes GPTQ chose, per quantized layer name ([out, 1] per channel, [out, in / G] per group), read from
    the baseline's compressed-tensors export (`compressed/`, where llm-compressor saves them as `NAME.weight_scale`)."""
    from safetensors.torch import load_file

    files = sorted((Path(directory) / COMPRESSED).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}/{COMPRESSED} holds no weight files with GPTQ's scales; make the GPTQ "
                                "model again with scripts/baseline.py gptq")
    suffix = ".weight_scale"
    return {name.removesuffix(suffix): tensor for file in files for name, tensor in load_file(file).items()
            if name.endswith(suffix)}


def _weights(w_bits: int, w_group_size: int | None) -> str:
    return f"{w_bits}-bit weights " + (f"in groups of {w_group_size}" if w_group_size else "per channel")


def _weights_flags(w_bits: int, w_group_size: int | None) -> str:
    return f"{w_bits}" + (f" --w-group-size {w_group_size}" if w_group_size else "")


def calibration_dataset(path: str | Path, tokenizer, teacher: TeacherIdentity, num_samples: int, max_length: int,
                        seed: int):
    """`num_samples` generated sequences (a seeded choice), cut to `max_length`, as the `datasets.Dataset` of
    token ids that `oneshot` takes."""
    from datasets import Dataset

    sequences = read_token_sequences(path, tokenizer, teacher, teacher.vocab_size)
    chosen = random.Random(seed).sample(sequences, min(num_samples, len(sequences)))
    chosen = [ids[:max_length] for ids in chosen]
    return Dataset.from_dict({"input_ids": chosen, "attention_mask": [[1] * len(ids) for ids in chosen]})


def recipe(method: str, w_bits: int | None, smoothing_strength: float, w_group_size: int | None = None,
           a_bits: int = FULL_PRECISION):
    """The llm-compressor modifier of one baseline. GPTQ's scheme: symmetric int weights per channel or per group;
    with `a_bits` below 16 also dynamic per-token symmetric int activations, which only the export records."""
    if method == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = QuantizationArgs(num_bits=w_bits, type="int", symmetric=True,
                                   strategy="group" if w_group_size else "channel", group_size=w_group_size)
        activations = None if a_bits == FULL_PRECISION else QuantizationArgs(
            num_bits=a_bits, type="int", symmetric=True, strategy="token", dynamic=True)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
        return GPTQModifier(config_groups={"weights": scheme}, ignore=FLOAT_LAYERS)
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return SmoothQuantModifier(smoothing_strength=smoothing_strength)


def check_baseline_args(method: str, w_bits: int | None, smoothing_strength: float, w_group_size: int | None = None,
                        a_bits: int = FULL_PRECISION) -> None:
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; use one of {', '.join(BASELINES)}")
    if method == "gptq" and not (w_bits is not None and 2 <= w_bits <= 8):
        raise ValueError(f"GPTQ needs --w-bits between 2 and 8, not {w_bits}")
    if method != "gptq" and (w_group_size is not None or a_bits != FULL_PRECISION):
        raise ValueError(f"--w-group-size and --a-bits are GPTQ's; {method} takes neither")
    if w_group_size is not None and not w_group_size > 0:
        raise ValueError(f"--w-group-size {w_group_size} must be positive (omit it for one scale per channel)")
    check_bits(a_bits, "--a-bits")
    if not 0 <= smoothing_strength <= 1:
        raise ValueError(f"--smoothing-strength {smoothing_strength} must lie in [0, 1] (SmoothQuant's alpha)")


def check_group_size(model, w_group_size: int | None) -> None:
    """Refuse a group size that does not divide the input width of every layer GPTQ quantizes."""
    if w_group_size is None:
        return
    widths = {module.in_features for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name not in FLOAT_LAYERS}
    if any(width % w_group_size for width in widths):
        raise ValueError(f"--w-group-size {w_group_size} does not divide the input width of every layer "
                         f"({', '.join(map(str, sorted(widths)))}); use a divisor of {math.gcd(*widths)}")


def run_baseline(method: str, model: str | None, calibration: str | Path, output_dir: str | Path,
                 w_bits: int | None = None, num_samples: int = 128, max_length: int = 2048,
                 smoothing_strength: float = 0.5, seed: int = 0, w_group_size: int | None = None,
                 a_bits: int = FULL_PRECISION) -> Path:
    """Run one baseline on a float model and save the result to `output_dir` (written whole or not at all); for
    GPTQ also its compressed-tensors export, in `output_dir`/compressed."""
    check_baseline_args(method, w_bits, smoothing_strength, w_group_size, a_bits)
    try:
        from llmcompressor import oneshot
    except ImportError:
        raise ImportError(f"llm-compressor is not installed in this environment; run {INSTALL_HINT} and use its "
                          "python (.venv-baselines/bin/python)") from None
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists; pass another --output or delete it")
    path = resolve_model_path(model)
    if saved_config(path).get("llm_qat"):
        raise ValueError(f"{model} is a QAT checkpoint; a baseline starts from a full-precision model")
    tokenizer = load_tokenizer(path)
    float_model = load_model(path, quantized=False)
    check_group_size(float_model, w_group_size)
    teacher = TeacherIdentity.of(model_display_name(model), tokenizer, float_model.config.vocab_size)
    dataset = calibration_dataset(calibration, tokenizer, teacher, num_samples, max_length, seed)
    logger.info("%s on %s: %d calibration sequences of up to %d tokens from %s", method.upper(),
                model_display_name(model), len(dataset), max_length, calibration)
    torch.manual_seed(seed)
    oneshot(model=float_model, tokenizer=tokenizer, dataset=dataset,
            recipe=recipe(method, w_bits, smoothing_strength, w_group_size, a_bits),
            num_calibration_samples=len(dataset), max_seq_length=max_length, shuffle_calibration_samples=False)

    # A plain float model with the new weights: llm-compressor leaves its scales and quantization config on the
    # modules, which the repo's loaders (and the main environment's compressed-tensors) should not see.
    result = load_model(path, quantized=False)
    changed = float_model.state_dict()
    with torch.no_grad():
        for name, tensor in result.state_dict().items():
            tensor.copy_(changed[name])
    settings = {"method": method, "model": model_display_name(model), "calibration": str(calibration),
                "num_samples": len(dataset), "max_length": max_length, "seed": seed, "library": "llmcompressor "
                + _version("llmcompressor")}
    settings.update({"w_bits": w_bits, "w_group_size": w_group_size, "a_bits": a_bits, "compressed": COMPRESSED}
                    if method == "gptq" else {"smoothing_strength": smoothing_strength})
    setattr(result.config, BASELINE_KEY, settings)
    with staged_directory(output_dir) as staging:
        result.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if method == "gptq":  # compresses float_model in place: its float weights were copied above
            float_model.save_pretrained(staging / COMPRESSED, save_compressed=True)
            tokenizer.save_pretrained(staging / COMPRESSED)
    logger.info("Saved the %s model to %s (%s)", method.upper(), output_dir, json.dumps(settings))
    return output_dir


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def check_gptq_settings(config: QATConfig) -> None:
    """What a GPTQ start needs of the quantizer flags; checked before the GPTQ model exists (run_train.sh makes it
    after the data)."""
    if config.weight_spec is not None or config.w_bits == FULL_PRECISION:
        raise ValueError("--init_from starts the student from GPTQ's integer weights; pass --w_bits 2..8 without "
                         "--scheme, or drop --init_from")
    if config.grid != "full":
        raise ValueError("--init_from starts from GPTQ's codes, which lie on the full grid (int4: -8..7); add "
                         "--recipe deploy")
    if config.rotate != "none":
        raise ValueError("GPTQ's weights were computed without a rotation; drop --rotate or --init_from")


def check_gptq_model(directory: str | Path, config: QATConfig, teacher_name: str) -> None:
    """Refuse a directory that is not a GPTQ model of this teacher at these weight bits, before anything is loaded."""
    check_gptq_settings(config)
    if not Path(directory, "config.json").is_file():
        raise FileNotFoundError(f"--init_from {directory} is not a model directory; make the GPTQ model with "
                                f".venv-baselines/bin/python scripts/baseline.py gptq --w-bits {config.w_bits} ...")
    baseline = saved_baseline(directory)
    if baseline is None or baseline["method"] != "gptq":
        raise ValueError(f"--init_from {directory} is not a GPTQ model (scripts/baseline.py gptq makes one)")
    check_gptq_weights(baseline, config)
    if baseline["model"] != teacher_name:
        raise ValueError(f"--init_from {directory} is a GPTQ model of {baseline['model']}, not of the teacher "
                         f"{teacher_name}; make one of the teacher with scripts/baseline.py gptq --model ...")


def start_from_gptq(student: torch.nn.Module, directory: str | Path, config: QATConfig,
                    weights_loaded: bool = True) -> torch.nn.Module:
    """A student (of `config`) loaded from GPTQ's weights, with its learned clipping factors set to GPTQ's scales
    (where this process holds the weights: `weights_loaded`). Its config no longer says it is a baseline (it is a
    QAT student, which evaluate.py would otherwise evaluate as GPTQ's fixed weights, without a weight quantizer); it
    says where it started instead (`START_KEY`)."""
    setattr(student.config, START_KEY, getattr(student.config, BASELINE_KEY))
    delattr(student.config, BASELINE_KEY)
    if weights_loaded and config.learn_ranges == "weights":
        start_ranges_at(student, gptq_scales(directory))
    return student
