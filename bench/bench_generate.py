"""Generated tokens per second of the synthesis engines, side by side on one plan: the batched HF sampler of
utils/data/sampler.py and vLLM (utils/data/vllm_engine.py, `make vllm`) at each --dtypes, and the released code's loop
(one sequence at a time: a greedy `model.generate` for the first K tokens, then a sampled `generate` for the rest).
Same teacher, start tokens, lengths, batches (generate_data.py's) and device. Every sequence runs to --max-length (EOS
does not stop them), so all do the same work per sequence. Start-up (loading the teacher; for vLLM, starting its
engine) is timed apart from generation. The loop is slow, so it times only its first --sequential-sequences sequences
(float32); tokens per second is a rate, so the rows stay comparable.

--distribution adds the check that the two engines sample one distribution (utils/data/distribution.py): the gaps
between vLLM's sequences and the HF engine's, against the gaps between two seeds of the HF engine (float32).

    python bench/bench_generate.py                                      # the embedded default teacher, CPU
    python bench/bench_generate.py --num-start-tokens 96 --max-length 128 --distribution   # the demo's sizes
    python bench/bench_generate.py --num-start-tokens 64 --max-length 512 --device cuda
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from utils.data.distribution import KOLMOGOROV_1_PERCENT, distribution_gaps, sample_statistics
from utils.data.sampler import HFGenerator, SamplingConfig, generate_batch, resolve_device
from utils.data.start_tokens import eligible_start_tokens
from utils.data.synthesis import plan_batches
from utils.data.vllm_engine import (VLLM_BATCH_SIZE, VLLM_MEMORY_FRACTION, VLLM_PYTHON, VLLMGenerator, engine_gpus,
                                     require_vllm_python)
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

HF, VLLM, LOOP = "HF batched (this repo)", "vLLM", "one at a time (released code)"


def run_plan(generator, start_tokens: list[int], batch_size: int) -> list[tuple[list[int], int]]:
    """(token ids, greedy length) of every sequence, in generate_data.py's batches."""
    return [(ids, greedy) for greedy, chunk in plan_batches(start_tokens, generator.config.greedy_lengths, batch_size)
            for ids in generator(chunk, greedy)[0]]


def sequential_run(model, work, config, pad_token_id):
    """The released code's loop: two `generate` calls per sequence, no batching."""
    sequences = []
    for start_token, greedy_tokens in work:
        prompt = torch.tensor([[start_token]], device=model.device)
        prefix = model.generate(prompt, do_sample=False, max_length=greedy_tokens, pad_token_id=pad_token_id)
        full = model.generate(prefix, do_sample=True, top_k=config.top_k, temperature=config.temperature,
                              max_length=config.max_length, min_length=config.max_length, pad_token_id=pad_token_id)
        sequences.append((full[0].tolist(), greedy_tokens))
    return sequences


