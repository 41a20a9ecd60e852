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

With --save-topk N --topk-file F, every answer also leaves in F (overwritten per request) each sequence's rows in
order, one per token: N int32 ids then N float32 log-probabilities (utils/data/teacher_topk.py's side-file row),
from vLLM's raw log-probabilities (the teacher's softmax before temperature and top-k); a sequence's last row is
ids 0 and log-probabilities -inf.

stdout carries only these lines: whatever vLLM prints goes to stderr. It imports only vLLM and the standard library:
vLLM pins its own transformers, so nothing of the main environment's stack runs here.
"""
from __future__ import annotations

import argparse
import ctypes
from array import array
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
                        help="vLLM's share of the GPU's memory; on CPU, the share of the RAM its KV cache takes")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--enforce-eager", action="store_true", help="no graph capture or compilation (CPU)")
    parser.add_argument("--seed", type=int, default=0, help="the engine's seed (every request brings its own)")
    parser.add_argument("--save-topk", type=int, default=0, help="keep the N most likely tokens of every step")
    parser.add_argument("--topk-file", help="where each answer's top-K rows go (with --save-topk)")
    return parser.parse_args(argv)


def die_with_parent() -> None:
    """A killed generate_data.py takes its engine along (Linux), rather than leaving it to finish a batch no one
    reads while holding the memory a rerun needs."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        sys.exit(1)


def memory_arguments(fraction: float) -> dict:
    """LLM(...)'s memory setting. On a GPU, vLLM's share of its memory. On CPU vLLM takes the share of one NUMA node's
    memory, minus all the process holds (torch, the weights), as its KV cache: on a machine whose node 0 holds 8 GiB,
    0.1 of it leaves nothing. There the KV cache is given in bytes instead: the share of all of the RAM."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {"gpu_memory_utilization": fraction}
    return {"kv_cache_memory_bytes": int(fraction * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))}


def ended(ids: list[int], max_length: int, stop_tokens: set[int]) -> bool:
    """Full length, or ended by a stop token after the start token (the start token itself never stops a sequence)."""
    return len(ids) >= max_length or (len(ids) > 1 and ids[-1] in stop_tokens)


def top_rows(step_logprobs, k: int) -> list[tuple[list[int], list[float]]]:
    """(ids, log-probabilities) of the k most likely tokens of each step of one output. vLLM gives each step's
    top-k plus the sampled token, each with its rank."""
    rows = []
    for step in step_logprobs:
        best = sorted((entry.rank, token, entry.logprob) for token, entry in step.items() if entry.rank <= k)
        rows.append(([token for _, token, _ in best], [logprob for _, _, logprob in best]))
    return rows


def write_rows(path: str, sequences: list[list[int]], rows: list[list[tuple[list[int], list[float]]]], k: int):
    """Each sequence's rows in side-file layout: row t is the step that chose token t + 1; the last has none."""
    with open(path, "wb") as out:
        for ids, steps in zip(sequences, rows):
            for step_ids, step_logprobs in [*steps, ([0] * k, [float("-inf")] * k)]:
                out.write(array("i", step_ids).tobytes() + array("f", step_logprobs).tobytes())


def hybrid_sequences(engine, start_tokens: list[int], greedy_tokens: int, seeds: list[int],
                     args: argparse.Namespace) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Our stop tokens only (the generation config's EOS, as the HF engine stops), no text: the caller decodes.
    k = args.save_topk
    common = dict(ignore_eos=True, stop_token_ids=args.stop_token_ids, detokenize=False, logprobs=k or None)
    sequences = [[token] for token in start_tokens]
    rows = [[] for _ in start_tokens]
    if greedy_tokens > 1:
        outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences],
                                  SamplingParams(temperature=0.0, max_tokens=greedy_tokens - 1, **common), use_tqdm=False)
        for ids, steps, output in zip(sequences, rows, outputs):
            ids.extend(output.outputs[0].token_ids)
            steps.extend(top_rows(output.outputs[0].logprobs, k) if k else [])
    stop_tokens = set(args.stop_token_ids)
    open_rows = [row for row, ids in enumerate(sequences) if not ended(ids, args.max_length, stop_tokens)]
    if open_rows:
        sampling = [SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=seeds[row],
                                   max_tokens=args.max_length - len(sequences[row]), **common) for row in open_rows]
        outputs = engine.generate([TokensPrompt(prompt_token_ids=sequences[row]) for row in open_rows], sampling,
                                  use_tqdm=False)
        for row, output in zip(open_rows, outputs):
            sequences[row].extend(output.outputs[0].token_ids)
            rows[row].extend(top_rows(output.outputs[0].logprobs, k) if k else [])
    if k:
        write_rows(args.topk_file, sequences, rows, k)
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
                 max_num_seqs=args.max_num_seqs, **memory_arguments(args.memory_fraction),
                 tensor_parallel_size=args.tensor_parallel_size, skip_tokenizer_init=True,
                 enforce_eager=args.enforce_eager, max_logprobs=max(args.save_topk, 20))

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
