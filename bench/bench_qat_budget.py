"""What limits how much of the RTN -> FP gap LLM-QAT closes at CPU scale (issue #15, part 5): W4A8KV4 with the
paper's recipe on the demo's data, one training setting per row (learning rate, schedule, epochs, amount of data),
and the share of the gap closed on held-out generated sequences and on real text.

    python bench/bench_qat_budget.py                                  # embedded SmolLM2-135M, CPU: ~7 min a row
    python bench/bench_qat_budget.py --rows lr=1e-4 lr=5e-4,warmup=0.1 --out bench_output/budget

A row is comma-separated `demo.sh` settings: lr (LEARNING_RATE), epochs (EPOCHS), data (NUM_START_TOKENS),
len (SEQ_LEN), and schedule / warmup (train.py's --lr_scheduler_type / --warmup_ratio, through EXTRA_TRAIN_ARGS).
Each row is `scripts/demo.sh` in its own folder (the data, when its settings are the same, is linked, not made again).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench_options import demo_results
from models.quantize import QATConfig
from utils.compare import gap_closed

VARIABLES = {"lr": "LEARNING_RATE", "epochs": "EPOCHS", "data": "NUM_START_TOKENS", "len": "SEQ_LEN"}
TRAIN_FLAGS = {"schedule": "--lr_scheduler_type", "warmup": "--warmup_ratio"}
DEFAULT_ROWS = ("lr=1e-4", "lr=3e-4", "lr=1e-3")


def row_settings(row: str) -> dict[str, str]:
    settings, extra = {}, []
    for item in row.split(","):
        name, _, value = item.partition("=")
        if name in VARIABLES:
            settings[VARIABLES[name]] = value
        elif name in TRAIN_FLAGS:
            extra += [TRAIN_FLAGS[name], value]
        else:
            raise SystemExit(f"bench_qat_budget.py: error: unknown setting {name!r} in {row!r}; use "
                             f"{', '.join([*VARIABLES, *TRAIN_FLAGS])}")
    if extra:
        settings["EXTRA_TRAIN_ARGS"] = " ".join(extra)
    return settings


def link_shared_data(out: Path, shared: Path) -> None:
    """Rows that synthesize the same data share it: demo.sh finds it under its own folder by name."""
    out.mkdir(parents=True, exist_ok=True)
    for data in shared.glob("*/data-*"):
        target = out / data.name
        if data.parent != out and not target.exists() and (data / "all.jsonl").is_file():
            target.symlink_to(data.resolve())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="settings per row, e.g. lr=3e-4,epochs=2")
    parser.add_argument("--bits", nargs=3, type=int, default=(4, 8, 4), metavar=("W", "A", "KV"))
    parser.add_argument("--out", default="bench_output/budget")
    args = parser.parse_args()
    config = QATConfig(*args.bits)
    results = {}
    for row in args.rows:
        out = Path(args.out) / row.replace(",", "-").replace("=", "")
        link_shared_data(out, Path(args.out))
        results[row] = demo_results(config, out, **row_settings(row))
        results[row]["fp"] = json.loads((out / "results" / "fp.json").read_text())["metrics"]

    print(f"\nembedded SmolLM2-135M, W-A-KV {config.label()}, paper recipe, demo data ({os.cpu_count()} CPUs)\n")
    print("| setting | RTN held-out ppl | QAT held-out ppl | FP | gap closed (held-out) | RTN text ppl | QAT text ppl "
          "| FP | gap closed (text) | QAT KL | QAT top-1 (%) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, result in results.items():
        fp, rtn, qat = result["fp"], result["rtn"], result["qat"]
        print(f"| {row} | {rtn['heldout_perplexity']:.2f} | {qat['heldout_perplexity']:.2f} | "
              f"{fp['heldout_perplexity']:.2f} | {gap_closed(fp, rtn, qat, 'heldout_perplexity'):.1%} | "
              f"{rtn['perplexity']:.2f} | {qat['perplexity']:.2f} | {fp['perplexity']:.2f} | "
              f"{gap_closed(fp, rtn, qat, 'perplexity'):.1%} | {qat['kl_to_teacher']:.3f} | "
              f"{100 * qat['top1_agreement']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
