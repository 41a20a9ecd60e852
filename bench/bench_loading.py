"""Peak RSS per rank at start-up of an FSDP2 run, with and without RAM-efficient loading (README "Paper scale on GPUs").

    python bench/bench_loading.py                     # embedded SmolLM2-135M, 2 CPU processes (gloo)
    python bench/bench_loading.py --model DIR --nproc 4

The model is first saved in float16, as LLaMA's checkpoints are, so that both loads convert (bf16 teacher, float32
student: 6 bytes per parameter; a float32 file would be mapped without a copy for the float32 student).
Runs train.py (through tests/fsdp_worker.py, which turns on Accelerate's FSDP2 path for CPU processes) for one step,
once with scripts/fsdp_config.json's `cpu_ram_efficient_loading` off (every rank reads both models) and once on
(rank 0 reads them, the others get their shards by broadcast). Each rank's peak RSS is taken when both models are
loaded (before the Trainer) and when both are sharded (before the first forward; on CPU this includes the shards
and the broadcast buffers, which on GPUs are GPU memory). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from utils.training.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def peak_rss_per_rank(model: Path, data: Path, fsdp_config: dict, nproc: int, workdir: Path) -> list[dict]:
    """{"loaded": GiB, "sharded": GiB} per rank, from the reports tests/fsdp_worker.py writes at each step."""
    config = workdir / "fsdp_config.json"
    config.write_text(json.dumps(fsdp_config))
    output = workdir / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29571",
               str(REPO / "tests" / "fsdp_worker.py"), "--model_name_or_path", str(model), "--data_path", str(data),
               "--output_dir", str(output), "--model_max_length", "16", "--max_steps", "1", "--save_strategy", "no",
               "--use_cpu", "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(config), "--bf16",
               "--ddp_backend", "gloo", "--per_device_train_batch_size", "1", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    reports = [json.loads((output / f"fsdp_rank{rank}.json").read_text()) for rank in range(nproc)]
    return [{when: mib / 1024 for when, mib in report["peak_rss_mib"].items()} for report in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        teacher = load_model(args.model, dtype=torch.float16, quantized=False)
        teacher.save_pretrained(model)
        load_tokenizer(args.model).save_pretrained(model)
        parameters = teacher.num_parameters()
        del teacher
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps({"input_ids": list(range(3, 3 + 12 + row))}) + "\n"
                                for row in range(args.nproc)))
        base = json.loads((REPO / "scripts" / "fsdp_config.json").read_text())
        peaks = {}
        for efficient in (False, True):
            workdir = Path(tmp) / str(efficient)
            workdir.mkdir()
            peaks[efficient] = peak_rss_per_rank(model, data, {**base, "cpu_ram_efficient_loading": efficient},
                                                 args.nproc, workdir)
    print(f"{parameters / 1e6:.0f}M parameters (float16 file), teacher bf16 + student float32 = "
          f"{parameters * 6 / 2**30:.2f} GiB; {args.nproc} gloo processes; peak RSS in GiB")
    print("| rank | loaded, every rank reads | loaded, rank 0 reads | sharded, every rank reads | "
          "sharded, rank 0 reads |")
    print("|---:|---:|---:|---:|---:|")
    for rank in range(args.nproc):
        print(f"| {rank} | {peaks[False][rank]['loaded']:.2f} | {peaks[True][rank]['loaded']:.2f} | "
              f"{peaks[False][rank]['sharded']:.2f} | {peaks[True][rank]['sharded']:.2f} |")


if __name__ == "__main__":
    main()
