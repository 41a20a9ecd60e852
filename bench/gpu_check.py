"""The prepared GPU check: the memory planner against a measured FSDP2 step, the fake quantizers' step-time
overhead, the cost of the online rotation R4, and a QAT step on the GPU against the same step on CPU, printed as
one Markdown table for docs/BENCHMARKS.md.

    bash bench/gpu_check.sh                              # on the lent GPU (est. 3-5 minutes, at most 9.5)
    bash bench/gpu_check.sh --parts memory --layers 16   # a part again, e.g. with fewer layers
    python bench/gpu_check.py --device cpu --tiny        # the same parts on a 2-layer hidden-64 LLaMA (the test)

Parts (measured in bench/gpu_check_parts.py):
  (a) memory: a random LLaMA-7B-shaped W4A8KV4 student and its bf16 teacher, trained by KDTrainer under FSDP2
      (scripts/fsdp_config.json, one process), bf16 mixed precision, gradient checkpointing, batch 1 x 2048: peak
      memory against utils.training.memory_plan's plan. With as many of LLaMA-7B's 32 layers as the plan fits the card.
  (b) step time: the same run without fake quantizers (16-16-16), median step after warm-up, and the ratio.
  (c) R4: down_proj's online Hadamard rotation alone against down_proj's matmul, input [2048, 11008] bf16.
  (d) GPU vs CPU: one W4A8KV4 QAT step of the embedded SmolLM2-135M in float32 on both, relative differences.
Each part runs in its own process under its own time limit, so an out-of-memory error, a crash or a hang costs only
its own row ("failed: <reason>"). With $OUT set, the table (gpu_check.md), the raw results (gpu_check.json) and
each part's log (gpu_check-<part>.log) are written there after every part.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS_SCRIPT = REPO / "bench" / "gpu_check_parts.py"
GIB = 2**30
PART_TIME_LIMITS_S = {"memory": 210, "step_time": 150, "rotation": 60, "gpu_vs_cpu": 150}  # 570 s in all
STEP_TIME_GOAL = 1.15  # W4A8KV4 / 16-16-16
PLAN_TOLERANCE = 0.25  # the planner's claim against measurements (docs/BENCHMARKS.md)
# GPU against CPU, both float32 without TF32: the weights' fake quantization is elementwise and agrees to the bit,
# so the differences are summation order, and the activation and KV codes it flips.
GPU_VS_CPU_TOLERANCES = {"loss_relative": 1e-3, "logits_relative": 1e-2, "weights_relative": 0.1}
COLUMNS = ("check", "setting", "measured", "reference", "ratio", "verdict")


def run_part(part: str, settings: dict, time_limit_s: float, out: Path | None) -> dict:
    """The part's result from its own process, or {"error": reason} when it fails or overruns its limit."""
    command = [sys.executable, str(PARTS_SCRIPT), part, json.dumps(settings)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=time_limit_s)
        stdout, stderr = done.stdout, done.stderr
        result = result_line(stdout) if done.returncode == 0 else {
            "error": error_line(stderr) or f"exit status {done.returncode}"}
    except subprocess.TimeoutExpired as timeout:
        stdout, stderr = as_text(timeout.stdout), as_text(timeout.stderr)
        result = {"error": f"timed out after {time_limit_s:g} s (limit of this part)"}
    if out is not None:
        (out / f"gpu_check-{part}.log").write_text(stdout + stderr)
    return result


def result_line(stdout: str) -> dict:
    """The JSON object a part prints last (libraries may print before it)."""
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = None
    return result if isinstance(result, dict) else {"error": "the part printed no result line"}