def timed(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--num-start-tokens", type=int, default=32,
                        help="start tokens; each gives one sequence per greedy length 3, 4, 5")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="HF: start tokens per batch (generate_data.py's "
                                                                   "default on CPU)")
    parser.add_argument("--vllm-batch-size", type=int, default=VLLM_BATCH_SIZE,
                        help="vLLM: start tokens per request, and sequences it decodes at once (generate_data.py's "
                             "default)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm", "loop"], choices=("hf", "vllm", "loop"))
    parser.add_argument("--sequential-sequences", type=int, default=12, help="sequences the slow loop times")
    parser.add_argument("--distribution", action="store_true",
                        help="also compare the engines' samples (float32; one more HF run, with seed 1)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="CPU threads of both engines (default: torch's, one per core; "
                                                    "1 is steadier when other processes share the cores)")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of vLLM's environment (make vllm)")
    parser.add_argument("--vllm-memory-fraction", type=float, default=None,
                        help="vLLM's share of the GPU's memory, or on CPU of the RAM (default: 0.9 GPU, 0.2 CPU)")
    args = parser.parse_args()
    if "vllm" in args.engines:
        require_vllm_python(args.vllm_python)
    if args.distribution and (not {"hf", "vllm"} <= set(args.engines) or "float32" not in args.dtypes):
        parser.error("--distribution needs both engines (hf, vllm) and float32")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model_path = resolve_model_path(args.model)
    config = SamplingConfig(max_length=args.max_length)
    vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    start_tokens = eligible_start_tokens(tokenizer, vocab_size)[1000:1000 + args.num_start_tokens]
    warm = replace(config, max_length=8)  # first calls allocate and pick kernels
    gpus = engine_gpus(device.index or 0, 1, torch.cuda.device_count()) if device.type == "cuda" else None
    memory_fraction = args.vllm_memory_fraction or VLLM_MEMORY_FRACTION[device.type]

    rows, samples, teacher = [], {}, None  # rows: (engine, dtype, samples, seconds, start-up seconds)
    for dtype in args.dtypes:
        model, load_seconds = timed(lambda: load_model(args.model, dtype=getattr(torch, dtype), device=device,
                                                         quantized=False), device)
        if "hf" in args.engines:
            generate_batch(model, start_tokens[:2], 3, warm)
            done, seconds = timed(lambda: run_plan(HFGenerator(model, config, set()), start_tokens, args.batch_size),
                                  device)
            rows.append((HF, dtype, done, seconds, load_seconds))
            samples[HF, dtype] = done
        if "vllm" in args.engines:
            log = Path(tempfile.gettempdir()) / f"bench_generate_vllm_{dtype}.log"
            with VLLMGenerator(model_path, config, set(), log, dtype=dtype, max_num_seqs=args.vllm_batch_size,
                               memory_fraction=memory_fraction, eager=device.type == "cpu", threads=args.threads,
                               gpus=gpus, python=args.vllm_python) as vllm:
                startup = vllm.start()
                vllm(start_tokens[:2], 3)
                done, seconds = timed(lambda: run_plan(vllm, start_tokens, args.vllm_batch_size), device)
            rows.append((VLLM, dtype, done, seconds, startup))
            samples[VLLM, dtype] = done
        if "loop" in args.engines and dtype == "float32" and args.sequential_sequences:
            work = [(token, greedy) for greedy in config.greedy_lengths for token in start_tokens]
            work = work[:args.sequential_sequences]
            sequential_run(model, work[:1], warm, tokenizer.pad_token_id)
            done, seconds = timed(lambda: sequential_run(model, work, config, tokenizer.pad_token_id), device)
            rows.append((LOOP, dtype, done, seconds, load_seconds))
        if dtype == "float32":
            teacher = model

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"\nteacher {args.model or 'SmolLM2-135M-Instruct (embedded)'}, device {device} ({threads} threads), "
          f"{len(start_tokens)} start tokens x {len(config.greedy_lengths)} greedy lengths, {args.max_length} tokens "
          f"per sequence, batch {args.batch_size} (HF) / {args.vllm_batch_size} (vLLM)\n")
    print("| generator | dtype | sequences | generated tokens | seconds | tokens/s | start-up s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, dtype, done, seconds, startup in rows:
        tokens = sum(len(ids) - 1 for ids, _ in done)
        rates[name, dtype] = tokens / seconds
        print(f"| {name} | {dtype} | {len(done)} | {tokens:,} | {seconds:.1f} | {rates[name, dtype]:,.1f} | "
              f"{startup:.1f} |")
    print()
    reference = rates.get((HF, "float32"))
    for (name, dtype), rate in rates.items():
        if reference and (name, dtype) != (HF, "float32"):
            print(f"{name} {dtype} / HF batched float32: {rate / reference:.2f}x")

    if args.distribution:
        other_seed = run_plan(HFGenerator(teacher, replace(config, seed=1), set()), start_tokens, args.batch_size)
        hf, hf_other, served = (sample_statistics(teacher, done, config)
                                for done in (samples[HF, "float32"], other_seed, samples[VLLM, "float32"]))
        between_seeds, to_hf, to_hf_other = (distribution_gaps(hf, hf_other), distribution_gaps(served, hf),
                                             distribution_gaps(served, hf_other))
        print(f"\nteacher NLL per generated token: HF seed 0 {hf.nll:.4f}, HF seed 1 {hf_other.nll:.4f}, "
              f"vLLM {served.nll:.4f}")
        print(f"calibration (KS distance from uniform, {served.sampled_tokens:,} sampled tokens; under "
              f"{KOLMOGOROV_1_PERCENT / served.sampled_tokens ** 0.5:.4f} passes at 1%): HF seed 0 "
              f"{hf.calibration:.4f}, HF seed 1 {hf_other.calibration:.4f}, vLLM {served.calibration:.4f}\n")
        print("| statistic | HF seed 0 vs HF seed 1 | vLLM vs HF seed 0 | vLLM vs HF seed 1 |")
        print("| --- | ---: | ---: | ---: |")
        for name in between_seeds:
            print(f"| {name} | {between_seeds[name]:.4f} | {to_hf[name]:.4f} | {to_hf_other[name]:.4f} |")


if __name__ == "__main__":
    main()
