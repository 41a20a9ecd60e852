"""The paper's tables from evaluate.py result records: written here only.

`write_grid` writes table.md, table.csv and table.png in the layout of the paper's Table 1 turned for a grid: one
row per W-A-KV setting, and for every metric one column per method of the grid (utils/report/methods.py: FP, RTN,
GPTQ, SmoothQuant, LLM-QAT, and RTN / LLM-QAT + rotation where the grid has them), then the share of the RTN -> FP
perplexity gap each QAT method closes. `write_ablation` writes ablation.md / ablation.csv: one row per training
setting (data source, loss) at one W-A-KV, as the paper's Tables 3 and 4.

A cell is a result record (a dict with `metrics`) or a status string: "not installed", "failed", "n/a" (the
method does not apply to the row, e.g. SmoothQuant without activation quantization) or "pending".
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from utils.evaluation.tasks import TASK_LABELS
from utils.report.compare import OTHER_COLUMNS, gap_closed
from utils.report.methods import METHODS

# compare.py's columns (key, header, scale, format), after the average accuracy computed from the task accuracies.
METRICS = (("avg_accuracy", "Avg. accuracy (%)", 100, "{:.1f}"), *OTHER_COLUMNS)
GAP_METRICS = (("heldout_perplexity", "held-out"), ("perplexity", "text"))
PENDING = "pending"


def metric_value(cell, key: str) -> float | None:
    if not isinstance(cell, dict):
        return None
    metrics = cell["metrics"]
    if key == "avg_accuracy":
        accuracies = [value for name, value in metrics.items() if name.endswith("/acc")]
        return sum(accuracies) / len(accuracies) if accuracies else None
    return metrics.get(key)


def formatted(cell, key: str, scale: float, fmt: str) -> str:
    if isinstance(cell, str):
        return cell
    value = metric_value(cell, key)
    return "–" if value is None else fmt.format(scale * value)


def used_metrics(cells) -> list[tuple]:
    return [metric for metric in METRICS if any(metric_value(cell, metric[0]) is not None for cell in cells)]


def grid_methods(grid: dict[str, dict]) -> list[str]:
    """The methods the grid has, in the registry's order."""
    return [m for m in METHODS if any(m in row_cells for row_cells in grid.values())]


def gap_methods(methods: list[str]) -> list[str]:
    """Those of `methods` whose share of the (unrotated) RTN -> FP gap has a column."""
    return [m for m in methods if METHODS[m].gap]


def qat_gap(cells: dict, key: str, method: str = "qat") -> str:
    fp, rtn, qat = (cells.get(name) for name in ("fp", "rtn", method))
    if not all(isinstance(cell, dict) and key in cell["metrics"] for cell in (fp, rtn, qat)):
        return "–"
    share = gap_closed(fp["metrics"], rtn["metrics"], qat["metrics"], key)
    return "no gap" if math.isnan(share) else f"{share:.0%}"


def grid_rows(grid: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: W-A-KV, then metric x method, then the gaps QAT closes. `grid[row][method]` is a cell."""
    cells = [cell for row in grid.values() for cell in row.values()]
    metrics, methods = used_metrics(cells), grid_methods(grid)
    gaps = [(key, where, method) for method in gap_methods(methods)
            for key, where in GAP_METRICS if any(key == m[0] for m in metrics)]
    header = ["#Bits (W-A-KV)"]
    header += [f"{title}: {METHODS[m].label}" for _, title, _, _ in metrics for m in methods]
    header += [f"{METHODS[method].gap} gap closed ({where})" for _, where, method in gaps]
    rows = []
    for row, row_cells in grid.items():
        line = [row]
        line += [formatted(row_cells.get(method, "n/a"), key, scale, fmt)
                 for key, _, scale, fmt in metrics for method in methods]
        line += [qat_gap(row_cells, key, method) for key, _, method in gaps]
        rows.append(line)
    return header, rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def per_metric_markdown(grid: dict[str, dict]) -> str:
    """The same numbers as one small table per metric (rows = bits, columns = methods): easier to read."""
    cells = [cell for row in grid.values() for cell in row.values()]
    methods = grid_methods(grid)
    parts = []
    for key, title, scale, fmt in used_metrics(cells):
        header = ["#Bits (W-A-KV)"] + [METHODS[m].label for m in methods]
        where = dict(GAP_METRICS).get(key)
        gaps = gap_methods(methods) if where else []
        header += [f"{METHODS[method].gap} gap closed ({where})" for method in gaps]
        rows = [[row] + [formatted(row_cells.get(m, "n/a"), key, scale, fmt) for m in methods]
                + [qat_gap(row_cells, key, method) for method in gaps] for row, row_cells in grid.items()]
        parts.append(f"### {title}\n\n{markdown(header, rows)}")
    return "\n".join(parts)


def write_csv(header, rows, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot_grid(grid: dict[str, dict], path: Path, title: str) -> None:
    """One panel per metric: grouped bars per W-A-KV row, one bar per method (perplexities on a log scale)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cells = [cell for row in grid.values() for cell in row.values()]
    metrics = used_metrics(cells)
    if not metrics:
        return
    methods = grid_methods(grid)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(methods)
    rows = list(grid)
    for ax, (key, name, scale, _) in zip(axes[0], metrics):
        for i, method in enumerate(methods):
            values = [metric_value(grid[row].get(method), key) for row in rows]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(rows))],
                   [float("nan") if v is None else scale * v for v in values], width,
                   label=METHODS[method].label)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        ax.set_title(name)
        if "ppl" in name:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_grid(grid: dict[str, dict], out: Path, title: str, notes: str) -> Path:
    """table.md (the wide table, then one table per metric, then `notes`), table.csv and table.png in `out`."""
    header, rows = grid_rows(grid)
    (out / "table.md").write_text(f"# {title}\n\n{markdown(header, rows)}\n{per_metric_markdown(grid)}\n{notes}\n")
    write_csv(header, rows, out / "table.csv")
    plot_grid(grid, out / "table.png", title)
    return out / "table.md"


def write_ablation(settings: dict[str, dict], out: Path, title: str, notes: str) -> Path:
    """ablation.md / ablation.csv: one row per training setting ({"Data: greedy": cell, ...}), metrics as columns,
    the last column the share of the RTN -> FP held-out gap closed (RTN and FP are rows named so)."""
    cells = list(settings.values())
    metrics = used_metrics(cells)
    header = ["Setting"] + [name for _, name, _, _ in metrics] + ["Gap closed (held-out)"]
    reference = {"fp": settings.get("FP"), "rtn": settings.get("RTN")}
    rows = []
    for name, cell in settings.items():
        gap = qat_gap({**reference, "qat": cell}, "heldout_perplexity") if name not in ("FP", "RTN") else ""
        rows.append([name] + [formatted(cell, key, scale, fmt) for key, _, scale, fmt in metrics] + [gap])
    (out / "ablation.md").write_text(f"# {title}\n\n{markdown(header, rows)}\n{notes}\n")
    write_csv(header, rows, out / "ablation.csv")
    return out / "ablation.md"


def task_names(tasks: list[str]) -> str:
    return ", ".join(TASK_LABELS.get(task, task) for task in tasks) or "none"
