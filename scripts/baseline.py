"""A training-free baseline of the paper's Table 1, by llm-compressor (GPTQ or SmoothQuant), saved as a float model
directory that `scripts/evaluate.py DIR W A KV --teacher MODEL` evaluates at a W-A-KV setting
(utils/evaluation/baselines.py). GPTQ also writes DIR/compressed, its compressed-tensors export, which vLLM serves
quantized (W4A16; W8A8 with --a-bits 8).

    .venv-baselines/bin/python scripts/baseline.py gptq --w-bits 4 --calibration gen_data/all.jsonl --output baselines/gptq-w4
    .venv-baselines/bin/python scripts/baseline.py gptq --w-bits 4 --w-group-size 64 --calibration gen_data/all.jsonl --output baselines/gptq-w4g64
    .venv-baselines/bin/python scripts/baseline.py gptq --w-bits 8 --a-bits 8 --calibration gen_data/all.jsonl --output baselines/gptq-w8a8
    .venv-baselines/bin/python scripts/baseline.py smoothquant --calibration gen_data/all.jsonl --output baselines/sq

Needs llm-compressor: `make baselines` (its own environment, .venv-baselines). Calibration is the teacher's own
generated data, so the baselines stay data-free.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.evaluation.baselines import BASELINES, check_baseline_args, run_baseline
from utils.safety import ensure_writable_dir, user_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=BASELINES)
    parser.add_argument("--model", default="default", help="full-precision model; 'default' = the embedded SmolLM2-135M")
    parser.add_argument("--w-bits", type=int, help="GPTQ: weight bits (per output channel, symmetric)")
    parser.add_argument("--w-group-size", type=int, help="GPTQ: one weight scale per group of this many input columns "
                        "(default: per output channel)")
    parser.add_argument("--a-bits", type=int, default=16, help="GPTQ: the export's dynamic per-token symmetric int "
                        "activations (vLLM serves 8 with --w-bits 8); 16 (default): weight-only. The weights do "
                        "not depend on it")
    parser.add_argument("--calibration", required=True, help=".jsonl of generated sequences (merge_gen_data.py)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences (GPTQ's paper: 128)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--smoothing-strength", type=float, default=0.5, help="SmoothQuant's alpha (0.5: its default)")
    parser.add_argument("--seed", type=int, default=0, help="which calibration sequences are chosen")
    parser.add_argument("--output", required=True, help="new directory for the model (refused if it exists)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with user_errors("baseline.py"):
        check_baseline_args(args.method, args.w_bits, args.smoothing_strength, args.w_group_size, args.a_bits)
        if args.num_samples < 1 or args.max_length < 2:
            raise ValueError("--num-samples must be at least 1 and --max-length at least 2")
        ensure_writable_dir(Path(args.output).parent, "--output")
        run_baseline(args.method, args.model, args.calibration, args.output, args.w_bits, args.num_samples,
                     args.max_length, args.smoothing_strength, args.seed, args.w_group_size, args.a_bits)


if __name__ == "__main__":
    main()
