"""Will LLM-QAT training fit? Per-GPU memory of student, teacher and KD loss, from a config alone.

    python scripts/plan_memory.py --model llama-7b --gpus 8 --gpu-memory 80 --seq-len 2048
    python scripts/plan_memory.py --model llama-7b llama-13b llama-30b --gpu-memory 40 --json

--model: a shipped name (llama-7b, llama-13b, llama-30b), a model directory holding config.json, or a
config.json path; several give one column each. Parameters are counted on a meta-device model, so nothing is
downloaded or allocated. Prints a markdown table, the verdict, and for a model that does not fit, the single
changes that would make it fit (more GPUs, CPU offload, shorter sequences, a smaller micro-batch).
--teacher cached plans train.py --teacher cached: no teacher weights or logits, the data's top-K rows instead.
"""
from __future__ import annotations

import argparse
import sys

from utils.training.memory_plan import (PRECISION_BYTES, TEACHERS, TrainingSetup, format_plans, load_config,
                                        model_shape, plan_memory, plans_to_json)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="plan_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["llama-7b"],
                        help="shipped name (llama-7b, llama-13b, llama-30b), model directory or config.json path")
    parser.add_argument("--gpus", type=positive(int), default=8, help="GPUs in all (FSDP shards over them)")
    parser.add_argument("--gpu-memory", type=positive(float), default=80.0, help="memory per GPU, GiB")
    parser.add_argument("--seq-len", type=positive(int), default=2048, help="tokens per sequence")
    parser.add_argument("--batch-size", type=positive(int), default=1, help="sequences per GPU per micro-batch")
    parser.add_argument("--precision", choices=list(PRECISION_BYTES), default="bf16",
                        help="compute dtype: bf16 mixed precision (as run_train.sh) or fp32")
    parser.add_argument("--offload", action="store_true",
                        help='FSDP CPU offload of the student\'s weights, gradients and AdamW (--fsdp "full_shard '
                             'offload auto_wrap")')
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--teacher", choices=TEACHERS, default="model",
                        help="model: the bf16 teacher runs beside the student; cached: its top-K log-probs come with "
                             "the data (train.py --teacher cached)")
    parser.add_argument("--topk", type=positive(int), default=32,
                        help="columns of the cached teacher's rows: K, or K + S with --save-tail S")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    setup = TrainingSetup(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, seq_len=args.seq_len,
                          batch_size=args.batch_size, precision=args.precision,
                          gradient_checkpointing=not args.no_gradient_checkpointing, offload=args.offload,
                          teacher=args.teacher, topk=args.topk)
    try:
        plans = [plan_memory(model_shape(load_config(model), name=model), setup) for model in args.model]
    except (OSError, ValueError) as err:  # missing file, bad JSON, not a LLaMA-family config
        parser.error(f"--model: {err}".splitlines()[0])
    print(plans_to_json(plans) if args.json else format_plans(plans))


if __name__ == "__main__":
    sys.exit(main())
