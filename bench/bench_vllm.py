"""vLLM's throughput on this repository's quantized exports against the float model they come from: load seconds and
prefill and decode tokens per second, per (scheme, dtype) row, on vLLM's CPU build (`make vllm`, .venv-vllm).

    python bench/bench_vllm.py                        # embedded SmolLM2-135M, 4 engine loads: 7 min on 2 shared cores
    python bench/bench_vllm.py --rows fp/bfloat16 w8a8/bfloat16 w4a16g/bfloat16 --recipe vllm --output vllm.json

A quantized row serves the RTN student of --model (`quantize_model`, untrained: speed does not depend on the weights'
values) exported packed in the compressed-tensors format (`export_packed`), built once into --work-dir and reused by
later runs; a float row serves the model directory itself. Every row sends the same batch of --batch prompts of
--prompt-len random token ids to a fresh engine in vLLM's environment (bench/vllm_throughput.py): eager, as
scripts/serve_check.py runs it, prefix caching off. After one warm-up generation, each of --repeats rounds times
  - a prefill: max_tokens=1, so prefill tok/s = batch * prompt-len / its seconds;
  - a generation of --generate tokens per prompt, EOS ignored: the same prefill, then generate - 1 decode steps, so
    decode tok/s = batch * (generate - 1) / (generation seconds - prefill seconds of the same round).
The table gives the medians over the rounds; load s is building the engine (weights, KV cache; imports excluded).
vLLM runs in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as in serve_check), where its CPU thread binding
(VLLM_CPU_OMP_THREADS_BIND, applied to a separate engine process only) does not apply: the model computes with
torch's threads, unbound (default: all cores; --threads sets OMP_NUM_THREADS). Where other processes share the
cores those threads oversubscribe them, and the float rows slow down most (measured on a tiny model: float decode
40x slower with 2 threads than with 1 on 2 busy cores, the int4 rows hardly): pass --threads 1 there.
vLLM's CPU int4 kernel (W4A16) runs in bfloat16 only; int8 W8A8 and the float model run in float32 and bfloat16.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from models import QATConfig, quantize_model, save_quantized
from models.checkpoint import saved_config
from models.export import export_packed
from models.quantize import CONFIG_KEY, RECIPES
from utils.data.records import model_display_name
from utils.data.vllm_engine import VLLM_PYTHON, require_vllm_python
from utils.evaluation.serving import vllm_mismatch
from utils.safety import atomic_file, check_output_file, ensure_writable_dir, staged_directory, user_errors
from utils.training.loading import load_model_and_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "bench" / "vllm_throughput.py"
SCHEMES = ("fp", "w8a8", "w4a16", "w4a16g")  # float; int8 W8A8; int4 weight-only per channel; the same per group
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_ROWS = ("fp/float32", "w8a8/float32", "fp/bfloat16", "w4a16/bfloat16")
MARKER = "bench_vllm.json"  # in --work-dir: the model its exports come from
GPU_COMMAND = ("python bench/bench_vllm.py --rows fp/bfloat16 w8a8/bfloat16 w4a16/bfloat16 w4a16g/bfloat16 "
               "--compiled --batch 64 --prompt-len 512 --generate 128")


def scheme_config(scheme: str, recipe: str, group_size: int) -> QATConfig | None:
    """The student a row serves; None: the float model."""
    return {"fp": None, "w8a8": QATConfig(8, 8, 16, recipe=recipe), "w4a16": QATConfig(4, 16, 16, recipe=recipe),
            "w4a16g": QATConfig(4, 16, 16, w_group_size=group_size, recipe=recipe)}[scheme]


def parse_rows(specs: list[str]) -> list[tuple[str, str]]:
    rows = []
    for spec in specs:
        scheme, _, dtype = spec.partition("/")
        if scheme not in SCHEMES or dtype not in DTYPES:
            raise ValueError(f"--rows {spec}: write SCHEME/DTYPE, SCHEME one of {', '.join(SCHEMES)}, DTYPE one of "
                             f"{', '.join(DTYPES)} (e.g. w4a16/bfloat16)")
        if scheme.startswith("w4a16") and dtype == "float32":
            raise ValueError(f"--rows {spec}: vLLM's int4 kernels do not run in float32 (its CPU build: bfloat16 "
                             f"only); pass {scheme}/bfloat16")
        rows.append((scheme, dtype))
    return rows


def weight_files(model_dir: str) -> dict[str, list[int]]:
    """Size and modification time of each weight file: what tells a model directory's weights changed."""
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns]
            for path in sorted(Path(model_dir).glob("*")) if path.suffix in (".safetensors", ".bin")}


