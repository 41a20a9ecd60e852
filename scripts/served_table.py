"""The paper table's rows that vLLM serves, served: FP, RTN, GPTQ and LLM-QAT for the vLLM target, each evaluated by
this project and served from its packed export by vLLM's CPU build, on the table's held-out data.

    make baselines vllm                                   # once: llm-compressor (GPTQ) and vLLM, each in its own venv
    python scripts/served_table.py                        # rows 4-16-16, 8-8-16, 4g64-16-16 on the embedded SmolLM2
    python scripts/served_table.py --rows 8-8-16 --out table_output

It takes paper_table.py's flags and shares its cells (OUT/data, OUT/models): the data and the models are made once
for both tables. RTN and LLM-QAT use `--recipe vllm` (what vLLM's kernels compute, README "Recipes"), GPTQ is
llm-compressor's own compressed export. Per row and method: the project's held-out perplexity, KL and top-1 agreement
with the teacher (float32), then the export served by vLLM (bfloat16 for weight-only int4, vLLM CPU's only int4
dtype; float32 otherwise): its held-out perplexity and top-1 agreement, how far its log p of each token is from the
student's in the same dtype, and the share of its linear layers' outputs that equal the student's to the bit
(utils/evaluation/serving.py). Written to OUT/served.md; each cell is cached as the paper table's are.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from models.checkpoint import save_quantized
from models.export import export_packed
from models.quantize import CONFIG_KEY, QATConfig, quantize_model
from utils.data.vllm_engine import VLLM_PYTHON, require_vllm_python
from utils.evaluation.baselines import applied_quantization, saved_baseline
from utils.evaluation.metrics import teacher_fidelity, token_sequences
from utils.evaluation.serving import serve_check, vllm_mismatch
from utils.report.cells import Cell, read_result, settings_key
from utils.safety import atomic_file, user_errors
from utils.training.loading import load_model, load_tokenizer, resolve_model_path

from paper_table import PaperTable, Tasks, check_args, parse_args as table_args  # scripts/, this script's folder

SERVED_ROWS = ("4-16-16", "8-8-16", "4g64-16-16")  # what vLLM's CPU build serves: int4 weight-only, int8 W8A8
METHODS = ("fp", "rtn", "gptq", "qat")
LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ", "qat": "LLM-QAT"}
ROW = re.compile(r"(\d+)(?:g(\d+))?-(\d+)-(\d+)")


def row_config(row: str, flags: set[str] | None = None) -> QATConfig:
    """`4g64-16-16` -> the vllm recipe's W4 A16 KV16 with groups of 64 columns; a one-line error otherwise, also
    where vLLM lacks the row's kernel on a CPU with `flags` (default: this one's)."""
    match = ROW.fullmatch(row)
    if not match:
        raise ValueError(f"row {row!r} is not W-A-KV bits such as 8-8-16, or 4g64-16-16 for groups of 64 columns")
    w_bits, group_size, a_bits, kv_bits = match.groups()
    config = QATConfig(int(w_bits), int(a_bits), int(kv_bits), recipe="vllm",
                       w_group_size=int(group_size) if group_size else None)
    mismatch = vllm_mismatch({CONFIG_KEY: asdict(config)}, flags)
    if mismatch:
        raise ValueError(f"row {row}: {mismatch}")
    return config


def serving_dtype(config: QATConfig) -> str:
    return "bfloat16" if config.a_bits == 16 and config.w_bits != 16 else "float32"


class ServedTable:
    """The served cells on top of a `PaperTable` (its data, GPTQ and QAT cells and its cache)."""

    def __init__(self, table: PaperTable, vllm_python: str):
        self.table, self.vllm_python = table, vllm_python
        self.out = table.out
        (self.out / "served").mkdir(parents=True, exist_ok=True)

    def rtn_export(self, row: str, config: QATConfig) -> Path | str:
        """The teacher quantized to-nearest with the vllm recipe, saved and exported packed."""
        settings = dict(method="rtn", row=row, model=self.table.teacher_name)
        key = settings_key(**settings)
        folder = self.out / "models" / f"rtn-{row}-vllm-{key}"

        def make(output: Path) -> None:
            model, tokenizer = load_model(self.table.teacher, quantized=False), load_tokenizer(self.table.teacher)
            save_quantized(quantize_model(model, config), folder / "student", tokenizer)
            export_packed(folder / "student", output.parent, force=True)

        return self.table.runner.result(Cell(f"rtn-{row}-vllm-{key}", "export", settings, key,
                                             folder / "export" / "config.json", make=make))

    def qat_export(self, row: str, config: QATConfig) -> Path | str:
        """LLM-QAT trained with the vllm recipe (paper_table.py's QAT cell), exported packed."""
        data = self.table.data("hybrid")
        if not isinstance(data, Path):
            return data
        bits = f"{config.w_bits}-{config.a_bits}-{config.kv_bits}"
        trained = self.table.runner.result(self.table.qat_cell(bits, data, "kd", "none", recipe="vllm",
                                                               w_group_size=config.w_group_size))
        if not isinstance(trained, Path):
            return trained
        export = trained.parent.with_name(trained.parent.name + "-export")
        settings = dict(checkpoint=str(trained.parent))
        cell = Cell(export.name, "export", settings, settings_key(**settings), export / "config.json",
                    make=lambda output: export_packed(trained.parent, output.parent, force=True))
        return self.table.runner.result(cell)

    def gptq_export(self, config: QATConfig) -> Path | str:
        """llm-compressor's GPTQ model (paper_table.py's baseline cell): its float copy holds `compressed/`."""
        if not self.table.baselines_installed:
            return "not installed"
        cell = self.table.baseline_cell("gptq", config.w_bits, w_group_size=config.w_group_size, a_bits=config.a_bits)
        made = self.table.runner.result(cell)
        if not isinstance(made, Path):
            return made
        return made.parent / saved_baseline(made.parent)["compressed"] / "config.json"

    def export(self, method: str, row: str, config: QATConfig) -> Path | str:
        if method == "fp":
            return Path(resolve_model_path(self.table.teacher)) / "config.json"
        if method == "rtn":
            return self.rtn_export(row, config)
        return self.gptq_export(config) if method == "gptq" else self.qat_export(row, config)

    def student(self, method: str, export: Path, config: QATConfig):
        """The model this project evaluates for the cell: the student the export came from (GPTQ: its float copy with
        the row's activation quantizers, as the paper table evaluates it)."""
        if method == "fp":
            return load_model(self.table.teacher, quantized=False)
        if method == "gptq":
            folder = export.parent.parent
            return quantize_model(load_model(folder, quantized=False),
                                  applied_quantization(saved_baseline(folder), config))
        return load_model(export.parent)

    def served(self, method: str, row: str) -> dict | str:
        config = row_config(row)
        export = self.export(method, row, config)
        if not isinstance(export, Path):
            return export
        dtype = serving_dtype(config) if method != "fp" else "float32"
        settings = dict(export=str(export.parent), method=method, row=row if method != "fp" else None, dtype=dtype,
                        heldout=str(self.table.heldout), teacher=self.table.teacher_name)
        key = settings_key(**settings)

        def make(output: Path) -> None:
            tokenizer = load_tokenizer(self.table.teacher)
            sequences = token_sequences(tokenizer, self.table.heldout, self.table.args.seq_len)
            teacher = load_model(self.table.teacher, quantized=False)
            student = self.student(method, export, config)
            own = teacher_fidelity(student, teacher, sequences, pad_token_id=tokenizer.pad_token_id)
            served = serve_check(export.parent, student.to(getattr(torch, dtype)), teacher, sequences, dtype,
                                 self.vllm_python)
            with atomic_file(output) as handle:
                handle.write(json.dumps({"settings": settings, "own": own, "served": served}, indent=2) + "\n")

        name = f"{method}-{settings['row']}-{key}" if settings["row"] else f"{method}-{key}"
        made = self.table.runner.result(Cell(f"served-{name}", "serving", settings, key,
                                             self.out / "served" / f"{name}.json", make=make))
        return read_result(made) if isinstance(made, Path) else made

    def build(self, rows: list[str]) -> Path:
        if not isinstance(self.table.data("hybrid"), Path):  # its held-out sequences are every cell's data
            raise SystemExit(f"served_table: error: the data synthesis failed; see the logs in {self.out / 'logs'}")
        lines = ["| W-A-KV | method | own: held-out ppl | KL | top-1 (%) | vLLM dtype | served: held-out ppl | "
                 "top-1 (%) | \\|served − own\\| log p, mean / max | linears bit-identical (%) |",
                 "|---|---|---:|---:|---:|---|---:|---:|---|---:|"]
        for row in rows:
            for method in METHODS:
                cell = self.served(method, row)
                lines.append(table_line(row, method, cell))
                self.write(lines)
        return self.write(lines)

    def write(self, lines: list[str]) -> Path:
        path = self.out / "served.md"
        notes = (f"\nTeacher {self.table.teacher_name}; held-out data {self.table.heldout}. Own: this project's "
                 "evaluation in float32 (GPTQ: its float weights with the row's activation quantizers). Served: the "
                 "packed export served by vLLM's CPU build, compared with the student in the same dtype.\n")
        with atomic_file(path) as handle:
            handle.write("\n".join(lines) + "\n" + notes)
        return path


def table_line(row: str, method: str, cell) -> str:
    if not isinstance(cell, dict):
        return f"| {row} | {LABELS[method]} | {cell} | | | | | | | |"
    own, served = cell["own"], cell["served"]
    return (f"| {row} | {LABELS[method]} | {own['heldout_perplexity']:.2f} | {own['kl_to_teacher']:.3f} | "
            f"{100 * own['top1_agreement']:.1f} | {cell['settings']['dtype']} | "
            f"{served['served_heldout_perplexity']:.2f} | {100 * served['served_top1_agreement']:.1f} | "
            f"{served['served_vs_student_mean_abs_logp']:.3g} / {served['served_vs_student_max_abs_logp']:.3g} | "
            f"{100 * served['served_linears_identical']:.2f} |")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(SERVED_ROWS),
                        help="rows vLLM serves: W-A-KV, with gG after W for groups of G columns (4g64-16-16)")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of vLLM's environment (make vllm)")
    own, rest = parser.parse_known_args(argv)
    args = table_args(rest)
    with user_errors("served_table.py"):
        for row in own.rows:
            row_config(row)
        require_vllm_python(own.vllm_python)
        check_args(args)
        table = PaperTable(args, Tasks([], None, "held-out metrics only"))
        path = ServedTable(table, own.vllm_python).build(own.rows)
    print(f"[served] wrote {path}", flush=True)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
