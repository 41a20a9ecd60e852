"""Peers at equal budget: torchao's QAT beside this repo's two recipes, on the same teacher, data,
KDTrainer and budget (the demo's: embedded SmolLM2-135M, 1 epoch, batch 4, lr 1e-4, 128 tokens).

    make demo                                            # synthesizes the data once (demo_output/data-...)
    make peers                                           # .venv-peers: the main lock plus torchao 0.18
    .venv-peers/bin/python bench/bench_peers.py          # CPU: 3 QAT runs of the demo's length
    .venv-peers/bin/python bench/bench_peers.py --max-steps 2   # a quick check of the wiring

Every method quantizes the same thing, torchao's W4A8 setting: int4 per-channel symmetric weights, int8
per-token asymmetric input activations, lm_head and embeddings in full precision. Then this repo's recipes again at
W4A8KV4 (4-bit per-token KV cache), where torchao cannot follow: its QAT has no KV quantizer. For each: held-out
perplexity, KL to the teacher and top-1 agreement of RTN (the quantizer without training) and of QAT, the step
time, and the share of the RTN -> FP perplexity gap that QAT closes.

    .venv-peers/bin/python bench/bench_peers.py --scheme MXFP4 --kv-bits 16    # the 4-bit microscaling formats

With `--scheme MXFP4` or `NVFP4` every method quantizes weights and input activations in that format instead:
torchao's prototype QAT (`torchao.prototype.qat`: MX with its emulated kernel; NVFP4, whose forward multiplies in FP4
on Blackwell GPUs only, with that product emulated here as its dequantized operands' float product) against this
repo's `--scheme` presets (compressed-tensors' numerics). torchao's scales follow its own rounding rules (MX: RCEIL;
NVFP4: its per-tensor scale), so RTN differs a little between them.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from models.quantize import QATConfig, quantize_model
from utils.data.dataset import PadCollator, TokenSequenceDataset
from utils.evaluation.metrics import teacher_fidelity, token_sequences
from utils.training.kd_trainer import KDTrainer
from utils.training.loading import load_model, load_tokenizer

DEMO_DATA = Path("demo_output/data-n96-h8-len128-seed0")  # scripts/demo.sh's defaults
SEQ_LEN, BATCH_SIZE, LEARNING_RATE = 128, 4, 1e-4
RECIPES = ("paper", "deploy")


SCHEMES = ("MXFP4", "NVFP4")  # --scheme: the 4-bit floating-point formats torchao's prototype QAT has


def our_config(recipe: str, kv_bits: int, scheme: str | None = None) -> QATConfig:
    if scheme:
        return QATConfig(16, 16, kv_bits, scheme=scheme, recipe=recipe)
    return QATConfig(4, 8, kv_bits, act_symmetric=False, recipe=recipe)


def _emulated_nvfp4_product(input, weight_t, aten_op, bias):
    """torchao's NVFP4 QAT forward product (`_addmm_nvfp4_dispatch`, FP4 tensor cores) as the float product of its
    dequantized operands, for machines without them."""
    out = input.dequantize(input.orig_dtype) @ weight_t.dequantize(weight_t.orig_dtype)
    return out if bias is None else out + bias


def torchao_config(scheme: str | None):
    """torchao 0.18's QAT "prepare" config: the W4A8 setting above, or its prototype MX / NVFP4 fake quantizers."""
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat import QATConfig as TorchaoQATConfig
    except ImportError:
        raise SystemExit("bench_peers.py: torchao is not installed; run it with .venv-peers/bin/python (make peers) or "
                         "pass --methods paper deploy") from None
    if scheme == "MXFP4":
        from torchao.prototype.qat.mx import MXFakeQuantizeConfig

        activations = weights = MXFakeQuantizeConfig()  # float4_e2m1fn_x2 in blocks of 32, emulated kernel
    elif scheme == "NVFP4":
        import torchao.prototype.qat.nvfp4 as nvfp4

        if not torch.cuda.is_available():
            nvfp4._addmm_nvfp4_dispatch = _emulated_nvfp4_product
        activations = weights = nvfp4.NVFP4FakeQuantizeConfig()  # with the per-tensor FP32 scale
    else:
        activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weights = IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)
    return TorchaoQATConfig(activation_config=activations, weight_config=weights, step="prepare")