def claim_work_dir(work_dir: Path, source: str) -> Path:
    """`work_dir` for the exports of `source` as it is now: a new or empty directory gets a marker naming the model;
    one this bench did not write, or wrote for another model (or for `source` before its weights changed), is
    refused rather than reused or overwritten."""
    claim = {"model": source, "weights": weight_files(source)}
    marker = work_dir / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) != claim:
            raise ValueError(f"--work-dir {work_dir} holds exports of another model (or of {source} before its "
                             "weights changed); pass another --work-dir, or delete that one")
    elif work_dir.is_dir() and any(work_dir.iterdir()):
        raise ValueError(f"--work-dir {work_dir} is not empty and this bench did not write it; pass a new or empty "
                         "directory")
    ensure_writable_dir(work_dir, "--work-dir")
    if not marker.is_file():
        with atomic_file(marker) as handle:
            json.dump(claim, handle)
    return work_dir


def float_model_dir(source: str, work_dir: Path) -> Path:
    """A directory vLLM loads the float model from: `source` itself when it holds safetensors, else a copy saved
    once in `work_dir`."""
    if (Path(source) / "config.json").is_file() and any(Path(source).glob("*.safetensors")):
        return Path(source)
    target = work_dir / "float"
    if not target.is_dir():
        model, tokenizer = load_model_and_tokenizer(source)
        with staged_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return target


def packed_export(config: QATConfig, source: str, work_dir: Path) -> Path:
    """The RTN student of `source` with `config`, exported packed: built once into work_dir/<its label>."""
    target = work_dir / config.label()
    if not (target / "config.json").is_file():
        logging.info("Exporting the %s RTN student of %s to %s (once)", config.label(), source, target)
        model, tokenizer = load_model_and_tokenizer(source)
        with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
            save_quantized(quantize_model(model, config), Path(scratch) / "student", tokenizer)
            export_packed(Path(scratch) / "student", target)
    return target


def checkpoint_mib(model_dir: Path) -> float:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors")) / 2**20


