"""Compare result files of scripts/evaluate.py as the paper does: a table and a grouped bar chart.

    python scripts/compare.py results/*.json --out results

writes `results.md`, laid out like the paper's Table 1 (one row per method and W-A-KV bits: FP 16-16-16, then
RTN and QAT per bit config; columns: zero-shot accuracies, their average, then perplexities and the offline
fidelity metrics), and `results.png` (grouped bars per task: FP / RTN / QAT).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.report.compare import load_results, write_report
from utils.safety import user_errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result JSON files written by scripts/evaluate.py, or their "
                                                   "directories")
    parser.add_argument("--out", default="results", help="folder for results.md and results.png")
    parser.add_argument("--allow-mixed-heldout", action="store_true",
                        help="tabulate held-out metrics measured on different --heldout files (refused by default), "
                             "with a note saying which row used which file")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with user_errors("compare.py"):
        report = write_report(load_results(args.results), Path(args.out), args.allow_mixed_heldout)
    print(report.read_text())


if __name__ == "__main__":
    main()
