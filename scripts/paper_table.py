"""The paper's results as one command: for every W-A-KV row, FP, RTN, GPTQ, SmoothQuant and LLM-QAT with the same
metrics (the paper's Table 1), then table.md / table.csv / table.png; optional ablations of the training data and the
loss (its Tables 3 and 4). `scripts/paper_table.sh` (and `make table`) is the usual way in; every option is also a
variable there.

    python scripts/paper_table.py                                   # the eight rows on the embedded SmolLM2-135M
    python scripts/paper_table.py --rows 4-8-4 8-8-8 --ablations data loss

Each cell is one run of the repo's own command lines (generate_data.py, merge_gen_data.py, scripts/evaluate.py,
scripts/run_train.sh, and scripts/baseline.py in the llm-compressor environment), logged to OUT/logs. A cell's
result is kept under a name made from every setting it depends on and from the code it runs (utils/report/cells.py),
so an interrupted table resumes where it stopped, a second call only prints, a changed setting recomputes only the
cells it touches, and a change to the code (models/, utils/, scripts/, the entry points) recomputes them all. A
failing cell is reported in the table ("failed", with its log), not fatal; GPTQ and SmoothQuant say "not installed"
without the extra (`make baselines`). The methods are a registry (utils/report/methods.py), the layout is
utils/report/table.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch

from models.quantize import QATConfig
from models.rotations import ROTATIONS
from utils.data.records import model_display_name, plain_sequence_line
from utils.evaluation.harness import tasks_loadable
from utils.evaluation.metrics import token_sequences
from utils.evaluation.tasks import PAPER_TASKS
from utils.report.cells import Cell, CellRunner, read_result, settings_key
from utils.report.methods import DEFAULT_ROWS, METHODS, NOT_APPLICABLE, row_bits
from utils.report.table import PENDING, task_names, write_ablation, write_grid
from utils.safety import atomic_file, ensure_writable_dir, user_errors
from utils.training.loading import load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASKS = ("commonsense_mini", REPO / "tests" / "data")  # the offline stand-in when the hub is unreachable
SEQUENCES_PER_START = 3  # the hybrid data's greedy prefixes 3, 4, 5: the other data modes make as many sequences
ABLATIONS = ("data", "loss")
NOT_INSTALLED = "not installed"


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="teacher: a LLaMA-family directory or hub name "
                                                            "('default' = the embedded SmolLM2-135M)")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="W-A-KV rows (default: the paper's eight)")
    parser.add_argument("--out", default="table_output", help="folder of the table, its cells, models and logs")
    parser.add_argument("--num-start-tokens", type=int, default=None if gpu else 96,
                        help="start tokens of the hybrid data, 3 sequences each (default: 96 on CPU; every "
                             "vocabulary token on a GPU, the paper's)")
    parser.add_argument("--heldout-start-tokens", type=int, default=8 if not gpu else 64,
                        help="start tokens whose sequences are kept out of training, for evaluation")
    parser.add_argument("--seq-len", type=int, default=2048 if gpu else 128, help="tokens per sequence")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", default="3e-4",
                        help="QAT learning rate on CPU (the GPU path keeps the paper's 2e-5: scripts/run_train.sh)")
    parser.add_argument("--batch-size", type=int, default=4, help="QAT batch size on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="auto", help="comma-separated lm-eval tasks, 'none', or 'auto': the "
                        "paper's eight when the harness can load them, else the local task (tests/data)")
    parser.add_argument("--text-file", help="real text for perplexity (default: evaluate.py's built-in paragraph)")
    parser.add_argument("--baseline-python", default=str(REPO / ".venv-baselines" / "bin" / "python"),
                        help="python of the llm-compressor environment (make baselines)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="GPTQ / SmoothQuant calibration "
                                                                              "sequences (generated data)")
    parser.add_argument("--smoothing-strength", type=float, default=0.5, help="SmoothQuant's alpha")
    parser.add_argument("--rotate", default="none", choices=ROTATIONS,
                        help="also RTN and LLM-QAT after this rotation (QuaRot / SpinQuant, README 'Rotations'), as "
                             "two more methods; rows with KV below 16 bits then quantize keys after RoPE, as rotation "
                             "needs")
    parser.add_argument("--ablations", nargs="*", default=[], choices=ABLATIONS,
                        help="data: greedy / sampled (/ real text) vs hybrid; loss: next-token labels vs KD")
    parser.add_argument("--ablation-bits", default="4-8-4", help="the W-A-KV of the ablation table")
    parser.add_argument("--real-text", help="data ablation: also train on this text file (real data)")
    parser.add_argument("--python", default=sys.executable, help="python of the main environment")
    args = parser.parse_args(argv)
    args.rows = list(dict.fromkeys(args.rows))
    return args


def check_args(args) -> None:
    """Everything a user can get wrong, before any long work starts (one line each)."""
    for row in [*args.rows, args.ablation_bits]:
        QATConfig(*row_bits(row))  # bits outside the quantizers' range are refused here
    for flag, value in (("--num-start-tokens", args.num_start_tokens), ("--seq-len", args.seq_len),
                        ("--batch-size", args.batch_size), ("--calibration-samples", args.calibration_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.heldout_start_tokens < 1:
        raise ValueError(f"--heldout-start-tokens {args.heldout_start_tokens} must be at least 1: the table's "
                         "held-out metrics need held-out sequences")
    if args.num_start_tokens is not None and args.heldout_start_tokens >= args.num_start_tokens:
        raise ValueError(f"--heldout-start-tokens {args.heldout_start_tokens} leaves no training data of "
                         f"{args.num_start_tokens} start tokens; lower it")
    if not 0 < args.epochs < math.inf:
        raise ValueError(f"--epochs {args.epochs:g} (EPOCHS in paper_table.sh) trains nothing; pass a positive number "
                         "of epochs (default 1)")
    try:
        learning_rate = float(args.learning_rate)
    except ValueError:
        learning_rate = math.nan
    if not 0 < learning_rate < math.inf:
        raise ValueError(f"--learning-rate {args.learning_rate!r} (LEARNING_RATE in paper_table.sh) is not a positive "
                         "number; pass one such as 3e-4")
    for flag, path in (("--text-file", args.text_file), ("--real-text", args.real_text)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist; pass an existing text file")
    if args.real_text and "data" not in args.ablations:
        raise ValueError("--real-text is a data ablation; add --ablations data")
    resolve_model_path(args.model)  # a bad model path fails now, not after the data synthesis
    ensure_writable_dir(args.out, "--out")


def kv_placement(bits: str, rotate: str) -> str:
    """The paper's pre-RoPE keys, except where rotation quantizes keys: after RoPE, in the rotated basis (R3)."""
    return "post_rope" if rotate != "none" and row_bits(bits)[2] < 16 else "pre_rope"


