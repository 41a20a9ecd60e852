"""Time per QAT training step and peak memory: plain KD (16-16-16) vs W4A8KV4 QAT, chunked vs naive KL.

    python bench/bench_train.py                      # embedded SmolLM2-135M, CPU or the first GPU
    python bench/bench_train.py --seq-len 2048 --batch-size 4 --dtype bfloat16   # on a GPU

Each configuration runs in a fresh process so the peak memory (CUDA: max allocated; CPU: max RSS) is its own.
Prints a markdown table and the quantization overhead ratio (W4A8KV4 / 16-16-16 step time).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time


import torch
import torch.nn.functional as F

from models import quantize_model
from utils.training.kd_trainer import kd_loss
from utils.training.loading import load_model

CONFIGS = {  # name: (bits W-A-KV, loss)
    "KD 16-16-16, chunked KL": ((16, 16, 16), "chunked"),
    "QAT W4A8KV4, chunked KL": ((4, 8, 4), "chunked"),
    "QAT W4A8KV4, naive KL": ((4, 8, 4), "naive"),
}


def naive_kd_loss(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.softmax(teacher_logits.float(), -1),
                    reduction="batchmean")


def run_one(name: str, args) -> dict:
    bits, loss_kind = CONFIGS[name]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    teacher = load_model(args.model, dtype=dtype, device=device, quantized=False)
    student = quantize_model(copy.deepcopy(teacher), *bits).train()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    loss_fn = kd_loss if loss_kind == "chunked" else naive_kd_loss

    def step():
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        loss = loss_fn(student(ids, use_cache=False).logits, teacher_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {"name": name, "seconds": seconds, "peak_gib": peak}


def loss_alone(args, vocab: int) -> list[tuple[str, float, float]]:
    """Each KD loss alone on random [batch, seq, vocab] logits: seconds for forward + backward, and the bytes
    autograd keeps for the backward pass (counted exactly with saved-tensor hooks, independent of the allocator)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = torch.randn(args.batch_size, args.seq_len, vocab, device=device, dtype=getattr(torch, args.dtype))
    rows = []
    for name, loss_fn in (("naive KL (released code)", naive_kd_loss),
                          ("chunked KL (utils/training/kd_trainer.py)", kd_loss)):
        student = teacher.clone().add_(1.0).requires_grad_()
        saved = []

        def keep(tensor):
            saved.append(tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = loss_fn(student, teacher)
        saved_bytes = sum(saved)
        loss.backward()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss_fn(student, teacher).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((name, (time.perf_counter() - start) / args.steps, saved_bytes / 2**20))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model path or hub name (default: embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one configuration, as a child
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    forwarded = sys.argv[1:]
    rows = []
    for name in CONFIGS:
        print(f"[bench_train] {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, *forwarded, "--only", name], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel: {args.model or 'embedded SmolLM2-135M'}; device: {device}; dtype {args.dtype}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; {args.steps} timed steps after {args.warmup} warm-up\n")
    memory = "peak CUDA memory (GiB)" if args.device == "cuda" else "peak RSS (GiB)"
    print(f"| configuration | s / step | {memory} |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['seconds']:.3f} | {row['peak_gib']:.2f} |")
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"\nquantization overhead (W4A8KV4 / 16-16-16 step time): {ratio:.2f}x")
    vocab = load_model(args.model, quantized=False).config.vocab_size
    print(f"\nKD loss alone on [{args.batch_size}, {args.seq_len}, {vocab}] {args.dtype} logits:\n")
    print("| loss | s / forward+backward | kept for backward (MiB) |\n|---|---:|---:|")
    for name, seconds, mib in loss_alone(args, vocab):
        print(f"| {name} | {seconds:.3f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
