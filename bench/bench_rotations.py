"""Rotations before quantization-aware training, on the demo's data and budget: held-out perplexity,
KL to the teacher and top-1 agreement of RTN and QAT at W4A4KV4, W4A4KV16 and W4A8KV4, without and with a
Hadamard rotation, and the step-time overhead of the online rotations.

    python bench/bench_rotations.py                     # embedded SmolLM2-135M, CPU: about 40 minutes
    python bench/bench_rotations.py --rotate random --out bench_output/rotations
    python bench/bench_rotations.py --bits 4-4-4            # one row pair: about 15 minutes

Each setting runs `scripts/demo.sh` (synthesis shared and reused; FP, RTN, QAT and their evaluation), so the
numbers are what `W_BITS=4 A_BITS=4 KV_BITS=4 KV_PLACEMENT=post_rope ROTATE=hadamard make demo` gives. Keys are
quantized after rotary embedding in every row (the rotation of keys needs it), so rows differ only in the rotation.
"Gap closed" is the share of the RTN -> FP held-out perplexity gap of the paper's method (RTN without rotation,
same bits) that the row's QAT student closes, in perplexity and in log perplexity (nats per token): where RTN
collapses (perplexity in the thousands) the first is close to 100 % for any student that does not, and the
second still tells a usable student from a poor one.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench_options import demo_results, student_seconds
from models.quantize import QATConfig
from models.rotations import ROTATIONS
from utils.training.loading import load_model

BITS = ((4, 4, 4), (4, 4, 16), (4, 8, 4))


def rotation_overhead(config: QATConfig, plain: QATConfig, ids: torch.Tensor, repeats: int = 3) -> float:
    """Student forward + backward time with the rotation over the same without, each the best of `repeats`
    alternating measurements (the first measurement of a process runs slow)."""
    times = {config: [], plain: []}
    for _ in range(repeats):
        for setting in (plain, config):
            times[setting].append(student_seconds(load_model(quantized=False), setting, ids))
    return min(times[config]) / min(times[plain])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotate", default="hadamard", choices=[kind for kind in ROTATIONS if kind != "none"])
    parser.add_argument("--out", default="bench_output/rotations", help="shared demo output folder (data is reused)")
    parser.add_argument("--bits", nargs="+", default=["-".join(map(str, bits)) for bits in BITS],
                        help="W-A-KV rows to run (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    settings = [QATConfig(*map(int, bits.split("-")), kv_placement="post_rope", rotate=rotate) for bits in args.bits
                for rotate in ("none", args.rotate)]
    results = {config: demo_results(config, out) for config in settings}

    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    fp = json.loads((out / "results" / "fp.json").read_text())["metrics"]["heldout_perplexity"]
    print(f"\nembedded SmolLM2-135M, demo data and budget; FP held-out ppl {fp:.2f}; CPU "
          f"({torch.get_num_threads()} threads)\n")
    print("| W-A-KV | rotation | RTN ppl | RTN KL | RTN top-1 (%) | QAT ppl | QAT KL | QAT top-1 (%) | gap closed | "
          "gap closed (log ppl) | step time vs no rotation |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in settings:
        plain = QATConfig(config.w_bits, config.a_bits, config.kv_bits, kv_placement="post_rope")
        rtn, qat = results[config]["rtn"], results[config]["qat"]
        paper_rtn = results[plain]["rtn"]["heldout_perplexity"]
        gap = (paper_rtn - qat["heldout_perplexity"]) / (paper_rtn - fp)
        log_gap = math.log(paper_rtn / qat["heldout_perplexity"]) / math.log(paper_rtn / fp)
        overhead = rotation_overhead(config, plain, ids)
        print(f"| {config.w_bits}-{config.a_bits}-{config.kv_bits} | {config.rotate} | "
              f"{rtn['heldout_perplexity']:.2f} | {rtn['kl_to_teacher']:.3f} | {100 * rtn['top1_agreement']:.1f} | "
              f"{qat['heldout_perplexity']:.2f} | {qat['kl_to_teacher']:.3f} | {100 * qat['top1_agreement']:.1f} | "
              f"{gap:.1%} | {log_gap:.1%} | {overhead:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
