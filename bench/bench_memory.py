"""Peak RSS of a real CPU training step vs the memory planner's prediction for one device.

    PYTHONPATH=. python bench/bench_memory.py

Each case runs in a fresh process that builds the fp32 teacher and the W4A8KV4 student (its copy), fused
AdamW, and takes two training steps as KDTrainer does (teacher forward, student forward, chunked KL, backward,
optimizer step) on random token ids, no padding. Measured = peak RSS minus the RSS before the models were built
(Python, torch and transformers themselves: the CPU's counterpart of the CUDA context, which the prediction
leaves out). Predicted = `utils.training.memory_plan` for one device in fp32, margin excluded.

Every case is measured twice: with glibc's default allocator, which keeps freed blocks below its (growing)
mmap threshold for reuse, so RSS also counts memory the step no longer uses; and with
MALLOC_MMAP_THRESHOLD_=128 KiB, which hands every larger block back to the OS when freed, so RSS follows the
bytes actually alive (the counterpart of CUDA's max_memory_allocated).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from models import quantize_model
from utils.training.kd_trainer import kd_loss
from utils.training.loading import resolve_model_path
from utils.training.memory_plan import GIB, TrainingSetup, model_shape, plan_memory

TINY_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
SMALL_LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
CASES = {  # name: (model: a config's sizes or "embedded", batch, seq_len, gradient checkpointing)
    "tiny Llama, checkpointing": (TINY_LLAMA, 2, 512, True),
    "tiny Llama, no checkpointing": (TINY_LLAMA, 2, 512, False),
    "small Llama, checkpointing": (SMALL_LLAMA, 1, 1024, True),
    "small Llama, no checkpointing": (SMALL_LLAMA, 1, 1024, False),
    "SmolLM2-135M, checkpointing": ("embedded", 2, 512, True),
    "SmolLM2-135M, no checkpointing": ("embedded", 2, 512, False),
}


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(name: str) -> dict:
    model, batch, seq_len, checkpointing = CASES[name]
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model_path(None)) if model == "embedded" else LlamaConfig(**model)
    prediction = plan_memory(model_shape(config, name), TrainingSetup(
        gpus=1, seq_len=seq_len, batch_size=batch, precision="fp32", gradient_checkpointing=checkpointing))
    baseline = current_rss()

    teacher = (AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
               if model == "embedded" else AutoModelForCausalLM.from_config(config)).eval().requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), 4, 8, 4).train()
    if checkpointing:
        student.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    for _ in range(2):  # the first step creates the AdamW state; the second is a steady one
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        loss = kd_loss(student(ids, use_cache=False).logits, teacher_logits)
        del teacher_logits  # KDTrainer's compute_loss returns, dropping them, before backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"measured": peak_rss() - baseline, "predicted": prediction.subtotal,
            "parameters": prediction.shape.parameters}


def run_case(name: str, mmap_threshold: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if mmap_threshold else None
    out = subprocess.run([sys.executable, __file__, "--only", name], check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(CASES), help="measure one case in this process (used internally)")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only)))
        return
    try:
        resolve_model_path(None)  # the embedded SmolLM2-135M, dequantized into its cache on first use
        cases = list(CASES)
    except FileNotFoundError:
        cases = [name for name, case in CASES.items() if case[0] != "embedded"]
    print("| case | batch x tokens | params | predicted (GiB) | measured, glibc default (GiB) | ratio | "
          "measured, freed blocks returned (GiB) | ratio |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for name in cases:
        print(f"[bench_memory] {name} ...", file=sys.stderr, flush=True)
        default, returned = run_case(name, mmap_threshold=False), run_case(name, mmap_threshold=True)
        _, batch, seq_len, _ = CASES[name]
        predicted = default["predicted"]
        print(f"| {name} | {batch} x {seq_len} | {default['parameters'] / 1e6:.0f}M | {predicted / GIB:.2f} | "
              f"{default['measured'] / GIB:.2f} | {predicted / default['measured']:.2f} | "
              f"{returned['measured'] / GIB:.2f} | {predicted / returned['measured']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
