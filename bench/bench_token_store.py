"""Memory of the training dataset per rank: Python lists (the dataset before utils/data/token_store.py) vs the
memory-mapped token store, on synthetic .jsonl files of random token ids (sequences of 2048 tokens).

    python bench/bench_token_store.py                          # 2M and 20M tokens, LLaMA's 32,000-token vocabulary
    python bench/bench_token_store.py --tokens 1000000 5000000 --vocab-size 128256

Each row runs in a fresh process: it opens the dataset and reads every item, and reports its resident memory
growth from /proc/self/status: private (RssAnon, what every rank pays for itself), mapped file pages (RssFile:
the page cache, one copy per machine shared by all ranks) and the peak (VmHWM). "store, building" builds the
store as the first rank does; "store, reusing" opens it as the other ranks do. The last column projects the
private growth linearly to --project tokens (the paper: 100k sequences x 2048 = 200M).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from utils.data.dataset import TokenSequenceDataset, read_token_sequences

KINDS = ("lists (before)", "store, building", "store, reusing")
MIB = 2**20


class ListDataset:
    """The dataset before the token store: every sequence read into Python lists, truncated by slicing."""

    def __init__(self, path, max_length, vocab_size):
        self.examples = [ids[:max_length] for ids in read_token_sequences(path, vocab_size=vocab_size)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return {"input_ids": self.examples[index]}


def memory() -> dict[str, int]:
    """Bytes of the fields of /proc/self/status that say where resident memory is."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def write_data(path: Path, tokens: int, seq_len: int, vocab_size: int):
    rng = np.random.default_rng(0)
    with path.open("w") as out:
        for _ in range(tokens // seq_len):
            out.write(json.dumps({"input_ids": rng.integers(0, vocab_size, seq_len).tolist()}) + "\n")


def measure(kind: str, path: str, args) -> dict:
    before = memory()
    started = time.perf_counter()
    if kind == KINDS[0]:
        dataset = ListDataset(path, args.max_length, args.vocab_size)
    else:
        dataset = TokenSequenceDataset(path, args.max_length, vocab_size=args.vocab_size)
        assert dataset.store.built == (kind == KINDS[1]), "the store was not in the state this row measures"
    opened = time.perf_counter()
    tokens = sum(len(dataset[index]["input_ids"]) for index in range(len(dataset)))
    after = memory()
    return {"kind": kind, "tokens": tokens, "open_s": opened - started, "read_s": time.perf_counter() - opened,
            "private": after["RssAnon"] - before["RssAnon"], "mapped": after["RssFile"] - before["RssFile"],
            "peak": after["VmHWM"] - before["VmRSS"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs=2, default=[2_000_000, 20_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--project", type=int, default=200_000_000)
    parser.add_argument("--only", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)  # one row, as a child
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(*args.only, args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            path = Path(tmp) / f"{tokens}.jsonl"
            print(f"[bench_token_store] writing {tokens:,} tokens ...", file=sys.stderr, flush=True)
            write_data(path, tokens, args.seq_len, args.vocab_size)
            for kind in KINDS:
                print(f"[bench_token_store] {kind}, {tokens:,} tokens ...", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", kind, str(path)],
                                     check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))

    print(f"\nvocabulary {args.vocab_size:,}; sequences of {args.seq_len} tokens, max length {args.max_length}; "
          f"memory growth in MiB for opening the dataset and reading every item once\n")
    print("| tokens | dataset | open s | read s | private (RssAnon) | mapped file (RssFile) | peak (VmHWM) | "
          f"private at {args.project / 1e6:,.0f}M tokens |\n|---:|---|---:|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        small, large = (row for row in rows if row["kind"] == kind)
        slope = (large["private"] - small["private"]) / (large["tokens"] - small["tokens"])
        projected = large["private"] + slope * (args.project - large["tokens"])
        for row, projection in ((small, ""), (large, f"{round(projected / MIB):,}")):
            print(f"| {row['tokens']:,} | {kind} | {row['open_s']:.1f} | {row['read_s']:.1f} | "
                  f"{round(row['private'] / MIB):,} | {round(row['mapped'] / MIB):,} | {round(row['peak'] / MIB):,} | "
                  f"{projection} |")


if __name__ == "__main__":
    main()
