"""The quantizer options beyond the paper, on the demo's data and budget: held-out perplexity and KL to the teacher
of W4A8KV4 with keys quantized before or after rotary embedding x per-channel or group-wise weights, RTN and QAT,
and the quantizer overhead of each option.

    python bench/bench_options.py                     # embedded SmolLM2-135M, CPU: about 30 minutes
    python bench/bench_options.py --group-size 128 --out bench_output/options

Each option runs `scripts/demo.sh` (synthesis is shared and reused, then FP, RTN, QAT and their evaluation), so
the numbers are exactly what `W_GROUP_SIZE=... KV_PLACEMENT=... make demo` gives. The overhead is the student's
forward + backward time on one batch with the option's quantizers, over the same without quantizers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.quantize import QATConfig, quantize_model
from utils.training.loading import load_model

REPO = Path(__file__).resolve().parents[1]


def options(group_size: int) -> list[QATConfig]:
    return [QATConfig(4, 8, 4, w_group_size=group, kv_placement=placement)
            for placement in ("pre_rope", "post_rope") for group in (None, group_size)]


def demo_results(config: QATConfig, out: Path, **demo_settings: str) -> dict[str, dict]:
    """RTN and QAT metrics of one setting, from `scripts/demo.sh` (reused when its result files exist), with
    `demo_settings` as further environment variables of the demo (ENGINE="vllm", ...)."""
    env = {**os.environ, "OUT": str(out), "W_BITS": str(config.w_bits), "A_BITS": str(config.a_bits),
           "KV_BITS": str(config.kv_bits), "W_GROUP_SIZE": str(config.w_group_size or ""),
           "KV_PLACEMENT": config.kv_placement, "RECIPE": config.recipe, "ROTATE": config.rotate,
           "LEARN_RANGES": config.learn_ranges,
           "PYTHON": sys.executable, **demo_settings}
    subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env, check=True)
    return {json.loads(path.read_text())["method"]: json.loads(path.read_text())["metrics"]
            for path in (out / "results").glob("*.json")
            if json.loads(path.read_text()).get("label") == config.label()}


def student_seconds(model, config: QATConfig | None, ids: torch.Tensor, steps: int = 3) -> float:
    """Seconds per forward + backward of the student (no teacher, no optimizer): what the quantizers add to."""
    student = quantize_model(model, config) if config else model
    student.train()
    student(ids, use_cache=False).logits.sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        student(ids, use_cache=False).logits.sum().backward()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", default="bench_output/options", help="shared demo output folder (data is reused)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [(config, demo_results(config, out)) for config in options(args.group_size)]

    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    plain = student_seconds(load_model(quantized=False), None, ids)
    fp = json.loads((out / "results" / "fp.json").read_text())["metrics"]
    print(f"\nembedded SmolLM2-135M, demo data and budget; FP held-out ppl {fp['heldout_perplexity']:.2f}; "
          f"CPU ({torch.get_num_threads()} threads)\n")
    print("| W-A-KV | keys | weights | RTN held-out ppl | RTN KL | QAT held-out ppl | QAT KL | QAT top-1 (%) | "
          "overhead |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for config, results in rows:
        overhead = student_seconds(load_model(quantized=False), config, ids) / plain
        rtn, qat = results["rtn"], results["qat"]
        weights = f"group {config.w_group_size}" if config.w_group_size else "per channel"
        print(f"| {config.label()} | {config.kv_placement.replace('_', '-')} | {weights} | "
              f"{rtn['heldout_perplexity']:.2f} | {rtn['kl_to_teacher']:.3f} | {qat['heldout_perplexity']:.2f} | "
              f"{qat['kl_to_teacher']:.3f} | {100 * qat['top1_agreement']:.1f} | {overhead:.2f}x |")


if __name__ == "__main__":
    main()
