"""The paper's results as one command (issue #15): for every W-A-KV row, FP, RTN, GPTQ, SmoothQuant and LLM-QAT with
the same metrics, then table.md / table.csv / table.png (utils/table.py); optional ablations of the training data
and the loss. `scripts/paper_table.sh` (and `make table`) is the usual way in; every option is also a variable there.

    python scripts/paper_table.py                                   # the eight rows on the embedded SmolLM2-135M
    python scripts/paper_table.py --rows 4-8-4 8-8-8 --ablations data loss

Each cell is one run of the repo's own command lines (generate_data.py, merge_gen_data.py, scripts/evaluate.py,
scripts/run_train.sh, and scripts/baseline.py in the llm-compressor environment), logged to OUT/logs. A cell's
result is kept under a name made from every setting it depends on and from the code it runs, so an interrupted
table resumes where it stopped, a second call only prints, a changed setting recomputes only the cells it touches,
and a change to the code (models/, utils/, scripts/, the entry points) recomputes them all. A failing cell is
reported in the table ("failed", with its log), not fatal; GPTQ and SmoothQuant say "not installed" without the
extra (`make baselines`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from models.quantize import QATConfig
from models.rotations import ROTATIONS
from utils.cli import ensure_writable_dir, user_errors
from utils.harness import PAPER_TASKS, tasks_loadable
from utils.loading import load_tokenizer, model_display_name, resolve_model_path
from utils.metrics import token_sequences
from utils.records import plain_sequence_line
from utils.table import GRID_METHODS, PENDING, ROTATED_METHODS, row_bits, task_names, write_ablation, write_grid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = ("4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16")  # the released table
LOCAL_TASKS = ("commonsense_mini", REPO / "tests" / "data")  # the offline stand-in when the hub is unreachable
SEQUENCES_PER_START = 3  # the hybrid data's greedy prefixes 3, 4, 5: the other data modes make as many sequences
ABLATIONS = ("data", "loss")
NOT_INSTALLED, FAILED, NOT_APPLICABLE = "not installed", "failed", "n/a"
CODE = ("*.py", "models/**/*.py", "utils/**/*.py", "scripts/*.py", "scripts/*.sh", "scripts/*.json")  # what cells run


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
                        help="also RTN and LLM-QAT after this rotation (issue #14, README 'Rotations'), as two more "
                             "methods; rows with KV below 16 bits then quantize keys after RoPE, as rotation needs")
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


def code_fingerprint(root: Path = REPO) -> str:
    """A digest of the code the cells run (not of docs or tests), read afresh for every key: a result computed
    before a fix is not reused after it."""
    digest = hashlib.sha256()
    for path in sorted({path for pattern in CODE for path in root.glob(pattern)}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def settings_key(**settings) -> str:
    """A short name for everything a result depends on, its code included: equal settings and code, equal key, the
    result is reused."""
    settings = dict(settings, code=code_fingerprint())
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut off by a kill while written: computed again
        return None


class Table:
    """Runs the cells of one table in order, each once; keeps the results and their timings under `out`."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        for folder in ("cells", "models", "data", "logs"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        self.timings_file = self.out / "timings.json"
        self.timings = read_result(self.timings_file) or {}
        self.model_name = model_display_name(args.model)
        self.gpu = torch.cuda.is_available()
        self._baselines_installed = None
        self.cells = set()  # the names of this table's runs, computed now or before: its time per part

    def baselines_installed(self) -> bool:
        """Whether --baseline-python has llm-compressor (asked once, and only when a baseline must be made)."""
        if self._baselines_installed is None:
            python = self.args.baseline_python
            self._baselines_installed = Path(python).is_file() and subprocess.run(
                [python, "-c", "import llmcompressor"], capture_output=True).returncode == 0
            if not self._baselines_installed:
                print(f"[table] llm-compressor is not installed at {python}: GPTQ and SmoothQuant cells say "
                      f"'{NOT_INSTALLED}' (make baselines installs it)", flush=True)
        return self._baselines_installed

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, name: str, part: str, command: list[str], env: dict | None = None) -> bool:
        """One command, logged to logs/NAME.log, timed under `part`; False if it failed."""
        log = self.out / "logs" / f"{name}.log"
        self.cells.add(name)
        print(f"[table] {name}: running (log {log})", flush=True)
        start = time.time()
        with log.open("w") as f:
            code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}).returncode
        seconds = time.time() - start
        if code:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            print(f"[table] {name}: FAILED after {seconds:.0f} s (exit {code}): {tail[0] if tail else ''} "
                  f"-- see {log}", flush=True)
            return False
        self.timings[name] = {"part": part, "seconds": round(seconds, 1)}
        self.timings_file.write_text(json.dumps(self.timings, indent=2) + "\n")
        print(f"[table] {name}: done in {seconds:.0f} s", flush=True)
        return True

    def cached(self, name: str) -> None:
        self.cells.add(name)
        print(f"[table] {name}: cached", flush=True)

    def evaluation(self, name: str, model: str, bits: str | None = None, options: tuple = ()) -> dict | str:
        """An evaluate.py result, computed once for these settings (`options`: evaluate.py's RTN flags)."""
        settings = dict(self.eval_settings, model=str(model), bits=bits, **({"options": options} if options else {}))
        name = f"{name}-{settings_key(**settings)}"
        path = self.out / "cells" / f"{name}.json"
        record = read_result(path)
        if record is None:
            command = [self.args.python, "scripts/evaluate.py", str(model), *(bits.split("-") if bits else []),
                       *self.task_flags, "--heldout", str(self.heldout), "--teacher", self.args.model,
                       "--max-length", str(self.args.seq_len), "--output", str(path), *options]
            if self.args.text_file:
                command += ["--text-file", self.args.text_file]
            if not self.run(name, "evaluation", command):
                return FAILED
            record = read_result(path)
        else:
            self.cached(name)
        return record

    # -- data -------------------------------------------------------------------------------------------------
    def data(self, mode: str) -> Path | str:
        """The training data of one mode (hybrid, greedy, sampled, real); the hybrid's held-out sequences are the
        evaluation set of every cell."""
        args = self.args
        n = args.num_start_tokens
        settings = dict(mode=mode, model=self.model_name, n=n, heldout=args.heldout_start_tokens, len=args.seq_len,
                        seed=args.seed)
        if mode == "real":
            settings.update(text=str(Path(args.real_text).resolve()), size=Path(args.real_text).stat().st_size)
        folder = self.out / "data" / f"{mode}-{settings_key(**settings)}"
        if (folder / "all.jsonl").is_file():
            self.cells.update((f"data-{mode}-generate", f"data-{mode}-merge"))
            print(f"[table] data {mode}: cached ({folder})", flush=True)
            return folder
        if mode == "real":
            return self.real_text_data(folder)
        starts = ["--num-start-tokens", str(n if mode == "hybrid" else SEQUENCES_PER_START * n)] if n else []
        greedy = {"hybrid": [], "greedy": ["--greedy-lengths", str(args.seq_len)], "sampled": ["--greedy-lengths", "1"]}
        heldout = args.heldout_start_tokens * (1 if mode == "hybrid" else SEQUENCES_PER_START)
        model = [] if self.model_name == model_display_name(None) else ["--model", args.model]
        launcher = ([args.python, "-m", "torch.distributed.run", "--nproc-per-node", str(torch.cuda.device_count())]
                    if self.gpu else [args.python])
        generate = [*launcher, "generate_data.py", *model, "--output-dir", str(folder), *starts, *greedy[mode],
                    "--max-length", str(args.seq_len), "--seed", str(args.seed)]
        merge = [args.python, "merge_gen_data.py", str(folder), "--output", str(folder / "all.jsonl"), "--heldout",
                 str(heldout), "--seed", str(args.seed), "--force"]
        # generate_data.py resumes an interrupted shard; the merge is what marks the data complete.
        if not (self.run(f"data-{mode}-generate", "data", generate) and self.run(f"data-{mode}-merge", "data", merge)):
            return FAILED
        return folder

    def real_text_data(self, folder: Path) -> Path:
        """Real text as training data with the hybrid data's budget: as many windows of --seq-len tokens."""
        hybrid = self.training_data["hybrid"]
        count = sum(1 for line in (hybrid / "all.jsonl").open() if line.strip()) if isinstance(hybrid, Path) else None
        tokenizer = load_tokenizer(self.args.model)
        windows = [ids for ids in token_sequences(tokenizer, self.args.real_text, self.args.seq_len)
                   if len(ids) == self.args.seq_len][:count]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "all.jsonl.tmp"
        tmp.write_text("".join(plain_sequence_line(ids) for ids in windows))
        tmp.replace(folder / "all.jsonl")
        print(f"[table] data real: {len(windows)} windows of {self.args.seq_len} tokens from {self.args.real_text}"
              + (f" (fewer than the generated data's {count}: the file is short)" if count and len(windows) < count
                 else ""), flush=True)
        return folder

    # -- methods ----------------------------------------------------------------------------------------------
    def baseline_model(self, method: str, w_bits: int | None = None) -> Path | str:
        data = self.training_data["hybrid"]
        settings = dict(method=method, model=self.model_name, data=str(data), samples=self.args.calibration_samples,
                        len=self.args.seq_len, seed=self.args.seed)
        settings.update({"w_bits": w_bits} if method == "gptq" else {"alpha": self.args.smoothing_strength})
        name = f"{method}{f'-w{w_bits}' if w_bits else ''}-{settings_key(**settings)}"
        folder = self.out / "models" / name
        if (folder / "config.json").is_file():
            self.cached(name)
            return folder
        if not self.baselines_installed():
            return NOT_INSTALLED
        command = [self.args.baseline_python, "scripts/baseline.py", method, "--model", self.args.model,
                   "--calibration", str(data / "all.jsonl"), "--num-samples", str(self.args.calibration_samples),
                   "--max-length", str(self.args.seq_len), "--seed", str(self.args.seed), "--output", str(folder)]
        command += (["--w-bits", str(w_bits)] if method == "gptq"
                    else ["--smoothing-strength", str(self.args.smoothing_strength)])
        return folder if self.run(name, "baselines", command) else FAILED

    def qat_model(self, bits: str, data: Path, loss: str = "kd", rotate: str = "none") -> Path | str:
        args = self.args
        settings = dict(bits=bits, model=self.model_name, data=str(data), len=args.seq_len, lr=args.learning_rate,
                        epochs=args.epochs, batch=args.batch_size, seed=args.seed, loss=loss, gpu=self.gpu)
        settings.update({"rotate": rotate} if rotate != "none" else {})
        name = f"{qat_name(bits, loss, rotate)}-{settings_key(**settings)}"
        folder = self.out / "models" / name
        if (folder / "config.json").is_file():
            self.cached(name)
            return folder
        env = {"MODEL": "" if self.model_name == model_display_name(None) else args.model,
               "DATA": str(data / "all.jsonl"), "OUTPUT_DIR": str(folder), "PYTHON": args.python,
               "CPU_MAX_LENGTH": str(args.seq_len), "CPU_BATCH_SIZE": str(args.batch_size),
               "CPU_LEARNING_RATE": args.learning_rate, "CPU_EPOCHS": str(args.epochs),
               # run_train.sh's quantizer options, set here so that none leaks in from the user's environment
               "W_GROUP_SIZE": "", "RECIPE": "paper", "ROTATE": rotate, "KV_PLACEMENT": kv_placement(bits, rotate)}
        command = ["bash", "scripts/run_train.sh", *bits.split("-"), "--save_strategy", "no", "--seed", str(args.seed),
                   "--loss", loss]
        return folder if self.run(name, "QAT training", command, env) else FAILED

    def qat_cell(self, bits: str, data, loss: str = "kd", rotate: str = "none") -> dict | str:
        if not isinstance(data, Path):
            return data
        model = self.qat_model(bits, data, loss, rotate)
        return self.evaluation(qat_name(bits, loss, rotate), model) if isinstance(model, Path) else model

    def rotated_rtn_cell(self, bits: str) -> dict | str:
        rotate = self.args.rotate
        return self.evaluation(f"rtn-{bits}-{rotate}", self.args.model, bits,
                               ("--rotate", rotate, "--kv-placement", kv_placement(bits, rotate)))

    # -- the table --------------------------------------------------------------------------------------------
    def choose_tasks(self) -> tuple[list[str], str | None, str]:
        """The paper's eight tasks if the harness can load them, else the local task; remembered in tasks.json."""
        args = self.args
        if args.tasks != "auto":
            tasks = [] if args.tasks == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
            return tasks, None, "chosen with --tasks"
        saved = read_result(self.out / "tasks.json")
        if saved:
            return saved["tasks"], saved["include_path"], saved["why"]
        print("[table] checking whether the lm-eval harness can load the paper's eight tasks ...", flush=True)
        if tasks_loadable(list(PAPER_TASKS)):
            choice = (list(PAPER_TASKS), None, "the paper's eight zero-shot tasks")
        else:
            task, folder = LOCAL_TASKS
            choice = ([task], str(folder), "the paper's tasks could not be loaded (no network and no local copy); "
                                           f"the local task {task} ({folder}) stands in")
        (self.out / "tasks.json").write_text(json.dumps(dict(zip(("tasks", "include_path", "why"), choice))) + "\n")
        return choice

    def build(self) -> None:
        args = self.args
        tasks, include_path, why = self.choose_tasks()
        self.tasks_note = f"Tasks: {task_names(tasks)} ({why})."
        self.task_flags = ["--tasks", ",".join(tasks) or "none"] + (["--include-path", include_path]
                                                                    if include_path else [])

        self.training_data = {"hybrid": self.data("hybrid")}
        if not isinstance(self.training_data["hybrid"], Path):
            raise SystemExit("paper_table: error: the data synthesis failed; see the logs in "
                             f"{self.out / 'logs'} (nothing else can run without data)")
        self.heldout = self.training_data["hybrid"] / "heldout.jsonl"
        self.eval_settings = dict(tasks=tasks, include_path=include_path, text=args.text_file, len=args.seq_len,
                                  heldout=str(self.heldout), teacher=self.model_name)
        methods = GRID_METHODS + (ROTATED_METHODS if args.rotate != "none" else ())
        grid = {row: {method: PENDING for method in methods} for row in args.rows}
        self.grid = grid
        fp = self.evaluation("fp", args.model)
        for row in args.rows:  # cheap cells first: a stopped run still has a useful table
            grid[row]["fp"] = fp
            grid[row]["rtn"] = self.evaluation(f"rtn-{row}", args.model, row)
            self.write()
        smoothquant = None
        for row in args.rows:
            w, a, _ = row_bits(row)
            gptq = self.baseline_model("gptq", w)
            grid[row]["gptq"] = self.evaluation(f"gptq-{row}", gptq, row) if isinstance(gptq, Path) else gptq
            if a == 16:  # SmoothQuant smooths activation outliers: nothing to do without activation quantization
                grid[row]["smoothquant"] = NOT_APPLICABLE
            else:
                smoothquant = smoothquant or self.baseline_model("smoothquant")
                grid[row]["smoothquant"] = (self.evaluation(f"smoothquant-{row}", smoothquant, row)
                                            if isinstance(smoothquant, Path) else smoothquant)
            self.write()
        for row in args.rows:
            grid[row]["qat"] = self.qat_cell(row, self.training_data["hybrid"])
            self.write()
        if args.rotate != "none":
            for row in args.rows:
                grid[row]["rtn_rotated"] = self.rotated_rtn_cell(row)
                grid[row]["qat_rotated"] = self.qat_cell(row, self.training_data["hybrid"], rotate=args.rotate)
                self.write()
        if args.ablations:
            self.ablations(fp)

    def ablations(self, fp) -> None:
        args, bits = self.args, self.args.ablation_bits
        rows = {"FP": fp, "RTN": self.evaluation(f"rtn-{bits}", args.model, bits)}
        hybrid = self.qat_cell(bits, self.training_data["hybrid"])
        if "data" in args.ablations:
            modes = ["greedy", "sampled"] + (["real"] if args.real_text else [])
            for mode in modes:
                self.training_data[mode] = self.data(mode)
            labels = {"greedy": "Data: generated, greedy", "sampled": "Data: generated, sampled",
                      "real": f"Data: real text ({Path(args.real_text).name})" if args.real_text else ""}
            rows["Data: generated, hybrid (paper)"] = hybrid
            for mode in modes:
                rows[labels[mode]] = self.qat_cell(bits, self.training_data[mode])
        if "loss" in args.ablations:
            rows["Loss: KD on logits (paper)"] = hybrid
            rows["Loss: next-token labels"] = self.qat_cell(bits, self.training_data["hybrid"], loss="ce")
        path = write_ablation(rows, self.out, f"LLM-QAT ablations at W-A-KV {bits}: {self.model_name}",
                              self.notes())
        print(f"[table] wrote {path}", flush=True)

    def notes(self) -> str:
        args = self.args
        device = torch.cuda.get_device_name(0) if self.gpu else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
        data = (f"{args.num_start_tokens} start tokens x {SEQUENCES_PER_START}" if args.num_start_tokens
                else "every start token") + f", {args.seq_len} tokens each"
        parts = {}
        for timing in (self.timings[name] for name in self.cells if name in self.timings):
            parts[timing["part"]] = parts.get(timing["part"], 0) + timing["seconds"]
        spent = "; ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in parts.items())
        spent += f"; in all {sum(parts.values()) / 60:.0f} min" if parts else ""
        return "\n".join([
            f"Teacher: {self.model_name}. Made {date.today()} on {device}; time per part (cells computed so far): "
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
            "perplexity. " + self.tasks_note,
            "QAT gap closed: (RTN ppl - QAT ppl) / (RTN ppl - FP ppl).",
        ] + ([f"+ rotation: {args.rotate} rotations folded into the float model before quantizing (README "
              "'Rotations'); in rows with KV below 16 bits keys are then quantized after RoPE. Its gap is a share of "
              "the same, unrotated RTN -> FP gap."] if args.rotate != "none" else [])) + "\n"

    def write(self) -> None:
        title = f"LLM-QAT and training-free baselines: {self.model_name}"
        write_grid(self.grid, self.out, title, self.notes())


def main(argv=None) -> Path:
    args = parse_args(argv)
    with user_errors("paper_table.py"):
        check_args(args)
        table = Table(args)
        table.build()
        table.write()
    print(f"[table] wrote {table.out / 'table.md'}, table.csv and table.png", flush=True)
    print((table.out / "table.md").read_text())
    return table.out / "table.md"


if __name__ == "__main__":
    main()
