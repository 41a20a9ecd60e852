"""The log-probabilities vLLM gives token sequences as prompts, computed in vLLM's own environment (`make vllm`):

    .venv-vllm/bin/python -m utils.evaluation.vllm_logprobs MODEL SEQUENCES.json OUT.json --dtype float32

SEQUENCES.json is a list of token id lists; OUT.json gets, per sequence, log p(x_t | x_<t) of every token after the
first ("log_probs") and the token vLLM ranks first at each of those positions ("top1"). With `--linears LINEARS.pt` it
also saves, for every linear layer of vLLM's model, its input and output on the first tokens it computes (torch.save
of {vLLM layer name: (input, output)}), so the main environment can run the student's layers on vLLM's own inputs. It
imports only vLLM (and its torch, to save those tensors) and the standard library: vLLM pins its own transformers, so
nothing of the main environment's stack runs here.
"""
from __future__ import annotations

import argparse
import json
import os

from utils.data.vllm_generate import memory_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model directory vLLM loads (an export or a float checkpoint)")
    parser.add_argument("sequences", help="JSON list of token id lists")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (its CPU int4 kernel runs in bfloat16 only)")
    parser.add_argument("--linears", help="also save each linear layer's first input and output rows to this file")
    parser.add_argument("--linear-rows", type=int, default=64, help="token rows per layer that --linears keeps")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no engine core to spawn and kill

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.sequences) as handle:
        sequences = json.load(handle)
    # A KV cache of 5 % of the RAM (the GPU's memory); eager: no graph capture.
    engine = LLM(model=args.model, dtype=args.dtype, **memory_arguments(0.05), enforce_eager=True, seed=0,
                 max_model_len=max(map(len, sequences)) + 1)
    captured = {}
    if args.linears:
        engine.apply_model(lambda model: capture_linears(model, captured, args.linear_rows))  # in-process: shared dict
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
    if args.linears:
        import torch

        torch.save(captured, args.linears)


def capture_linears(model, captured: dict, rows: int) -> None:
    """Keep the first `rows` input and output rows of every linear layer's first call (the prompts' prefill, vLLM's
    engine warm-up having run before)."""
    from vllm.model_executor.layers.linear import LinearBase

    def keep(name, module, inputs, output):
        output = output[0] if isinstance(output, tuple) else output
        captured.setdefault(name, (inputs[0][:rows].detach().clone(), output[:rows].detach().clone()))

    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            module.register_forward_hook(lambda module, inputs, output, name=name: keep(name, module, inputs, output))


if __name__ == "__main__":
    main()
