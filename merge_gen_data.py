"""Merge the shards of generate_data.py into one training file, validating every line. See docs/SYNTHESIS.md.

    python merge_gen_data.py                                   # gen_data/shard-*.jsonl -> gen_data/all.jsonl
    python merge_gen_data.py 'run1/shard-*.jsonl' --output data/train.jsonl --heldout 50 --force
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.data.merge import find_shard_files, heldout_file, merge_shards
from utils.data.teacher_topk import describe_rows, store_directory
from utils.safety import user_errors

logger = logging.getLogger("merge_gen_data")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", default=["gen_data"],
                        help="shard files, directories (their shard-*.jsonl) or glob patterns (default: gen_data)")
    parser.add_argument("--output", default="gen_data/all.jsonl", help="merged file (default: gen_data/all.jsonl)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--heldout", type=int, default=0, metavar="N",
                        help="move all sequences of N start tokens to heldout.jsonl beside the output")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out start tokens")
    parser.add_argument("--allow-mixed-settings", action="store_true",
                        help="merge shards generated with different sampling settings (refused by default)")
    return parser

def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    with user_errors("merge_gen_data.py"):
        if args.heldout < 0:
            raise ValueError(f"--heldout {args.heldout} must be 0 or more")
        files = find_shard_files(args.inputs, exclude=(output, heldout_file(output)))
        logger.info("Merging %d shard file(s) into %s", len(files), output)
        report = merge_shards(files, output, force=args.force, heldout=args.heldout, seed=args.seed,
                              allow_mixed_settings=args.allow_mixed_settings)
    print(report.summary())
    if len(report.settings) > 1:
        print(f"mixed sampling settings (--allow-mixed-settings): {'; '.join(report.settings)}")
    print(f"{output}: {report.train.describe()} (teacher {report.teacher})")
    if args.heldout:
        print(f"{heldout_file(output)}: {report.heldout.describe()}")
    if report.topk:
        print(f"teacher {describe_rows(report.topk, report.tail)} log-probs of every token: "
              f"{store_directory(output)} (train.py --teacher cached)")

if __name__ == "__main__":
    main()
