"""Generated tokens per second: the batched hybrid sampler of utils/data/sampler.py against the released code's
loop (one sequence at a time: a greedy `model.generate` for the first K tokens, then a sampled `generate` for
the rest). Same teacher, lengths and device. Both run every sequence to --max-length (EOS does not stop them),
so both do the same amount of work per sequence. The loop is slow, so it times only its first
--sequential-sequences sequences; tokens per second is a rate, so the two stay comparable.

    python bench/bench_generate.py                                      # the embedded default teacher, CPU
    python bench/bench_generate.py --num-start-tokens 64 --max-length 512 --device cuda
"""
from __future__ import annotations

import argparse
import time


import torch

from utils.data.sampler import SamplingConfig, generate_batch, resolve_device
from utils.data.start_tokens import eligible_start_tokens
from utils.training.loading import load_model_and_tokenizer


def batched_run(model, start_tokens, config):
    sequences = []
    for greedy_tokens in config.greedy_lengths:
        sequences += generate_batch(model, start_tokens, greedy_tokens, config)
    return sequences


def sequential_run(model, work, config, pad_token_id):
    """The released code's loop: two `generate` calls per sequence, no batching."""
    sequences = []
    for start_token, greedy_tokens in work:
        prompt = torch.tensor([[start_token]], device=model.device)
        prefix = model.generate(prompt, do_sample=False, max_length=greedy_tokens, pad_token_id=pad_token_id)
        full = model.generate(prefix, do_sample=True, top_k=config.top_k, temperature=config.temperature,
                              max_length=config.max_length, min_length=config.max_length, pad_token_id=pad_token_id)
        sequences.append(full[0].tolist())
    return sequences


def timed(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    sequences = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return len(sequences), sum(len(ids) - 1 for ids in sequences), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--num-start-tokens", type=int, default=32,
                        help="start tokens; each gives one sequence per greedy length 3, 4, 5, and is one batch row")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--sequential-sequences", type=int, default=12, help="sequences the slow loop times")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="CPU threads for both generators (default: torch's; 1 is "
                                                    "steadier when other processes share the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    start_tokens = eligible_start_tokens(tokenizer, model.config.vocab_size)[1000:1000 + args.num_start_tokens]
    config = SamplingConfig(max_length=args.max_length)
    work = [(token, greedy) for greedy in config.greedy_lengths for token in start_tokens][:args.sequential_sequences]
    pad_token_id = tokenizer.pad_token_id

    # Warm up both paths (first calls allocate and pick kernels).
    warm = SamplingConfig(max_length=8)
    generate_batch(model, start_tokens[:2], 3, warm)
    sequential_run(model, work[:1], warm, pad_token_id)

    rows = {"batched (this repo)": timed(lambda: batched_run(model, start_tokens, config), device),
            "one at a time (released code)": timed(lambda: sequential_run(model, work, config, pad_token_id), device)}
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"\nteacher {args.model or 'SmolLM2-135M-Instruct (embedded)'}, device {device} ({dtype}, "
          f"{threads} threads), {args.max_length} tokens per sequence, batch {len(start_tokens)}\n")
    print("| generator | sequences | generated tokens | seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, (count, tokens, seconds) in rows.items():
        rates[name] = tokens / seconds
        print(f"| {name} | {count} | {tokens:,} | {seconds:.1f} | {rates[name]:,.1f} |")
    print(f"\nspeed-up: {rates['batched (this repo)'] / rates['one at a time (released code)']:.1f}x")


if __name__ == "__main__":
    main()
