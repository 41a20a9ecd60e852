"""The paper table as data: its rows (W-A-KV settings) and its columns, a registry of methods.

A method is one entry of `METHODS`: its column, when its cells run, and how its cell at a row is made from the
table's building blocks (scripts/paper_table.py's `PaperTable`: an evaluation of a model at the row's bits, a
GPTQ / SmoothQuant model, a QAT model). Adding a method is adding an entry: the table's run order, its columns and
their gap columns follow from the registry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_ROWS = ("4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16")  # the released table
NOT_APPLICABLE = "n/a"


def row_bits(row: str) -> tuple[int, int, int]:
    """`4-8-4` -> (4, 8, 4); ValueError naming the fix otherwise."""
    parts = row.split("-")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"row {row!r} is not W-A-KV bits such as 4-8-4; set ROWS to e.g. \"4-8-4 8-8-8\"")
    return tuple(int(part) for part in parts)


@dataclass(frozen=True)
class Method:
    label: str  # its column header
    order: int  # the table runs cells by order, then row: cheap ones first, so a stopped table is already useful
    cell: Callable  # (table, row) -> the evaluate.py result record of its cell, or a status saying why there is none
    applies: Callable[[str], bool] = lambda row: True  # at the other rows its cell says NOT_APPLICABLE
    rotated: bool = False  # a column only when the table rotates (--rotate)
    gap: str | None = None  # names the column of its share of the (unrotated) RTN -> FP gap


METHODS = {
    "fp": Method("FP", 1, lambda table, row: table.evaluation("fp", table.teacher)),
    "rtn": Method("RTN", 1, lambda table, row: table.evaluation(f"rtn-{row}", table.teacher, row)),
    "gptq": Method("GPTQ", 2, lambda table, row: table.baseline("gptq", row)),
    # SmoothQuant smooths activation outliers: nothing to do without activation quantization.
    "smoothquant": Method("SmoothQuant", 2, lambda table, row: table.baseline("smoothquant", row),
                          applies=lambda row: row_bits(row)[1] != 16),
    "qat": Method("LLM-QAT", 3, lambda table, row: table.qat(row), gap="QAT"),
    # Rotations before quantizing (QuaRot, SpinQuant; README "Rotations"), beside the paper's methods.
    "rtn_rotated": Method("RTN + rotation", 4, lambda table, row: table.evaluation(
        f"rtn-{row}-{table.rotate}", table.teacher, row, table.rotation_flags(row)), rotated=True),
    "qat_rotated": Method("LLM-QAT + rotation", 4, lambda table, row: table.qat(row, rotate=table.rotate),
                          rotated=True, gap="QAT + rotation"),
}