def measure(model_dir: Path, prompts_file: Path, dtype: str, args, log: Path) -> dict:
    """The row's load seconds, throughputs and the timings they come from, or {"error": vLLM's last line} (its
    whole log is `log`)."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "timings.json"
        # absolute, not resolved: a venv's python is a link, and resolving it would leave the venv
        command = [os.path.abspath(args.vllm_python), str(WORKER), str(model_dir), str(prompts_file), str(output),
                   "--dtype", dtype, "--generate", str(args.generate), "--repeats", str(args.repeats)]
        command += ["--compiled"] * args.compiled
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        log.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        timings = json.loads(output.read_text())
    decode_s = [generate - prefill for generate, prefill in zip(timings["generate_s"], timings["prefill_s"])]
    return {"load_s": timings["load_s"],
            "prefill_tok_s": args.batch * args.prompt_len / statistics.median(timings["prefill_s"]),
            "decode_tok_s": args.batch * (args.generate - 1) / statistics.median(decode_s), **timings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="float model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"SCHEME/DTYPE, SCHEME one of {', '.join(SCHEMES)} (default: {' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--recipe", default="vllm", choices=tuple(RECIPES),
                        help="the quantized students' recipe (vllm: what vLLM computes, README \"Recipes\")")
    parser.add_argument("--group-size", type=int, default=64,
                        help="w4a16g's weight group (SmolLM2's hidden size 576 is not a multiple of 128)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--generate", type=int, default=32, help="tokens generated per prompt (at least 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row (medians are reported)")
    parser.add_argument("--compiled", action="store_true",
                        help="let vLLM compile the model (and capture CUDA graphs on a GPU), as it serves by default")
    parser.add_argument("--threads", type=int, help="vLLM's CPU threads (OMP_NUM_THREADS; default: all cores; 1 is "
                                                    "steadier when other processes share the cores)")
    parser.add_argument("--work-dir", default="bench_output/vllm", help="cached exports and each row's vLLM log")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of vLLM's environment (make vllm)")
    parser.add_argument("--output", help="JSON file for the settings and every row's numbers")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    with user_errors("bench_vllm.py"):
        rows = parse_rows(args.rows)
        if min(args.batch, args.prompt_len, args.repeats, args.threads or 1) < 1 or args.generate < 2:
            raise ValueError("--batch, --prompt-len, --repeats and --threads must be at least 1, --generate at least 2 "
                             "(decode is what follows the first generated token)")
        require_vllm_python(args.vllm_python)
        if args.output:
            check_output_file(args.output)
        source = resolve_model_path(args.model)
        if Path(source).is_dir():  # vLLM's process runs in the repository: every path it gets is absolute
            source = str(Path(source).resolve())
        config = saved_config(source)
        if CONFIG_KEY in config or "quantization_config" in config:
            raise ValueError(f"{source} is quantized already; --model takes the float model the exports come from")
        positions = config.get("max_position_embeddings")
        if positions and args.prompt_len + args.generate > positions:
            raise ValueError(f"--prompt-len {args.prompt_len} + --generate {args.generate} is more than the model's "
                             f"{positions} positions; pass shorter ones")
        configs = {scheme: scheme_config(scheme, args.recipe, args.group_size) for scheme, _ in rows}
        work_dir = claim_work_dir(Path(args.work_dir).resolve(), source)
        model_dirs = {scheme: packed_export(config, source, work_dir) if config else float_model_dir(source, work_dir)
                      for scheme, config in configs.items()}

    vocab_size = saved_config(model_dirs[rows[0][0]])["vocab_size"]
    prompts = torch.randint(0, vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts_file = work_dir / f"prompts-{args.batch}x{args.prompt_len}.json"
    prompts_file.write_text(json.dumps(prompts.tolist()))
    results = []
    for scheme, dtype in rows:
        logging.info("Timing %s in %s with vLLM", model_dirs[scheme], dtype)
        label = configs[scheme].label() if configs[scheme] else "16-16-16"
        measured = measure(model_dirs[scheme], prompts_file, dtype, args, work_dir / f"{scheme}-{dtype}.log")
        results.append({"scheme": scheme, "label": label, "dtype": dtype, "model_dir": str(model_dirs[scheme]),
                        "checkpoint_mib": checkpoint_mib(model_dirs[scheme]), **measured})

    float_decode = {row["dtype"]: row.get("decode_tok_s") for row in results if row["scheme"] == "fp"}
    threads = sorted({row["threads"] for row in results if "threads" in row})
    mode = "compiled" if args.compiled else "eager"
    print(f"\n{model_display_name(args.model)}, recipe {args.recipe}; batch {args.batch} x {args.prompt_len} prompt "
          f"tokens, {args.generate} generated each, median of {args.repeats}; {mode}; {os.cpu_count()} CPUs, "
          f"torch threads here {torch.get_num_threads()}, in vLLM {'/'.join(map(str, threads)) or '-'}, unbound\n")
    print("| scheme | W-A-KV | dtype | checkpoint MiB | load s | prefill tok/s | decode tok/s | decode vs FP |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        start = f"| {row['scheme']} | {row['label']} | {row['dtype']} | {row['checkpoint_mib']:.0f} |"
        if "error" in row:
            print(f"{start} failed: {row['error'].replace('|', '/')} | | | |")
            continue
        reference = float_decode.get(row["dtype"])
        row["decode_vs_fp"] = row["decode_tok_s"] / reference if reference else None
        versus = f"{row['decode_vs_fp']:.2f}x" if reference else "-"
        print(f"{start} {row['load_s']:.1f} | {row['prefill_tok_s']:,.0f} | {row['decode_tok_s']:,.1f} | {versus} |")
    for scheme, config in configs.items():
        mismatch = config and vllm_mismatch({CONFIG_KEY: config.__dict__, "quantization_config": {}})
        if mismatch:
            print(f"\nnote: {scheme} ({config.label()}): {mismatch}")
    print(f"\nvLLM logs: {work_dir}/<scheme>-<dtype>.log. No GPU numbers here. On a GPU, with vLLM's CUDA build in "
          f".venv-vllm (`make vllm` installs the CPU build, vllm-cpu):\n    {GPU_COMMAND}")
    if args.output:
        with atomic_file(args.output) as handle:
            json.dump({"model": source, "recipe": args.recipe, "batch": args.batch, "prompt_len": args.prompt_len,
                       "generate": args.generate, "repeats": args.repeats, "compiled": args.compiled,
                       "threads": args.threads, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "rows": results},
                      handle, indent=2)


if __name__ == "__main__":
    main()
