"""Let the teacher write its own training data (LLM-QAT, paper section 2.1). See docs/SYNTHESIS.md.

    python generate_data.py                          # a small shard: the "quick" preset on CPU
    python generate_data.py 7                        # the paper's form: shard 7 of 64, "paper" preset on a GPU
    python generate_data.py --shard 0 --num-shards 8 --preset paper
    torchrun --nproc-per-node 8 generate_data.py     # one shard per GPU, from RANK / WORLD_SIZE
"""
from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoConfig

from utils.data.records import DEFAULT_MODEL_NAME, TeacherIdentity, teacher_name
from utils.data.sampler import SamplingConfig, default_batch_size, resolve_device
from utils.data.start_tokens import choose_start_tokens, eligible_start_tokens, resolve_shard, shard_start_tokens
from utils.data.synthesis import shard_path, synthesize_shard
from utils.safety import check_positions, ensure_writable_dir, user_errors
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

logger = logging.getLogger("generate_data")

# Values a preset fills in for the flags the user left out. "paper" = the released code's run.
PRESETS = {
    "paper": {"num_start_tokens": None, "max_length": 2048},
    "quick": {"num_start_tokens": 16, "max_length": 128},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("positional_shard", nargs="?", type=int, metavar="SHARD",
                        help="shard index, the released code's form (then --num-shards defaults to 64)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="paper: all start tokens, 2048 tokens; quick: 16 random start tokens, 128 tokens "
                             "(default: paper with CUDA, quick on CPU); explicit flags override it")
    parser.add_argument("--model", default=None, help=f"teacher: a directory or hub name (default: the embedded "
                                                      f"{DEFAULT_MODEL_NAME})")
    parser.add_argument("--output-dir", default="gen_data", help="where shard-II-of-NN.jsonl goes")
    parser.add_argument("--shard", type=int, help="this process's shard index (default: RANK, else 0)")
    parser.add_argument("--num-shards", type=int, help="number of shards (default: WORLD_SIZE, else 1)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all-start-tokens", action="store_true", help="every vocabulary token (paper)")
    which.add_argument("--start-token-range", type=int, nargs=2, metavar=("A", "B"),
                       help="start tokens with ids A <= id < B")
    which.add_argument("--num-start-tokens", type=int, metavar="N", help="a random subset of N start tokens")
    parser.add_argument("--include-special-tokens", action="store_true",
                        help="also start from special tokens (EOS, chat markers); left out by default")
    parser.add_argument("--greedy-lengths", type=int, nargs="+", default=[3, 4, 5],
                        help="one sequence per value: its first K tokens (start token included) are top-1")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (paper: 2048)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="0 samples from the whole vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="picks the random start tokens and all samples")
    parser.add_argument("--batch-size", type=int, help="sequences per forward (default: 32 on CPU, "
                                                       "what fits the GPU's free memory on CUDA)")
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    return parser


def apply_preset(args, cuda_available: bool) -> str:
    """Fill the flags the user left out (None) from a preset: "paper" on a GPU, "quick" (a small shard
    that finishes in about a minute) on CPU. An explicit flag always wins."""
    preset = args.preset or ("paper" if cuda_available else "quick")
    values = PRESETS[preset]
    if args.start_token_range is None and args.num_start_tokens is None and not args.all_start_tokens:
        args.num_start_tokens = values["num_start_tokens"]
    if args.max_length is None:
        args.max_length = values["max_length"]
    return preset


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    with user_errors("generate_data.py"):
        generate(args)


def generate(args):
    device = resolve_device(args.device)
    preset = apply_preset(args, cuda_available=device.type == "cuda")
    shard, num_shards = resolve_shard(args.shard, args.num_shards, args.positional_shard)
    config = SamplingConfig(tuple(args.greedy_lengths), args.max_length, args.temperature, args.top_k, args.seed)
    config.check()
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    ensure_writable_dir(args.output_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.model)
    check_positions(config.max_length, "--max-length", AutoConfig.from_pretrained(resolve_model_path(args.model)))
    model = load_model(args.model, dtype=dtype, device=device, quantized=False)
    vocab_size = model.config.vocab_size
    eligible = eligible_start_tokens(tokenizer, vocab_size, args.include_special_tokens)
    start_tokens = choose_start_tokens(eligible, args.start_token_range, args.num_start_tokens, args.seed)
    batch_size = args.batch_size or default_batch_size(model, device, config.max_length)
    logger.info("Preset %s on %s (%s): %d start tokens of %d, %s", preset, device, dtype, len(start_tokens),
                len(eligible), config.describe())
    synthesize_shard(model, tokenizer, shard_start_tokens(start_tokens, shard, num_shards),
                     shard_path(args.output_dir, shard, num_shards), config, batch_size, shard, num_shards,
                     TeacherIdentity.of(teacher_name(args.model), tokenizer, vocab_size))


if __name__ == "__main__":
    main()
