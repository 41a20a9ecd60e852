"""KD from the teacher's cached top-K log-probs (train.py --teacher cached) against KD from the teacher itself, at
equal steps on the demo's data and budget: held-out perplexity, KL to the full teacher and top-1 agreement, and
the training time without the teacher's forward.

    python bench/bench_cached_teacher.py                    # embedded SmolLM2-135M, CPU: about 30 minutes
    python bench/bench_cached_teacher.py --ks 32 --seeds 0 1 --out bench_output/cached_teacher
    python bench/bench_cached_teacher.py --ks 32 --tail 16 --seeds 0 1   # and top-32 + 16 sampled tail tokens

Each setting runs `scripts/demo.sh` in its own folder, all on one synthesis that kept the teacher's top-max(K)
(`SAVE_TOPK`, in OUT/data): `make demo` for the full teacher, `TEACHER=cached TOPK=K make demo` for each K (the
first K of the saved, most likely first), and with `--tail S` (`SAVE_TAIL`) also `TEACHER=cached TAIL=S make demo`
for the largest K, its rest of the vocabulary sampled instead of one bucket. Every student trains on the same text
for the same steps and is evaluated
on the same held-out text; only its targets differ.
The memory the absent teacher saves is `scripts/plan_memory.py --teacher cached` (and bench/bench_memory.py).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_options import demo_results
from models.quantize import QATConfig

KS = (8, 32, 128)


def training_record(out: Path) -> dict:
    """The QAT run's own timing (trainer_state.json of the student the demo trained)."""
    (state_file,) = out.glob("qat-*/trainer_state.json")
    state = json.loads(state_file.read_text())
    summary = next(entry for entry in state["log_history"] if "train_runtime" in entry)
    return {"steps": state["global_step"], "seconds": summary["train_runtime"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="K of each cached run")
    parser.add_argument("--tail", type=int, default=0, metavar="S",
                        help="also keep S tail samples a token and train the largest K with them (default: none)")
    parser.add_argument("--bits", default="4-8-4", help="W-A-KV of the student (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (order of the batches); the data is the first seed's (default: 0)")
    parser.add_argument("--out", default="bench_output/cached_teacher", help="one demo folder per setting in it")
    args = parser.parse_args()
    config = QATConfig(*map(int, args.bits.split("-")))
    out = Path(args.out)
    data = {"DATA_DIR": str(out / "data"), "SAVE_TOPK": str(max(args.ks)), "SAVE_TAIL": str(args.tail or "")}
    settings = [("teacher model", "model", {})] + [
        (f"cached top-{k}", f"topk{k}", {"TEACHER": "cached", "TOPK": str(k), "TAIL": "0"}) for k in args.ks]
    if args.tail:
        settings.append((f"cached top-{max(args.ks)} + {args.tail} tail", f"topk{max(args.ks)}-tail{args.tail}",
                         {"TEACHER": "cached", "TOPK": str(max(args.ks)), "TAIL": str(args.tail)}))
    rows = []  # (name, seed, results, training)
    for seed in args.seeds:
        for name, folder, env in settings:
            folder = out / (folder if seed == args.seeds[0] else f"{folder}-seed{seed}")
            rows.append((name, seed, demo_results(config, folder, **data, **env, SEED=str(seed)),
                         training_record(folder)))

    fp = json.loads((out / "model" / "results" / "fp.json").read_text())["metrics"]["heldout_perplexity"]
    rtn = rows[0][2]["rtn"]["heldout_perplexity"]
    full_kl = {seed: results["qat"]["kl_to_teacher"] for name, seed, results, _ in rows if name == settings[0][0]}
    print(f"\nembedded SmolLM2-135M, W{config.w_bits}A{config.a_bits}KV{config.kv_bits}, demo data and budget; "
          f"FP held-out ppl {fp:.2f}, RTN {rtn:.2f}\n")
    print("| teacher | seed | held-out ppl | KL to teacher | KL vs full KD | top-1 (%) | log-ppl gap closed | steps | "
          "s / step |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for name, seed, results, training in rows:
        qat = results["qat"]
        closed = (math.log(rtn) - math.log(qat["heldout_perplexity"])) / (math.log(rtn) - math.log(fp))
        ratios.setdefault(name, []).append(qat["kl_to_teacher"] / full_kl[seed] - 1)
        print(f"| {name} | {seed} | {qat['heldout_perplexity']:.2f} | {qat['kl_to_teacher']:.4f} | "
              f"{100 * ratios[name][-1]:+.1f} % | {100 * qat['top1_agreement']:.1f} | {100 * closed:.1f} % | "
              f"{training['steps']} | {training['seconds'] / training['steps']:.2f} |")
    if len(args.seeds) > 1:
        print("\nKL vs full KD, mean over the seeds: " + ", ".join(
            f"{name} {100 * sum(values) / len(values):+.1f} %" for name, values in list(ratios.items())[1:]))


if __name__ == "__main__":
    main()
