"""Serve an export with vLLM and compare it with the student it came from and with the teacher.

    make vllm                                                      # once: vLLM's CPU build in .venv-vllm
    python scripts/serve_check.py out/w8a8 --data gen_data/heldout.jsonl --teacher default
    python scripts/serve_check.py out/w4a16 --data gen_data/heldout.jsonl --dtype bfloat16   # vLLM CPU's int4: bf16

Prints (and with --output writes as JSON) the served model's held-out perplexity and top-1 agreement with the
teacher, the student's KL to the teacher, and the per-token difference between vLLM's log p and the student's
(mean and max, nats). An export vLLM's CPU build would run as another model (utils/evaluation/serving.py says which)
is refused in one line before anything loads. With lm-eval: `lm_eval --model vllm --model_args pretrained=EXPORT`
in .venv-vllm (docs/EXPORT.md).
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from models.checkpoint import saved_config
from utils.evaluation.metrics import token_sequences
from utils.evaluation.serving import VLLM_PYTHON, serve_check, vllm_mismatch
from utils.safety import check_output_file, user_errors
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", help="a packed export (scripts/export.py) or a float model directory")
    parser.add_argument("--data", required=True, help="held-out .jsonl sequences (merge_gen_data.py --heldout)")
    parser.add_argument("--teacher", default="default", help="the teacher (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="vLLM's dtype (int4 weights: bfloat16)")
    parser.add_argument("--max-sequences", type=int, default=None, help="only the first N sequences")
    parser.add_argument("--max-length", type=int, default=512, help="cut sequences to this many tokens")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of vLLM's environment (make vllm)")
    parser.add_argument("--output", help="JSON file for the result")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    with user_errors("serve_check.py"):
        export = resolve_model_path(args.export)
        mismatch = vllm_mismatch(saved_config(export))
        if mismatch:
            raise ValueError(f"{export} would not be served as trained: {mismatch}")
        if args.output:
            check_output_file(args.output)
        tokenizer = load_tokenizer(args.teacher)
        sequences = token_sequences(tokenizer, args.data, args.max_length)[:args.max_sequences]
        logging.info("Serving %s with vLLM (%s) on %d sequences", export, args.dtype, len(sequences))
        # The student in vLLM's dtype: in bfloat16 the float parts (attention, norms) round as vLLM's do.
        student = load_model(export).to(getattr(torch, args.dtype))
        result = serve_check(export, student, load_model(args.teacher, quantized=False), sequences, args.dtype,
                             args.vllm_python)
        print(json.dumps(result, indent=2))
        if args.output:
            with open(args.output, "w") as handle:
                json.dump({"export": str(export), "data": args.data, "dtype": args.dtype, **result}, handle, indent=2)


if __name__ == "__main__":
    main()