def qat_name(bits: str, loss: str, rotate: str) -> str:
    """`qat-4-8-4`, with the loss and rotation where they are not the paper's (`qat-4-8-4-ce`, `qat-4-8-4-hadamard`)."""
    return f"qat-{bits}{'-' + loss if loss != 'kd' else ''}{'-' + rotate if rotate != 'none' else ''}"


class Tasks(NamedTuple):
    """The lm-eval tasks of every evaluation cell, and why these."""

    names: list[str]
    include_path: str | None
    why: str

    def flags(self) -> list[str]:
        return ["--tasks", ",".join(self.names) or "none"] + (["--include-path", self.include_path]
                                                              if self.include_path else [])


def choose_tasks(args) -> Tasks:
    """The paper's eight tasks if the harness can load them, else the local task; remembered in OUT/tasks.json."""
    if args.tasks != "auto":
        return Tasks([] if args.tasks == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()], None,
                     "chosen with --tasks")
    remembered = Path(args.out) / "tasks.json"
    saved = read_result(remembered)
    if saved:
        return Tasks(saved["tasks"], saved["include_path"], saved["why"])
    print("[table] checking whether the lm-eval harness can load the paper's eight tasks ...", flush=True)
    if tasks_loadable(list(PAPER_TASKS)):
        choice = Tasks(list(PAPER_TASKS), None, "the paper's eight zero-shot tasks")
    else:
        task, folder = LOCAL_TASKS
        choice = Tasks([task], str(folder), "the paper's tasks could not be loaded (no network and no local copy); "
                                            f"the local task {task} ({folder}) stands in")
    remembered.write_text(json.dumps({"tasks": choice.names, "include_path": choice.include_path,
                                      "why": choice.why}) + "\n")
    return choice


