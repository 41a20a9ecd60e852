"""The quality levers beyond the paper, each alone, on the demo's data and budget: held-out perplexity, KL to the
teacher and the share of the RTN -> FP gap (in log-perplexity) that QAT closes, against the paper's QAT.

    python bench/bench_levers.py                                    # W4A8KV4, embedded SmolLM2-135M, CPU
    python bench/bench_levers.py --bits 4-8-4 4-16-16 4-4-4k+hadamard --range-lrs 1e-3 3e-3 --out bench_output/levers
    python bench/bench_levers.py --bits 4-16-16 --levers deploy gptq gptq+learned   # needs make baselines

Levers (`--levers`): `learned`, learned weight ranges (`--learn_ranges weights`) at each `--range-lrs` learning rate
of their clipping factors; `deploy`, the deploy recipe's grid (what a GPTQ start needs, so its own row); `gptq`, QAT
from a GPTQ model made on the same data (`INIT=gptq`, deploy recipe), whose own row (GPTQ, no training) is printed
too; `gptq+learned`, both, the clipping starting at GPTQ's scales, at the first `--range-lrs`. Every setting runs
`scripts/demo.sh` in its own folder on one synthesis (OUT/data): the same text, the same steps, the same held-out
sequences; only the lever differs.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_options import demo_results
from models.quantize import QATConfig


LEVERS = ("learned", "deploy", "gptq", "gptq+learned")
DEMO_LEARNING_RATE = "1e-4"  # scripts/demo.sh's LEARNING_RATE


def student(label: str, **options) -> QATConfig:
    """The config of a label as tables write it: W-A-KV, a `k` for keys after RoPE, `+hadamard` / `+random`; with
    further QATConfig `options` (a recipe, learned ranges)."""
    bits, *rotation = label.split("+")
    post_rope = bits.endswith("k")
    return QATConfig(*map(int, bits.removesuffix("k").split("-")),
                     kv_placement="post_rope" if post_rope else "pre_rope", rotate=rotation[0] if rotation else "none",
                     **options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", nargs="+", default=["4-8-4"],
                        help="each student as tables label it, e.g. 4-16-16 or 4-4-4k+hadamard (default: %(default)s)")
    parser.add_argument("--range-lrs", nargs="+", default=["1e-3"],
                        help="learning rates of the learned clipping factors (default: %(default)s)")
    parser.add_argument("--levers", nargs="+", default=["learned"], choices=LEVERS,
                        help="the levers, each beside the paper's QAT (default: %(default)s)")
    parser.add_argument("--learning-rate", default=DEMO_LEARNING_RATE,
                        help="QAT learning rate of every setting (default: the demo's, %(default)s)")
    parser.add_argument("--out", default="bench_output/levers", help="one demo folder per setting in it")
    parser.add_argument("--data", help="the demo data to train on, e.g. another bench's (default: OUT/data, made once)")
    args = parser.parse_args()
    out = Path(args.out)
    data = {"DATA_DIR": args.data or str(out / "data"), "LEARNING_RATE": args.learning_rate}
    if args.learning_rate != DEMO_LEARNING_RATE:  # each rate its own folders: a demo reuses a trained student
        out = out / f"lr{args.learning_rate}"
    rows = []  # (bits, lever, QAT metrics, FP ppl, RTN ppl)
    for bits in args.bits:
        config = student(bits)
        if config.label() != bits:
            raise SystemExit(f"--bits {bits}: write it as its label, {config.label()}")
        paper = demo_results(config, out / f"{bits}-paper", **data)
        fp = json.loads((out / f"{bits}-paper" / "results" / "fp.json").read_text())["metrics"]["heldout_perplexity"]
        settings = [("paper (MinMax)", paper["qat"])]
        deploy, learned = student(bits, recipe="deploy"), student(bits, learn_ranges="weights")
        if "learned" in args.levers:
            for rate in args.range_lrs:
                results = demo_results(learned, out / f"{bits}-learned-weights-rlr{rate}", **data, RANGE_LR=rate)
                settings.append((f"learned weight ranges, lr {rate}", results["qat"]))
        if "deploy" in args.levers:
            settings.append(("deploy grid", demo_results(deploy, out / f"{bits}-deploy", **data)["qat"]))
        if "gptq" in args.levers:
            results = demo_results(deploy, out / f"{bits}-deploy-initgptq", **data, INIT="gptq")
            settings += [("GPTQ (no training)", results["gptq"]), ("deploy grid, GPTQ start", results["qat"])]
        if "gptq+learned" in args.levers:
            rate = args.range_lrs[0]
            results = demo_results(student(bits, recipe="deploy", learn_ranges="weights"),
                                   out / f"{bits}-deploy-learned-weights-rlr{rate}-initgptq", **data, INIT="gptq",
                                   RANGE_LR=rate)
            settings.append((f"deploy grid, GPTQ start, learned ranges lr {rate}", results["qat"]))
        rows += [(bits, lever, qat, fp, paper["rtn"]["heldout_perplexity"]) for lever, qat in settings]

    print(f"\nembedded SmolLM2-135M, demo data and budget (scripts/demo.sh), QAT lr {args.learning_rate}\n")
    print("| W-A-KV | lever | held-out ppl | KL to teacher | top-1 (%) | log-ppl gap closed | FP | RTN |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for bits, lever, qat, fp, rtn in rows:
        closed = (math.log(rtn) - math.log(qat["heldout_perplexity"])) / (math.log(rtn) - math.log(fp))
        print(f"| {bits} | {lever} | {qat['heldout_perplexity']:.2f} | {qat['kl_to_teacher']:.4f} | "
              f"{100 * qat['top1_agreement']:.1f} | {100 * closed:.1f} % | {fp:.2f} | {rtn:.2f} |")


if __name__ == "__main__":
    main()