def torchao_student(model: nn.Module, scheme: str | None = None) -> nn.Module:
    """torchao's QAT "prepare" step (`torchao_config`) on every linear layer but lm_head."""
    from torchao.quantization import quantize_

    config = torchao_config(scheme)
    output_layer = model.get_output_embeddings()
    quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear) and module is not output_layer)
    return model


def student(method: str, kv_bits: int, scheme: str | None) -> nn.Module:
    model = load_model(None, dtype=torch.float32)
    if method == "torchao":
        return torchao_student(model, scheme)
    return quantize_model(model, our_config(method, kv_bits, scheme))


def train(model: nn.Module, teacher: nn.Module, data: Path, tokenizer, max_steps: int) -> float:
    """QAT with the repo's KDTrainer at the demo's settings; seconds per optimizer step."""
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=BATCH_SIZE,
                                 learning_rate=LEARNING_RATE, num_train_epochs=1, max_steps=max_steps,
                                 lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=0,
                                 logging_steps=10)
        trainer = KDTrainer(model=model, teacher=teacher, args=args, data_collator=PadCollator(tokenizer.pad_token_id),
                            train_dataset=TokenSequenceDataset(data / "all.jsonl", SEQ_LEN, tokenizer))
        result = trainer.train()
    return result.metrics["train_runtime"] / max(trainer.state.global_step, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEMO_DATA, help="a folder with all.jsonl and heldout.jsonl")
    parser.add_argument("--methods", nargs="+", default=["torchao", "paper", "deploy"],
                        choices=["torchao", *RECIPES])
    parser.add_argument("--kv-bits", nargs="+", type=int, default=[16, 4], choices=[16, 8, 4],
                        help="KV cache bits of this repo's recipes (torchao has no KV quantizer: 16 only)")
    parser.add_argument("--scheme", choices=SCHEMES, help="weights and activations in this 4-bit float format "
                        "instead of torchao's int W4A8")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop training early (default: the 1 epoch)")
    args = parser.parse_args()
    if not (args.data / "all.jsonl").is_file() or not (args.data / "heldout.jsonl").is_file():
        raise SystemExit(f"bench_peers.py: {args.data} has no all.jsonl and heldout.jsonl; run `make demo` first "
                         "(or pass --data)")

    tokenizer = load_tokenizer(None)
    teacher = load_model(None, dtype=torch.float32)
    heldout = token_sequences(tokenizer, args.data / "heldout.jsonl", max_length=SEQ_LEN)

    def metrics(model):
        return teacher_fidelity(model.eval(), teacher, heldout, pad_token_id=tokenizer.pad_token_id)

    fp = metrics(teacher)["heldout_perplexity"]
    print(f"FP teacher: held-out perplexity {fp:.3f}\n")
    print("| method | RTN ppl | QAT ppl | RTN KL | QAT KL | RTN top-1 | QAT top-1 | s / step | gap closed | "
          "gap closed (log ppl) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    def row(method: str, kv_bits: int):
        model = student(method, kv_bits, args.scheme)
        rtn = metrics(model)  # the same student before training
        seconds = train(model, teacher, args.data, tokenizer, args.max_steps)
        qat = metrics(model)
        gap = (rtn["heldout_perplexity"] - qat["heldout_perplexity"]) / (rtn["heldout_perplexity"] - fp)
        log_gap = math.log(rtn["heldout_perplexity"] / qat["heldout_perplexity"]) / math.log(
            rtn["heldout_perplexity"] / fp)
        name = (f"torchao ({args.scheme or '4-8'}-16)" if method == "torchao" else
                f"{method} ({our_config(method, kv_bits, args.scheme).label()})")
        print(f"| {name} | {rtn['heldout_perplexity']:.3f} | {qat['heldout_perplexity']:.3f} | "
              f"{rtn['kl_to_teacher']:.4f} | {qat['kl_to_teacher']:.4f} | {rtn['top1_agreement']:.3f} | "
              f"{qat['top1_agreement']:.3f} | {seconds:.2f} | {gap:.0%} | {log_gap:.0%} |", flush=True)

    for kv_bits in args.kv_bits:
        for method in args.methods:
            if method == "torchao" and kv_bits != 16:
                print(f"| torchao ({args.scheme or '4-8'}-{kv_bits}) | no KV cache quantizer in torchao's QAT "
                      "| | | | | | | | |")
                continue
            row(method, kv_bits)

if __name__ == "__main__":
    main()