def as_text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def error_line(stderr: str) -> str:
    """The exception a traceback ends with, else the last line written."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (exceptions or lines or [""])[-1][:300]


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def plan_verdict(planned: float, measured: float) -> str:
    error = planned / measured - 1
    side = "high (safe side)" if error >= 0 else "LOW: the plan underestimates"
    within = "within" if abs(error) <= PLAN_TOLERANCE else "outside"
    return f"plan {abs(error):.0%} {side}; {within} {PLAN_TOLERANCE:.0%}"


def training_setting(result: dict, settings: dict, bits: str) -> str:
    precision = "bf16 mixed precision" if settings["device"] == "cuda" else "fp32"
    sharding = "FSDP2, 1 process" if result["fsdp"] else "no FSDP"
    return (f"{result['model']} widths, {result['layers']} of {result['all_layers']} layers, {bits}, batch 1 x "
            f"{settings['seq_len']}, {precision}, gradient checkpointing, {sharding}")


def memory_rows(results: dict, settings: dict) -> list[tuple]:
    result = results["memory"]
    setting = training_setting(result, settings, "W4A8KV4")
    fits = result["plan_all_layers_total"] <= result["device_memory"]
    all_layers = (f"; all {result['all_layers']} layers: plan total {gib(result['plan_all_layers_total'])}, "
                  + ("fits" if fits else f"does not fit {gib(result['device_memory'])}"))
    in_flight = f" + FSDP units in flight {gib(result['plan_in_flight'])}" if result["plan_in_flight"] else ""
    planned = result["plan_subtotal"] + result["plan_in_flight"]
    check = "(a) peak memory allocated" if settings["device"] == "cuda" else "(a) peak RSS growth"
    rows = [(check, setting, gib(result["peak_allocated"]),
             f"plan {gib(planned)} (step{in_flight}, no margin){all_layers}",
             f"{planned / result['peak_allocated']:.2f}", plan_verdict(planned, result["peak_allocated"]))]
    if "device_in_use" in result:
        rows.append(("(a) device memory in use", setting,
                     f"{gib(result['device_in_use'])} (peak reserved {gib(result['peak_reserved'])} + CUDA context)",
                     f"plan total {gib(result['plan_total'])} (with margin) of {gib(result['device_memory'])}",
                     f"{result['plan_total'] / result['device_in_use']:.2f}",
                     plan_verdict(result["plan_total"], result["device_in_use"])))
    return rows


def step_time_rows(results: dict, settings: dict) -> list[tuple]:
    plain, quantized = results["step_time"], results.get("memory", {})
    setting = (training_setting(plain, settings, "16-16-16 vs W4A8KV4")
               + f", median of {len(plain['step_seconds'])} steps after {settings['warmup']} warm-up")
    plain_seconds = statistics.median(plain["step_seconds"])
    if "step_seconds" not in quantized:
        reason = quantized.get("error", "part (a) not run")
        return [("(b) step time, 16-16-16", setting, duration(plain_seconds), f"W4A8KV4: none ({reason})", "", "")]
    quantized_seconds = statistics.median(quantized["step_seconds"])
    ratio = quantized_seconds / plain_seconds
    goal = f"goal <= {STEP_TIME_GOAL}x: " + ("met" if ratio <= STEP_TIME_GOAL else "NOT met")
    return [("(b) step time, W4A8KV4", setting, duration(quantized_seconds), f"16-16-16: {duration(plain_seconds)}",
             f"{ratio:.2f}x", goal)]


def rotation_rows(results: dict, settings: dict) -> list[tuple]:
    result = results["rotation"]
    setting = (f"[{result['tokens']}, {result['width']}] bf16 input, forward, median of {result['repeats']}; R4 = "
               f"{result['factors']} (models.rotations.OnlineRotation)")
    ratio = result["rotation_seconds"] / result["matmul_seconds"]
    return [("(c) R4 online rotation", setting, duration(result["rotation_seconds"]),
             f"down_proj matmul ({result['width']} -> {result['hidden']}): {duration(result['matmul_seconds'])}",
             f"{ratio:.2f}x", "no goal set")]


def gpu_vs_cpu_rows(results: dict, settings: dict) -> list[tuple]:
    result = results["gpu_vs_cpu"]
    setting = (f"SmolLM2-135M (embedded), float32, W4A8KV4, one AdamW step at lr 2e-5, batch 1 x {result['tokens']}, "
               f"{settings['device']} vs cpu")
    checks = {"loss_relative": f"loss relative difference ({result['loss_device']:.4f} vs {result['loss_cpu']:.4f})",
              "logits_relative": "logits after the step, ‖device − cpu‖ / ‖cpu‖",
              "weights_relative": "weights after the step, ‖W_device − W_cpu‖ / ‖step‖"}
    return [(f"(d) {check}", "the same step" if index else setting, f"{result[key]:.2e}",
             f"tolerance {GPU_VS_CPU_TOLERANCES[key]:g}", "",
             "within tolerance" if result[key] <= GPU_VS_CPU_TOLERANCES[key] else "OUT OF TOLERANCE")
            for index, (key, check) in enumerate(checks.items())]


PARTS = {  # name: (its rows from the results, the first cell of its row when it fails)
    "memory": (memory_rows, "(a) peak memory"),
    "step_time": (step_time_rows, "(b) step time"),
    "rotation": (rotation_rows, "(c) R4 online rotation"),
    "gpu_vs_cpu": (gpu_vs_cpu_rows, "(d) GPU vs CPU step"),
}


def part_rows(part: str, results: dict, settings: dict) -> list[tuple]:
    make_rows, label = PARTS[part]
    error = results[part].get("error")
    if error is None:
        try:
            return make_rows(results, settings)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a result the rows cannot read
            error = f"unreadable result ({type(err).__name__}: {err})"
    return [(label, "", f"failed: {error}", "", "", "")]


def markdown_row(cells) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def report(results: dict, settings: dict, seconds: dict) -> str:
    devices = [result["device"] for result in results.values() if "device" in result]
    header = (f"GPU check (`bash bench/gpu_check.sh`), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{devices[0] if devices else settings['device'] + ' (no part reported its device)'}; torch "
              f"{version('torch')}, transformers {version('transformers')}, accelerate {version('accelerate')}")
    rows = [markdown_row(COLUMNS), markdown_row(["---"] * len(COLUMNS))]
    rows += [markdown_row(row) for part in results for row in part_rows(part, results, settings)]
    timing = ", ".join(f"{part} {seconds[part]:.0f} s" for part in results)
    return "\n".join([header, "", *rows, "", f"Wall time per part: {timing}; in all {sum(seconds.values()):.0f} s."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 LLaMA at sequence length 32 "
                                                            "(the CPU test); (d) still loads SmolLM2-135M")
    parser.add_argument("--layers", type=int, help="decoder layers of (a) and (b) (default: LLaMA-7B's 32, or as "
                                                   "many as the memory plan fits the device)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps, after the warm-up ones")
    parser.add_argument("--warmup", type=int, default=2, help="training steps before timing (AdamW state, kernels)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    settings = dict(device=args.device, tiny=args.tiny, layers=args.layers,
                    seq_len=args.seq_len or (32 if args.tiny else 2048), steps=args.steps, warmup=args.warmup)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    results, seconds = {}, {}
    for part in args.parts:
        print(f"[gpu_check] {part} (at most {PART_TIME_LIMITS_S[part]} s) ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        results[part] = run_part(part, settings, PART_TIME_LIMITS_S[part], out)
        seconds[part] = time.monotonic() - start
        print(f"[gpu_check] {part}: {results[part].get('error', 'done')} ({seconds[part]:.0f} s)", file=sys.stderr,
              flush=True)
        if out is not None:  # after every part, so that a session cut short keeps what was measured
            (out / "gpu_check.md").write_text(report(results, settings, seconds) + "\n")
            (out / "gpu_check.json").write_text(json.dumps({"settings": settings, "seconds": seconds,
                                                            "results": results}, indent=2))
    print(report(results, settings, seconds))


if __name__ == "__main__":
    main()
