"""The vLLM engine of data-free synthesis, run in vLLM's own environment (`make vllm`) by utils/data/vllm_engine.py:

    .venv-vllm/bin/python -m utils.data.vllm_generate MODEL --dtype float32 --max-length 2048 --temperature 1 \
        --top-k 50 --stop-token-ids 2 --max-num-seqs 256 --memory-fraction 0.9 [--enforce-eager]

It loads the teacher once, says {"ready": true} on stdout, then answers every request line on stdin,
{"start_tokens": [...], "greedy_tokens": K, "seeds": [...]}, with one line {"sequences": [[...], ...]}: the hybrid
sampling of utils/data/sampler.py. Each sequence's first K tokens (start token included) are top-1, the rest sampled
with the temperature and top-k (the whole vocabulary with 0), each from its own seed, up to --max-length tokens; a
sequence ends after a stop token, which it keeps. Two `generate` calls do it: a greedy one for the K - 1 prefix tokens,
then a sampled one that continues every prefix not ended yet. (A logits processor could switch within one call, but
vLLM's are batch-level classes; re-reading a prefix of at most a few tokens costs next to nothing.)

stdout carries only these lines: whatever vLLM prints goes to stderr. It imports only vLLM and the standard library:
vLLM pins its own transformers, so nothing of the main environment's stack runs here.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the teacher's directory (or hub name)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-length", type=int, required=True, help="tokens per sequence, start token included")
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--top-k", type=int, required=True, help="0: the whole vocabulary")
    parser.add_argument("--stop-token-ids", type=int, nargs="*", default=[])
    parser.add_argument("--max-num-seqs", type=int, required=True, help="sequences decoded at once")
    parser.add_argument("--memory-fraction", type=float, required=True,
                        help="vLLM's gpu_memory_utilization: of the GPU, or on CPU of the RAM (weights + KV cache)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--enforce-eager", action="store_true", help="no graph capture or compilation (CPU)")
    parser.add_argument("--seed", type=int, default=0, help="the engine's seed (every request brings its own)")
    return parser.parse_args(argv)


def die_with_parent() -> None:
    """A killed generate_data.py takes its engine along (Linux), rather than leaving it to finish a batch no one
    reads while holding the memory a rerun needs."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        sys.exit(1)


def ended(ids: list[int], max_length: int, stop_tokens: set[int]) -> bool:
    """Full length, or ended by a stop token after the start token (the start token itself never stops a sequence)."""
    return len(ids) >= max_length or (len(ids) > 1 and ids[-1] in stop_tokens)


def hybrid_sequences(engine, start_tokens: list[int], greedy_tokens: int, seeds: list[int],
                     args: argparse.Namespace) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Our stop tokens only (the generation config's EOS, as the HF engine stops), no text: the caller decodes.
    common = dict(ignore_eos=True, stop_token_ids=args.stop_token_ids, detokenize=False)
    sequences = [[token] for token in start_tokens]
    if greedy_tokens > 1:
        outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences],
                                  SamplingParams(temperature=0.0, max_tokens=greedy_tokens - 1, **common), use_tqdm=False)
        for ids, output in zip(sequences, outputs):
            ids.extend(output.outputs[0].token_ids)
    stop_tokens = set(args.stop_token_ids)
    open_rows = [row for row, ids in enumerate(sequences) if not ended(ids, args.max_length, stop_tokens)]
    if open_rows:
        sampling = [SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=seeds[row],
                                   max_tokens=args.max_length - len(sequences[row]), **common) for row in open_rows]
        outputs = engine.generate([TokensPrompt(prompt_token_ids=sequences[row]) for row in open_rows], sampling,
                                  use_tqdm=False)
        for row, output in zip(open_rows, outputs):
            sequences[row].extend(output.outputs[0].token_ids)
    return sequences


def main(argv=None) -> None:
    args = parse_args(argv)
    protocol = os.fdopen(os.dup(1), "w")  # the answers; anything else printed to stdout goes to stderr
    os.dup2(2, 1)
    die_with_parent()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no engine core to spawn and kill
    if args.threads:  # torch reads it at import; vLLM then leaves the thread count alone
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from vllm import LLM

    # The caller passes token ids and decodes the results: no tokenizer here.
    engine = LLM(model=args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_length,
                 max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.memory_fraction,
                 tensor_parallel_size=args.tensor_parallel_size, skip_tokenizer_init=True,
                 enforce_eager=args.enforce_eager)

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        answer({"sequences": hybrid_sequences(engine, request["start_tokens"], request["greedy_tokens"],
                                              request["seeds"], args)})


if __name__ == "__main__":
    main()
