"""Seconds vLLM takes to load one model, prefill a batch of prompts and generate from it, timed in vLLM's own
environment (`make vllm`); bench/bench_vllm.py runs it once per row of its table:

    .venv-vllm/bin/python bench/vllm_throughput.py MODEL PROMPTS.json OUT.json --dtype bfloat16 --generate 32

PROMPTS.json is a list of token id lists, sent as one batch. After one untimed warm-up generation, each repeat times
a prefill (max_tokens=1) and a generation (max_tokens=GENERATE), both ignoring EOS. OUT.json gets the engine's load
seconds, those seconds per repeat and the threads vLLM's process computes with. It imports only vLLM and the
standard library (and vLLM's own torch, for that thread count): vLLM pins its own transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from utils.data.vllm_generate import memory_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model directory vLLM loads (an export or a float checkpoint)")
    parser.add_argument("prompts", help="JSON list of token id lists, one batch")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--generate", type=int, required=True, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true",
                        help="let vLLM compile the model (and capture CUDA graphs on a GPU); default eager")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no engine core to spawn and kill

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as handle:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(handle)]
    began = time.perf_counter()
    # A KV cache of 10 % of the RAM on CPU (of the GPU's memory on a GPU). No prefix caching: every repeat sends the
    # same prompts, which would otherwise be prefilled once.
    engine = LLM(model=args.model, dtype=args.dtype, **memory_arguments(0.1), enforce_eager=not args.compiled,
                 seed=0, max_model_len=max(len(prompt["prompt_token_ids"]) for prompt in prompts) + args.generate,
                 enable_prefix_caching=False)
    load_seconds = time.perf_counter() - began

    def seconds(max_tokens: int) -> float:
        began = time.perf_counter()
        outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        elapsed = time.perf_counter() - began
        generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        if generated != max_tokens * len(prompts):
            raise RuntimeError(f"vLLM generated {generated} tokens, not {max_tokens} for each of {len(prompts)}")
        return elapsed

    seconds(args.generate)  # warm-up: first calls allocate and pick kernels
    prefill, generate = [], []
    for _ in range(args.repeats):
        prefill.append(seconds(1))
        generate.append(seconds(args.generate))
    with open(args.output, "w") as handle:
        json.dump({"load_s": load_seconds, "prefill_s": prefill, "generate_s": generate,
                   "threads": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    main()
