"""The vLLM engine of data-free synthesis, on this side: vLLM runs in its own environment (`make vllm`; it pins its own
transformers), so the teacher is loaded once by a child process (utils/data/vllm_generate.py) that answers one batch
of sequences at a time over a pipe.

`VLLMGenerator` is a drop-in for the HF engine (`HFGenerator`, utils/data/sampler.py): `generator(start_tokens,
greedy_tokens)` returns the sequences of one batch, each sampled from its own seed (`sequence_seed`: the seed, the start
token and the greedy length), so a resumed shard asks for the same sequences. The engine starts on the first batch,
inside the shard's lock and not at all for a finished shard; its log goes to a file, and a failure says its last line.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from utils.data.sampler import Generated, SamplingConfig, sequence_seed
from utils.data.teacher_topk import read_rows

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
# `make vllm` builds it here; LLM_QAT_VLLM_PYTHON names another (e.g. vLLM's CUDA build on a GPU machine)
VLLM_PYTHON = Path(os.environ.get("LLM_QAT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
INSTALL_HINT = "make vllm (vLLM's CPU build in its own environment, .venv-vllm)"
VLLM_BATCH_SIZE = 256  # start tokens per request, sequences decoded at once (as many as its KV cache holds)
VLLM_MEMORY_FRACTION = {"cuda": 0.9, "cpu": 0.2}  # vLLM's default on a GPU; on CPU the share of the RAM it takes


def require_vllm_python(python: str | Path) -> None:
    """Before any long work: the python of vLLM's environment exists."""
    if not Path(python).is_file():
        raise FileNotFoundError(f"{python} does not exist: run {INSTALL_HINT}, or pass --vllm-python")


def engine_gpus(device_index: int, tensor_parallel_size: int, gpu_count: int, environ=os.environ) -> str:
    """CUDA_VISIBLE_DEVICES of the engine of GPU process `device_index` (LOCAL_RANK under torchrun): the
    `device_index`-th block of `tensor_parallel_size` visible GPUs, so the engines of a node never share a GPU."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    else:
        visible = [str(gpu) for gpu in range(gpu_count)]
    block = visible[device_index * tensor_parallel_size:(device_index + 1) * tensor_parallel_size]
    if len(block) < tensor_parallel_size:
        raise ValueError(f"GPU process {device_index} with --tensor-parallel-size {tensor_parallel_size} needs GPUs "
                         f"{device_index * tensor_parallel_size}..{(device_index + 1) * tensor_parallel_size - 1}, "
                         f"but {len(visible)} are visible; start fewer processes per node")
    return ",".join(block)


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


class VLLMGenerator:
    """One batch of hybrid-sampled sequences per call, from a teacher vLLM holds in a child process. A context
    manager: leaving it ends the child."""

    engine = "vllm"  # named in the shard's settings: one engine's shard is never finished by the other

    def __init__(self, model_path: str | Path, config: SamplingConfig, stop_tokens: set[int], log_path: str | Path, *,
                 dtype: str = "float32", max_num_seqs: int = VLLM_BATCH_SIZE,
                 memory_fraction: float = VLLM_MEMORY_FRACTION["cuda"],
                 tensor_parallel_size: int = 1, eager: bool = False, threads: int | None = None,
                 gpus: str | None = None, python: str | Path = VLLM_PYTHON):
        self.config = config
        self.log_path = Path(log_path)
        self.command = [str(python), "-m", "utils.data.vllm_generate", str(model_path), "--dtype", dtype,
                        "--max-length", str(config.max_length), "--temperature", str(config.temperature),
                        "--top-k", str(config.top_k), "--stop-token-ids", *map(str, sorted(stop_tokens)),
                        "--max-num-seqs", str(max_num_seqs), "--memory-fraction", str(memory_fraction),
                        "--tensor-parallel-size", str(tensor_parallel_size), "--seed", str(config.seed),
                        *(["--enforce-eager"] if eager else []), *(["--threads", str(threads)] if threads else [])]
        # Top-K rows come back through a file beside the log: at paper scale a batch's are ~1 GB, too much for JSON.
        self.topk_file = self.log_path.with_name(self.log_path.name + ".topk")
        if config.save_topk:
            self.command += ["--save-topk", str(config.save_topk), "--topk-file", str(self.topk_file)]
        self.environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {})}
        self.process = None
        self.startup_seconds = None

    def start(self) -> float:
        """Load the teacher in vLLM; returns the seconds it took (also kept in `startup_seconds`)."""
        began = time.perf_counter()
        with self.log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.environment, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        self.answer()  # {"ready": true}
        self.startup_seconds = time.perf_counter() - began
        logger.info("vLLM started in %.0f s (its log: %s)", self.startup_seconds, self.log_path)
        return self.startup_seconds

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise OSError(f"the vLLM engine stopped (exit status {status}): {last_line(self.log_path)} (its log: "
                          f"{self.log_path})")
        return json.loads(line)

    def __call__(self, start_tokens: list[int], greedy_tokens: int) -> Generated:
        if self.process is None:
            self.start()
        seeds = [sequence_seed(self.config.seed, token, greedy_tokens) for token in start_tokens]
        try:
            self.process.stdin.write(json.dumps({"start_tokens": start_tokens, "greedy_tokens": greedy_tokens,
                                                 "seeds": seeds}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: answer() says why
        sequences = self.answer()["sequences"]
        if not self.config.save_topk:
            return sequences, None
        first = [0]
        for ids in sequences:
            first.append(first[-1] + len(ids))
        return sequences, [read_rows(self.topk_file, begin, len(ids), self.config.save_topk)
                           for begin, ids in zip(first, sequences)]

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """A clean end closes the child's input, and it exits; an error (or Ctrl-C) kills it at once."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if error_type is not None:
            process.kill()
        try:
            process.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        self.topk_file.unlink(missing_ok=True)