class PaperTable:
    """The cells of one table as values (`Cell`) made from the flags: the training data of each mode, the GPTQ,
    SmoothQuant and QAT models, and the evaluations; each computed at most once, through `runner` (cached). The
    methods of utils/report/methods.py make their cells from these."""

    def __init__(self, args, tasks: Tasks):
        self.args, self.tasks = args, tasks
        self.out = Path(args.out)
        for folder in ("cells", "models", "data", "logs"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        self.runner = CellRunner(self.out)
        self.teacher, self.rotate = args.model, args.rotate
        self.teacher_name = model_display_name(args.model)
        self.gpu = torch.cuda.is_available()
        # Every evaluation's held-out sequences: those of the hybrid data, wherever its key puts it.
        self.heldout = self.data_cell("hybrid").output.with_name("heldout.jsonl")

    # -- the cells ---------------------------------------------------------------------------------------------
    def data_cell(self, mode: str) -> Cell:
        """The training data of one mode (hybrid, greedy, sampled, real): OUT/data/MODE-KEY/all.jsonl."""
        args = self.args
        n = args.num_start_tokens
        settings = dict(mode=mode, model=self.teacher_name, n=n, heldout=args.heldout_start_tokens, len=args.seq_len,
                        seed=args.seed)
        if mode == "real":
            settings.update(text=str(Path(args.real_text).resolve()), size=Path(args.real_text).stat().st_size)
        key = settings_key(**settings)
        folder = self.out / "data" / f"{mode}-{key}"
        if mode == "real":
            return Cell(f"data-{mode}", "data", settings, key, folder / "all.jsonl", make=self.write_real_text)
        starts = ["--num-start-tokens", str(n if mode == "hybrid" else SEQUENCES_PER_START * n)] if n else []
        greedy = {"hybrid": [], "greedy": ["--greedy-lengths", str(args.seq_len)], "sampled": ["--greedy-lengths", "1"]}
        heldout = args.heldout_start_tokens * (1 if mode == "hybrid" else SEQUENCES_PER_START)
        model = [] if self.teacher_name == model_display_name(None) else ["--model", args.model]
        launcher = ([args.python, "-m", "torch.distributed.run", "--nproc-per-node", str(torch.cuda.device_count())]
                    if self.gpu else [args.python])
        generate = [*launcher, "generate_data.py", *model, "--output-dir", str(folder), *starts, *greedy[mode],
                    "--max-length", str(args.seq_len), "--seed", str(args.seed)]
        merge = [args.python, "merge_gen_data.py", str(folder), "--output", str(folder / "all.jsonl"), "--heldout",
                 str(heldout), "--seed", str(args.seed), "--force"]
        # generate_data.py resumes an interrupted shard; the merge is what marks the data complete.
        return Cell(f"data-{mode}", "data", settings, key, folder / "all.jsonl",
                    ((f"data-{mode}-generate", generate), (f"data-{mode}-merge", merge)))

    def evaluation_cell(self, name: str, model, bits: str | None = None, options: tuple = ()) -> Cell:
        """scripts/evaluate.py on `model` (at `bits` with its RTN `options`): OUT/cells/NAME-KEY.json."""
        args = self.args
        settings = dict(tasks=self.tasks.names, include_path=self.tasks.include_path, text=args.text_file,
                        len=args.seq_len, heldout=str(self.heldout), teacher=self.teacher_name, model=str(model),
                        bits=bits, **({"options": options} if options else {}))
        key = settings_key(**settings)
        output = self.out / "cells" / f"{name}-{key}.json"
        command = [args.python, "scripts/evaluate.py", str(model), *(bits.split("-") if bits else []),
                   *self.tasks.flags(), "--heldout", str(self.heldout), "--teacher", args.model,
                   "--max-length", str(args.seq_len), "--output", str(output), *options]
        command += ["--text-file", args.text_file] if args.text_file else []
        return Cell(f"{name}-{key}", "evaluation", settings, key, output, ((f"{name}-{key}", command),))

    def baseline_cell(self, method: str, w_bits: int | None = None, w_group_size: int | None = None,
                      a_bits: int = 16) -> Cell:
        """scripts/baseline.py in the llm-compressor environment: OUT/models/NAME-KEY/ (GPTQ: with groups of
        `w_group_size` columns, and its compressed export describing `a_bits` activations)."""
        args, data = self.args, self.data_cell("hybrid").output
        settings = dict(method=method, model=self.teacher_name, data=str(data.parent), samples=args.calibration_samples,
                        len=args.seq_len, seed=args.seed)
        settings.update({"w_bits": w_bits} if method == "gptq" else {"alpha": args.smoothing_strength})
        settings.update({"w_group_size": w_group_size} if w_group_size else {})
        settings.update({"a_bits": a_bits} if a_bits != 16 else {})
        key = settings_key(**settings)
        options = f"{f'-w{w_bits}' if w_bits else ''}{f'g{w_group_size}' if w_group_size else ''}" \
                  f"{f'a{a_bits}' if a_bits != 16 else ''}"
        name = f"{method}{options}-{key}"
        folder = self.out / "models" / name
        command = [args.baseline_python, "scripts/baseline.py", method, "--model", args.model,
                   "--calibration", str(data), "--num-samples", str(args.calibration_samples),
                   "--max-length", str(args.seq_len), "--seed", str(args.seed), "--output", str(folder)]
        command += (["--w-bits", str(w_bits)] if method == "gptq"
                    else ["--smoothing-strength", str(args.smoothing_strength)])
        command += ["--w-group-size", str(w_group_size)] if w_group_size else []
        command += ["--a-bits", str(a_bits)] if a_bits != 16 else []
        return Cell(name, "baselines", settings, key, folder / "config.json", ((name, command),))

    def qat_cell(self, bits: str, data: Path, loss: str, rotate: str, recipe: str = "paper",
                 w_group_size: int | None = None) -> Cell:
        """scripts/run_train.sh W A KV on the data folder `data` (with the quantizer `recipe`, and groups of
        `w_group_size` weight columns): OUT/models/NAME-KEY/."""
        args = self.args
        settings = dict(bits=bits, model=self.teacher_name, data=str(data), len=args.seq_len, lr=args.learning_rate,
                        epochs=args.epochs, batch=args.batch_size, seed=args.seed, loss=loss, gpu=self.gpu)
        settings.update({"rotate": rotate} if rotate != "none" else {})
        settings.update({"recipe": recipe} if recipe != "paper" else {})
        settings.update({"w_group_size": w_group_size} if w_group_size else {})
        key = settings_key(**settings)
        options = "".join(f"-{part}" for part in (f"g{w_group_size}" if w_group_size else "",
                                                   recipe if recipe != "paper" else "") if part)
        name = f"{qat_name(bits, loss, rotate)}{options}-{key}"
        folder = self.out / "models" / name
        env = {"MODEL": "" if self.teacher_name == model_display_name(None) else args.model,
               "DATA": str(data / "all.jsonl"), "OUTPUT_DIR": str(folder), "PYTHON": args.python,
               "CPU_MAX_LENGTH": str(args.seq_len), "CPU_BATCH_SIZE": str(args.batch_size),
               "CPU_LEARNING_RATE": args.learning_rate, "CPU_EPOCHS": str(args.epochs),
               # run_train.sh's quantizer options, set here so that none leaks in from the user's environment
               "W_GROUP_SIZE": str(w_group_size or ""), "RECIPE": recipe, "ROTATE": rotate,
               "KV_PLACEMENT": kv_placement(bits, rotate), "SCHEME": "", "KV_SCHEME": ""}
        command = ["bash", "scripts/run_train.sh", *bits.split("-"), "--save_strategy", "no", "--seed", str(args.seed),
                   "--loss", loss]
        return Cell(name, "QAT training", settings, key, folder / "config.json", ((name, command),), env)

    # -- what the methods ask for --------------------------------------------------------------------------------
    def data(self, mode: str) -> Path | str:
        """The folder of one mode's training data, or why there is none."""
        made = self.runner.result(self.data_cell(mode))
        return made.parent if isinstance(made, Path) else made

    def evaluation(self, name: str, model, bits: str | None = None, options: tuple = ()) -> dict | str:
        """The evaluate.py result of `model`, or why there is none."""
        result = self.runner.result(self.evaluation_cell(name, model, bits, options))
        return read_result(result) if isinstance(result, Path) else result

    def baseline(self, method: str, row: str) -> dict | str:
        """The GPTQ (made once per weight width) or SmoothQuant (once) model, evaluated at `row`."""
        cell = self.baseline_cell(method, row_bits(row)[0] if method == "gptq" else None)
        if not cell.done() and not self.baselines_installed:
            return NOT_INSTALLED
        model = self.runner.result(cell)
        return self.evaluation(f"{method}-{row}", model.parent, row) if isinstance(model, Path) else model

    def qat(self, row: str, data: str = "hybrid", loss: str = "kd", rotate: str = "none") -> dict | str:
        """The QAT model trained at `row` on one mode's data, evaluated."""
        folder = self.data(data)
        if not isinstance(folder, Path):
            return folder
        model = self.runner.result(self.qat_cell(row, folder, loss, rotate))
        return self.evaluation(qat_name(row, loss, rotate), model.parent) if isinstance(model, Path) else model

    def rotation_flags(self, row: str) -> tuple[str, ...]:
        """evaluate.py's flags for an RTN model rotated as the table's QAT + rotation is."""
        return "--rotate", self.rotate, "--kv-placement", kv_placement(row, self.rotate)

    @cached_property
    def baselines_installed(self) -> bool:
        """Whether --baseline-python has llm-compressor (asked once, and only when a baseline must be made)."""
        python = self.args.baseline_python
        installed = Path(python).is_file() and subprocess.run([python, "-c", "import llmcompressor"],
                                                               capture_output=True).returncode == 0
        if not installed:
            print(f"[table] llm-compressor is not installed at {python}: GPTQ and SmoothQuant cells say "
                  f"'{NOT_INSTALLED}' (make baselines installs it)", flush=True)
        return installed

    def write_real_text(self, output: Path) -> None:
        """Real text as training data with the hybrid data's budget: as many windows of --seq-len tokens."""
        hybrid = self.data("hybrid")
        count = sum(1 for line in (hybrid / "all.jsonl").open() if line.strip()) if isinstance(hybrid, Path) else None
        tokenizer = load_tokenizer(self.args.model)
        windows = [ids for ids in token_sequences(tokenizer, self.args.real_text, self.args.seq_len)
                   if len(ids) == self.args.seq_len][:count]
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output) as out:
            out.write("".join(plain_sequence_line(ids) for ids in windows))
        print(f"[table] data real: {len(windows)} windows of {self.args.seq_len} tokens from {self.args.real_text}"
              + (f" (fewer than the generated data's {count}: the file is short)" if count and len(windows) < count
                 else ""), flush=True)

    # -- the tables ----------------------------------------------------------------------------------------------
    def build(self) -> Path:
        """The grid (then the ablation table): table.md, table.csv, table.png (and ablation.md, ablation.csv)."""
        if not isinstance(self.data("hybrid"), Path):
            raise SystemExit("paper_table: error: the data synthesis failed; see the logs in "
                             f"{self.out / 'logs'} (nothing else can run without data)")
        methods = [name for name, method in METHODS.items() if not method.rotated or self.rotate != "none"]
        grid = {row: {name: PENDING for name in methods} for row in self.args.rows}
        for order in sorted({METHODS[name].order for name in methods}):
            for row in self.args.rows:  # cheap cells first: a stopped run still has a useful table
                for name in (name for name in methods if METHODS[name].order == order):
                    method = METHODS[name]
                    grid[row][name] = method.cell(self, row) if method.applies(row) else NOT_APPLICABLE
                self.write(grid)
        if self.args.ablations:
            self.write_ablations()
        self.write(grid)  # the notes count the ablations' time too
        return self.out / "table.md"

    def write_ablations(self) -> None:
        args, bits = self.args, self.args.ablation_bits
        rows = {"FP": METHODS["fp"].cell(self, bits), "RTN": METHODS["rtn"].cell(self, bits)}
        hybrid = self.qat(bits)
        if "data" in args.ablations:
            modes = ["greedy", "sampled"] + (["real"] if args.real_text else [])
            for mode in modes:
                self.data(mode)
            labels = {"greedy": "Data: generated, greedy", "sampled": "Data: generated, sampled",
                      "real": f"Data: real text ({Path(args.real_text).name})" if args.real_text else ""}
            rows["Data: generated, hybrid (paper)"] = hybrid
            for mode in modes:
                rows[labels[mode]] = self.qat(bits, data=mode)
        if "loss" in args.ablations:
            rows["Loss: KD on logits (paper)"] = hybrid
            rows["Loss: next-token labels"] = self.qat(bits, loss="ce")
        path = write_ablation(rows, self.out, f"LLM-QAT ablations at W-A-KV {bits}: {self.teacher_name}", self.notes())
        print(f"[table] wrote {path}", flush=True)

    def notes(self) -> str:
        args = self.args
        device = torch.cuda.get_device_name(0) if self.gpu else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
        data = (f"{args.num_start_tokens} start tokens x {SEQUENCES_PER_START}" if args.num_start_tokens
                else "every start token") + f", {args.seq_len} tokens each"
        parts = self.runner.seconds_per_part()
        spent = "; ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in parts.items())
        spent += f"; in all {sum(parts.values()) / 60:.0f} min" if parts else ""
        return "\n".join([
            f"Teacher: {self.teacher_name}. Made {date.today()} on {device}; time per part (cells computed so far): "
            f"{spent or 'none yet'}.",
            f"Data (hybrid generation, paper section 2.1): {data}; {args.heldout_start_tokens} start tokens' sequences "
            "held out. QAT: the paper's recipe, KD on logits, "
            + (f"lr {args.learning_rate}, {args.epochs:g} epoch(s), batch {args.batch_size}, cosine, on CPU."
               if not self.gpu else "scripts/run_train.sh's GPU settings (the released LLaMA-7B recipe)."),
            f"Baselines: GPTQ (W bits per channel, weights only) and SmoothQuant (alpha {args.smoothing_strength}, "
            f"then RTN weights) by llm-compressor, calibrated on {args.calibration_samples} generated sequences; the "
            "row's activation and KV quantizers are then applied as for RTN. n/a: SmoothQuant has nothing to smooth "
            "without activation quantization.",
            f"Held-out ppl / KL / top-1: on the held-out generated sequences; Text ppl: "
            f"{args.text_file or 'the built-in paragraph of real text'}; Wiki ppl (when TASKS include wikitext): word "
            f"perplexity. Tasks: {task_names(self.tasks.names)} ({self.tasks.why}).",
            "QAT gap closed: (RTN ppl - QAT ppl) / (RTN ppl - FP ppl).",
        ] + ([f"+ rotation: {args.rotate} rotations folded into the float model before quantizing (README "
              "'Rotations'); in rows with KV below 16 bits keys are then quantized after RoPE. Its gap is a share of "
              "the same, unrotated RTN -> FP gap."] if args.rotate != "none" else [])) + "\n"

    def write(self, grid: dict[str, dict]) -> None:
        write_grid(grid, self.out, f"LLM-QAT and training-free baselines: {self.teacher_name}", self.notes())


def main(argv=None) -> Path:
    args = parse_args(argv)
    with user_errors("paper_table.py"):
        check_args(args)
        table = PaperTable(args, choose_tasks(args)).build()
    print(f"[table] wrote {table}, table.csv and table.png", flush=True)
    print(table.read_text())
    return table


if __name__ == "__main__":
    main()
