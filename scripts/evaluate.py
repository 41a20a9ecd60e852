"""Evaluate a model as the paper does and write one JSON result file for `scripts/compare.py`.

    python scripts/evaluate.py output/qat                      # a QAT checkpoint (loads quantized)
    python scripts/evaluate.py default 4 8 4                   # RTN baseline: embedded default, W4A8KV4, no training
    python scripts/evaluate.py default --tasks none --heldout gen_data/heldout.jsonl   # offline metrics only
    python scripts/evaluate.py baselines/gptq-w4 4 8 4 --teacher default   # a GPTQ model (scripts/baseline.py)

Method: `qat` for a saved QAT checkpoint, `rtn` for a full-precision model quantized here with W A KV bits
(round-to-nearest, the paper's training-free baseline), `gptq` / `smoothquant` for a model written by
scripts/baseline.py, evaluated at W A KV with its own weights (utils/evaluation/baselines.py), `fp` otherwise.
Always measured: perplexity on `--text-file` (default: a built-in paragraph); with `--heldout`, KL to the teacher
and top-1 agreement; with tasks, the lm-eval harness (zero-shot).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig

from models.checkpoint import saved_settings
from models.quantize import CONFIG_KEY, KV_PLACEMENTS, RECIPES, QATConfig, quantize_model
from models.quantizers import FULL_PRECISION
from models.rotations import ROTATIONS
from models.schemes import KV_SCHEMES, SCHEMES
from utils.data.records import TeacherIdentity, model_display_name
from utils.evaluation.baselines import applied_quantization, saved_baseline
from utils.evaluation.harness import DEFAULT_TASKS, flatten_results, log_quantization, run_harness
from utils.evaluation.metrics import perplexity, teacher_fidelity, token_sequences
from utils.safety import check_output_file, check_positions, user_errors
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

logger = logging.getLogger("evaluate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LENGTH = 2048  # the paper's sequence length


def positive(kind):
    """An argparse type: a number of `kind` above 0 (argparse names the flag in its error)."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="default",
                        help="QAT checkpoint, model directory or hub name; 'default' = the embedded SmolLM2-135M")
    parser.add_argument("bits", nargs="*", type=int, metavar="W A KV",
                        help="RTN baseline: quantize a full-precision model at these bits without training")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated lm-eval tasks, or 'none' for the offline metrics only "
                             "(default: the paper's eight zero-shot tasks and wikitext)")
    parser.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. tests/data)")
    parser.add_argument("--limit", type=positive(float), help="evaluate at most this many examples per task, or this "
                                                               "fraction of each task if below 1 (quick checks)")
    parser.add_argument("--batch-size", type=positive(int), default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--text-file", help="text or .jsonl file for perplexity (default: a built-in paragraph)")
    parser.add_argument("--heldout", help=".jsonl of held-out generated sequences: KL to teacher, top-1 agreement")
    parser.add_argument("--teacher", help="full-precision teacher for --heldout (default: the model itself "
                                          "unquantized; required for a QAT checkpoint)")
    parser.add_argument("--max-length", type=positive(int),
                        help=f"tokens per sequence for the offline metrics (default: {DEFAULT_MAX_LENGTH}, or the "
                             "model's positions if fewer)")
    parser.add_argument("--w-group-size", type=positive(int), help="RTN: one weight scale per group of this many "
                        "input columns (default: per output channel)")
    parser.add_argument("--kv-placement", choices=KV_PLACEMENTS, help="RTN: where keys are quantized (default: "
                        "pre_rope, the released code's; post_rope: after rotary embedding, as the KV cache holds them)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), help="RTN: the quantizer recipe (default: paper; "
                        "deploy: the full grid compressed-tensors runs; vllm: vLLM's CPU kernels' arithmetic; README 'Recipes')")
    parser.add_argument("--rotate", choices=ROTATIONS, help="RTN: rotate the float model before quantizing (default: "
                        "none, the paper's; hadamard / random: README 'Rotations')")
    parser.add_argument("--rotate-seed", type=int, help="RTN: seed of --rotate (default 0)")
    parser.add_argument("--scheme", choices=tuple(SCHEMES), help="RTN: floating-point weights and activations, a "
                        "compressed-tensors preset (instead of W and A: give 16 16 KV or no bits)")
    parser.add_argument("--kv-scheme", choices=tuple(KV_SCHEMES), help="RTN: floating-point KV cache (instead of KV)")
    parser.add_argument("--output", help="result JSON file (default: results/<model>-<method>-<bits>.json)")
    args = parser.parse_args(argv)
    if len(args.bits) not in (0, 3):
        parser.error(f"give all three bit-widths W A KV (e.g. 4 8 4) or none, not {len(args.bits)}")
    for flag, path in (("--text-file", args.text_file), ("--heldout", args.heldout)):
        if path and not Path(path).is_file():
            parser.error(f"{flag} {path} does not exist; pass an existing file")
    if args.include_path and not Path(args.include_path).is_dir():
        parser.error(f"--include-path {args.include_path} is not a directory; pass the folder of the task YAMLs")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def rtn_options(args) -> dict:
    return {"w_group_size": args.w_group_size, "kv_placement": args.kv_placement, "recipe": args.recipe,
            "rotate": args.rotate, "rotate_seed": args.rotate_seed, "scheme": args.scheme, "kv_scheme": args.kv_scheme}


def recorded_bits(config: QATConfig) -> dict:
    """The result's W / A / KV widths, a floating-point format's own (NVFP4: 4 / 4), and the formats' names."""
    def width(spec, bits):
        return spec.num_bits if spec else bits

    bits = {"w": width(config.weight_spec, config.w_bits), "kv": width(config.kv_spec, config.kv_bits),
            "a": width(config.input_spec, FULL_PRECISION if config.scheme else config.a_bits)}
    return bits | {name: getattr(config, name) for name in ("scheme", "kv_scheme") if getattr(config, name)}


def evaluated_method(args, saved: QATConfig | None, baseline: dict | None = None) -> tuple[str, QATConfig]:
    """What is evaluated, decided from the command line and the checkpoint's config alone (before any load):
    `qat` for a saved student, the baseline's name for a scripts/baseline.py model, `rtn` for a float model with
    W A KV, `fp` otherwise. The bits returned are the row's W-A-KV (for a baseline, `applied_quantization` says
    which quantizers that adds)."""
    if saved is not None:
        if args.bits or any(value is not None for value in rtn_options(args).values()):
            raise ValueError(f"{args.model} is already a QAT checkpoint ({saved.label()}); omit W A KV, "
                             "--w-group-size, --kv-placement, --recipe, --rotate(-seed) and --(kv-)scheme, which are "
                             "for the RTN baseline of a full-precision model")
        if args.heldout and not args.teacher:
            raise ValueError("--heldout on a QAT checkpoint needs --teacher MODEL, the full-precision model it was "
                             "trained from ('default' for the embedded SmolLM2-135M)")
        return "qat", saved
    options = {name: value for name, value in rtn_options(args).items() if value is not None}
    bits = QATConfig(*args.bits, **options) if args.bits else QATConfig(**options)
    if baseline is not None:
        if not args.bits:
            raise ValueError(f"{args.model} is a {baseline['method']} model; give the W A KV bits to evaluate it at")
        if args.heldout and not args.teacher:
            raise ValueError(f"--heldout on a {baseline['method']} model needs --teacher MODEL, the full-precision "
                             "model it was made from ('default' for the embedded SmolLM2-135M)")
        applied_quantization(baseline, bits)  # refuses bits the baseline's weights do not fit
        return baseline["method"], bits
    return ("fp" if bits.label() == QATConfig().label() else "rtn"), bits


def offline_max_length(requested: int | None, config) -> int:
    """--max-length, refused past the model's positions (read from its config, before any weights); by default
    DEFAULT_MAX_LENGTH, or the model's positions if fewer."""
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
    check_positions(requested, "--max-length", config)
    return requested


def default_output(args, method, bits: QATConfig) -> Path:
    name = Path(model_display_name(args.model).rstrip("/")).name
    return Path("results") / f"{name}-{method}-{bits.label()}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with user_errors("evaluate.py"):
        return evaluate(args)


def evaluate(args) -> dict:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    tasks = [] if tasks == ["none"] else tasks

    # Everything that can fail on bad input happens before the (long) evaluation, the output path first.
    path = resolve_model_path(args.model)
    local = Path(path).is_dir()
    baseline = saved_baseline(path) if local else None
    method, bits = evaluated_method(args, saved_settings(path) if local else None, baseline)
    output = check_output_file(args.output or default_output(args, method, bits))
    tokenizer = load_tokenizer(path)
    max_length = offline_max_length(args.max_length, AutoConfig.from_pretrained(path))
    model = load_model(path, dtype=dtype, device=args.device)
    if method != "qat" and getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"{args.model} is a QAT checkpoint from the hub; download it to a directory and pass that")
    if method == "rtn":
        quantize_model(model, bits)
    elif baseline is not None:
        quantize_model(model, applied_quantization(baseline, bits))
    vocab_size = model.config.vocab_size
    text = token_sequences(tokenizer, args.text_file, max_length, vocab_size=vocab_size)
    heldout, teacher = None, None
    if args.heldout:  # generated by another teacher, its token ids would mean other words: refused
        expected = TeacherIdentity.of(model_display_name(args.model), tokenizer, vocab_size)
        heldout = token_sequences(tokenizer, args.heldout, max_length, teacher=expected, vocab_size=vocab_size)
        teacher = load_model(args.teacher or path, dtype=dtype, device=args.device, quantized=False)
    logger.info("Evaluating %s as %s %s (%s on %s)", args.model, method.upper(), bits.label(), dtype, args.device)

    metrics = {}
    if tasks:  # the harness logs the quantized modules before it starts
        metrics.update(flatten_results(run_harness(model, tokenizer, tasks, args.include_path, args.limit,
                                                   args.batch_size)))
    else:
        log_quantization(model)
    metrics["perplexity"] = perplexity(model, text, args.batch_size, tokenizer.pad_token_id)
    logger.info("Perplexity on %s: %.3f", args.text_file or "the built-in paragraph", metrics["perplexity"])
    if heldout:
        metrics.update(teacher_fidelity(model, teacher, heldout, args.batch_size, tokenizer.pad_token_id))
        logger.info("Held-out: KL to teacher %.4f nats/token, top-1 agreement %.2f%%", metrics["kl_to_teacher"],
                    100 * metrics["top1_agreement"])

    record = {
        "method": method,
        "bits": recorded_bits(bits),
        "label": bits.label(),  # the bits with the options that change the model, e.g. 4g128-8-4k
        "quantization": asdict(applied_quantization(baseline, bits) if baseline else bits),
        **({"baseline": baseline} if baseline else {}),
        # the table's group: the full-precision model a QAT or baseline model came from
        "model": model_display_name(args.teacher if method not in ("fp", "rtn") and args.teacher else args.model),
        "checkpoint": model_display_name(args.model),
        "metrics": metrics,
        "settings": {"tasks": tasks, "include_path": args.include_path, "limit": args.limit,
                     "batch_size": args.batch_size, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                     "text_file": args.text_file, "heldout": args.heldout, "teacher": args.teacher},
    }
    output.write_text(json.dumps(record, indent=2) + "\n")
    for name, value in metrics.items():
        print(f"{name:40s} {value:.4f}")
    logger.info("Wrote %s", output)
    return record


if __name__ == "__main__":
    main()
