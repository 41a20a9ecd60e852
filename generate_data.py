"""Let the teacher write its own training data (LLM-QAT, paper section 2.1). See docs/SYNTHESIS.md.

    python generate_data.py                          # a small shard: the "quick" preset on CPU
    python generate_data.py 7                        # the paper's form: shard 7 of 64, "paper" preset on a GPU
    python generate_data.py --shard 0 --num-shards 8 --preset paper
    torchrun --nproc-per-node 8 generate_data.py     # one shard per GPU, from RANK / WORLD_SIZE
    python generate_data.py --engine vllm            # the same shard written by vLLM (make vllm)
    python generate_data.py --save-topk 32           # with the teacher's top-32 log-probs: train.py --teacher cached
    python generate_data.py --save-topk 32 --save-tail 16   # and 16 tokens sampled from the rest of its distribution
"""
from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoConfig

from utils.data.records import DEFAULT_MODEL_NAME, TeacherIdentity, teacher_name
from utils.data.sampler import HFGenerator, SamplingConfig, default_batch_size, resolve_device, stop_token_ids
from utils.data.start_tokens import choose_start_tokens, eligible_start_tokens, resolve_shard, shard_start_tokens
from utils.data.synthesis import shard_path, synthesize_shard
from utils.data.vllm_engine import (VLLM_BATCH_SIZE, VLLM_MEMORY_FRACTION, VLLM_PYTHON, VLLMGenerator, engine_gpus,
                                     require_vllm_python)
from utils.safety import check_positions, ensure_writable_dir, user_errors
from utils.training.loading import load_generation_config, load_model, load_tokenizer, resolve_model_path

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
    parser.add_argument("--save-topk", type=int, default=0, metavar="K",
                        help="also keep the teacher's K most likely tokens and their log-probabilities at every "
                             "position, for train.py --teacher cached (a side file per shard; 8 K bytes a token)")
    parser.add_argument("--save-tail", type=int, default=0, metavar="S",
                        help="with --save-topk: also S tokens drawn from the teacher's distribution outside its top-K "
                             "and their log-probabilities, at every position (8 S bytes a token): the rest of the "
                             "vocabulary sampled instead of one bucket (HF engine)")
    parser.add_argument("--batch-size", type=int,
                        help=f"sequences per forward (default: 32 on CPU, what fits the GPU's free memory on CUDA; "
                             f"vLLM: {VLLM_BATCH_SIZE} per request)")
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="the teacher's dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads of either engine (default: torch's, one per core)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="hf: the batched sampler of this repository; vllm: vLLM in its own environment")
    engine.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of vLLM's environment (make vllm)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="vLLM: GPUs per engine, for a teacher one GPU does not hold (GPU process i takes GPUs "
                             "i*N .. i*N+N-1)")
    engine.add_argument("--vllm-memory-fraction", type=float,
                        help="vLLM: share of the GPU's memory (default 0.9), on CPU of the RAM (default 0.2), for "
                             "the weights and the KV cache")
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
    config = SamplingConfig(tuple(args.greedy_lengths), args.max_length, args.temperature, args.top_k, args.seed,
                            args.save_topk, args.save_tail)
    config.check()
    check_engine_flags(args)
    ensure_writable_dir(args.output_dir)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads and args.engine == "hf":
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model_path = resolve_model_path(args.model)
    model_config = AutoConfig.from_pretrained(model_path)
    check_positions(config.max_length, "--max-length", model_config)
    eligible = eligible_start_tokens(tokenizer, model_config.vocab_size, args.include_special_tokens)
    start_tokens = choose_start_tokens(eligible, args.start_token_range, args.num_start_tokens, args.seed)
    path = shard_path(args.output_dir, shard, num_shards)
    teacher = TeacherIdentity.of(teacher_name(args.model), tokenizer, model_config.vocab_size)
    logger.info("Preset %s on %s (%s, engine %s): %d start tokens of %d, %s", preset, device, dtype, args.engine,
                len(start_tokens), len(eligible), config.describe())

    def write(generator, batch_size):
        synthesize_shard(generator, tokenizer, shard_start_tokens(start_tokens, shard, num_shards), path, batch_size,
                         shard, num_shards, teacher)

    if args.engine == "vllm":
        batch_size = args.batch_size or VLLM_BATCH_SIZE
        gpus = None
        if device.type == "cuda":  # this process's GPUs, from its LOCAL_RANK (or --device cuda:i)
            gpus = engine_gpus(device.index or 0, args.tensor_parallel_size, torch.cuda.device_count())
        # The engine's log goes beside the shard; the engine starts under the shard's lock, on the first batch.
        with VLLMGenerator(model_path, config, stop_token_ids(load_generation_config(args.model), tokenizer),
                           path.with_name(path.name + ".vllm.log"), dtype=dtype, max_num_seqs=batch_size,
                           memory_fraction=args.vllm_memory_fraction or VLLM_MEMORY_FRACTION[device.type],
                           tensor_parallel_size=args.tensor_parallel_size, eager=device.type == "cpu",
                           threads=args.threads, gpus=gpus, python=args.vllm_python) as generator:
            write(generator, batch_size)
    else:
        model = load_model(args.model, dtype=getattr(torch, dtype), device=device, quantized=False)
        generator = HFGenerator(model, config, stop_token_ids(model.generation_config, tokenizer))
        write(generator, args.batch_size or default_batch_size(model, device, config.max_length))


def check_engine_flags(args):
    """One-line errors before anything loads."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be at least 1")
    if args.engine == "vllm":
        if args.save_tail:
            raise ValueError(f"--save-tail {args.save_tail} needs the teacher's whole distribution, and vLLM returns "
                             "only its top log-probs; use --engine hf, or drop --save-tail")
        require_vllm_python(args.vllm_python)
        if args.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} must be at least 1")
        if args.vllm_memory_fraction is not None and not 0 < args.vllm_memory_fraction <= 1:
            raise ValueError(f"--vllm-memory-fraction {args.vllm_memory_fraction} must be in (0, 1]")
    elif args.tensor_parallel_size != 1 or args.vllm_memory_fraction is not None:
        raise ValueError("--tensor-parallel-size and --vllm-memory-fraction are vLLM's: add --engine vllm")


if __name__ == "__main__":
    main()
