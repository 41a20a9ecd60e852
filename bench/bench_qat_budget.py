"""What limits how much of the RTN -> FP gap LLM-QAT closes at CPU scale (against an 80 % target at 4-8-4): one
W-A-KV row of the paper table (scripts/paper_table.py) under several training settings, and the share of the gap
each closes on held-out generated sequences and on real text.

    python bench/bench_qat_budget.py                                   # embedded SmolLM2-135M, CPU: ~7 min a row
    python bench/bench_qat_budget.py --settings lr=1e-4 lr=1e-3,epochs=2 --out table_output

A setting is comma-separated table options: lr (--learning-rate), epochs, batch (--batch-size). Every setting
runs in the table's own folder, so FP, RTN and the baselines are computed once, and the setting the table uses by
default is the table's own cell (a later `make table` reuses it).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"lr": "--learning-rate", "epochs": "--epochs", "batch": "--batch-size"}
DEFAULT_SETTINGS = ("lr=1e-4", "lr=3e-4", "lr=1e-3", "lr=3e-4,epochs=2")
COLUMNS = ("Held-out ppl: RTN", "Held-out ppl: LLM-QAT", "Held-out ppl: FP", "QAT gap closed (held-out)",
           "Text ppl: RTN", "Text ppl: LLM-QAT", "Text ppl: FP", "QAT gap closed (text)", "KL to teacher: LLM-QAT",
           "Top-1 agree. (%): LLM-QAT")


def table_flags(setting: str) -> list[str]:
    flags = []
    for item in setting.split(","):
        name, _, value = item.partition("=")
        if name not in OPTIONS or not value:
            raise SystemExit(f"bench_qat_budget.py: error: {item!r} in {setting!r} is not NAME=VALUE with NAME one "
                             f"of {', '.join(OPTIONS)}")
        flags += [OPTIONS[name], value]
    return flags


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    parser.add_argument("--row", default="4-8-4", help="W-A-KV")
    parser.add_argument("--out", default="table_output", help="the table's folder (its cells are shared)")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
    paper_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_table)
    flags = [table_flags(setting) for setting in args.settings]  # all checked before the first long run
    rows = {}
    for setting, extra in zip(args.settings, flags):
        print(f"[budget] {setting}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # the table's own printout: kept short here
            paper_table.main(["--rows", args.row, "--out", args.out, *extra])
        print("\n".join(line for line in printed.getvalue().splitlines() if line.startswith("[table]")), flush=True)
        with (Path(args.out) / "table.csv").open() as f:
            rows[setting] = next(csv.DictReader(f))

    print(f"\nembedded SmolLM2-135M, W-A-KV {args.row}, paper recipe, the table's data ({os.cpu_count()} CPUs)\n")
    print("| setting | " + " | ".join(COLUMNS) + " |\n|---" + "|---:" * len(COLUMNS) + "|")
    for setting, row in rows.items():
        print(f"| {setting} | " + " | ".join(row.get(column, "–") for column in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
