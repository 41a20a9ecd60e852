"""The log-probabilities vLLM gives token sequences as prompts, computed in vLLM's own environment (`make vllm`):

    .venv-vllm/bin/python -m utils.evaluation.vllm_logprobs MODEL SEQUENCES.json OUT.json --dtype float32

SEQUENCES.json is a list of token id lists; OUT.json gets, per sequence, log p(x_t | x_<t) of every token after the
first ("log_probs") and the token vLLM ranks first at each of those positions ("top1"). It imports only vLLM and the
standard library: vLLM pins its own transformers, so nothing of the main environment's stack runs here.
"""
from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model directory vLLM loads (an export or a float checkpoint)")
    parser.add_argument("sequences", help="JSON list of token id lists")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (its CPU int4 kernel runs in bfloat16 only)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no engine core to spawn and kill

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.sequences) as handle:
        sequences = json.load(handle)
    # On CPU gpu_memory_utilization is the share of RAM vLLM reserves for its KV cache; eager: no graph capture.
    engine = LLM(model=args.model, dtype=args.dtype, gpu_memory_utilization=0.1, enforce_eager=True, seed=0,
                 max_model_len=max(map(len, sequences)) + 1)
    outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences],
                              SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    result = {"log_probs": [], "top1": []}
    for ids, output in zip(sequences, outputs):
        positions = output.prompt_logprobs[1:]  # the first token has no prediction
        result["log_probs"].append([entries[token].logprob for token, entries in zip(ids[1:], positions)])
        result["top1"].append([next(token for token, entry in entries.items() if entry.rank == 1)
                               for entries in positions])
    with open(args.output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
