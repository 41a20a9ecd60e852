"""Compare result files of scripts/evaluate.py as the paper does: a table and a grouped bar chart
(`scripts/compare.py` is the command line).

`write_report` writes `results.md`, laid out like the paper's Table 1 (one row per method and W-A-KV bits: FP 16-16-16, then
RTN, GPTQ, SmoothQuant and QAT per bit config; columns: zero-shot accuracies, their average, then perplexities and the offline
fidelity metrics), and `results.png` (grouped bars per task: FP / RTN / ... / QAT).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from utils.evaluation.tasks import PAPER_TASKS, TASK_LABELS

logger = logging.getLogger(__name__)

METHOD_LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ", "smoothquant": "SmoothQuant", "qat": "QAT"}
METHOD_ORDER = {method: order for order, method in enumerate(METHOD_LABELS)}
# Non-task columns: (metric key, header, scale for display, format). Accuracies show in percent, as in the paper.
OTHER_COLUMNS = (
    ("wikitext/word_perplexity", "Wiki ppl", 1, "{:.2f}"),
    ("perplexity", "Text ppl", 1, "{:.2f}"),
    ("heldout_perplexity", "Held-out ppl", 1, "{:.2f}"),
    ("kl_to_teacher", "KL to teacher", 1, "{:.4f}"),
    ("top1_agreement", "Top-1 agree. (%)", 100, "{:.1f}"),
)
HELDOUT_METRICS = ("heldout_perplexity", "kl_to_teacher", "top1_agreement")  # measured on evaluate.py's --heldout
ACCURACY_FORMAT = "{:.1f}"
MISSING = "–"


def _is_result(record) -> bool:
    return (isinstance(record, dict) and record.get("method") in METHOD_LABELS
            and isinstance(record.get("metrics"), dict) and isinstance(record.get("bits"), dict)
            and all(isinstance(record["bits"].get(k), int) for k in ("w", "a", "kv")))


def gap_closed(fp: dict, rtn: dict, qat: dict, metric: str = "heldout_perplexity") -> float:
    """The share of the RTN -> FP gap in `metric` (a perplexity) that QAT wins back: 1 = all of it, 0 = none,
    below 0 = worse than RTN. NaN where RTN is no worse than FP (no gap to close)."""
    gap = rtn[metric] - fp[metric]
    return (rtn[metric] - qat[metric]) / gap if gap > 0 else float("nan")


def result_files(paths) -> list[Path]:
    """The files given, a directory standing for its *.json files."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"{path} is a directory without .json files; pass the result files written "
                                        "by scripts/evaluate.py, or their directory")
            files.extend(found)
        else:
            files.append(path)
    return files


def load_results(paths) -> list[dict]:
    records = []
    for path in result_files(paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"result file {path} does not exist; pass files written by scripts/evaluate.py")
        try:
            record = json.loads(Path(path).read_text())
        except json.JSONDecodeError:
            record = None
        if not _is_result(record):
            raise ValueError(f"{path} is not a result file of scripts/evaluate.py (needs method fp|rtn|gptq|smoothquant|qat, bits "
                             "w/a/kv and metrics); regenerate it with scripts/evaluate.py")
        records.append({**record, "path": str(path)})
    if not records:
        raise ValueError("no result files given; pass the JSON files written by scripts/evaluate.py")
    return records


def heldout_files(records) -> dict[str, list[str]]:
    """The --heldout file of each record with held-out metrics (as evaluate.py recorded it) and the rows measured on
    it. Result files that did not record theirs are left out."""
    files = {}
    for record in sort_records(records):
        heldout = (record.get("settings") or {}).get("heldout")
        if heldout and any(metric in record["metrics"] for metric in HELDOUT_METRICS):
            files.setdefault(os.path.normpath(heldout), []).append(row_label(record))
    return files


def heldout_note(records, allow_mixed: bool = False) -> str:
    """Which file the held-out metrics come from. Numbers measured on different held-out sequences do not compare:
    such a table is refused unless `allow_mixed`, and then says which rows were measured on which file."""
    files = heldout_files(records)
    if not files:
        return ""
    if len(files) == 1:
        return f"Held-out ppl, KL to teacher and top-1: on `{next(iter(files))}`. "
    rows = "; ".join(f"`{file}` for {', '.join(labels)}" for file, labels in files.items())
    if not allow_mixed:
        raise ValueError(f"the held-out metrics come from {len(files)} different --heldout files ({rows}); evaluate "
                         "every model on the same file, or pass --allow-mixed-heldout to show them with a note")
    return f"Held-out metrics come from {len(files)} different files and do not compare across them: {rows}. "


def accuracy_tasks(records) -> list[str]:
    """Tasks with an `acc` metric in any record: the paper's in its order, then the others by name."""
    tasks = {key.partition("/")[0] for r in records for key in r["metrics"] if key.endswith("/acc")}
    return [t for t in PAPER_TASKS if t in tasks] + sorted(tasks - set(PAPER_TASKS))


def bits_label(record) -> str:
    """W-A-KV, with the options that change the model (`4g128-8-4k`; older result files have none)."""
    bits = record["bits"]
    return record.get("label") or f"{bits['w']}-{bits['a']}-{bits['kv']}"


def row_label(record) -> str:
    return f"{METHOD_LABELS[record['method']]} {bits_label(record)}"


def sort_records(records) -> list[dict]:
    """By model (first seen), then FP first, higher bits first, then RTN, GPTQ, SmoothQuant, QAT
    within the same bits."""
    model_order = {model: i for i, model in reversed(list(enumerate(r["model"] for r in records)))}
    return sorted(records, key=lambda r: (model_order[r["model"]], r["method"] != "fp",
                                          tuple(-r["bits"][k] for k in ("w", "a", "kv")), METHOD_ORDER[r["method"]]))


def build_table(records) -> tuple[list[str], list[list[str]]]:
    """Markdown-ready header and rows (strings) from result records."""
    records = sort_records(records)
    tasks = accuracy_tasks(records)
    others = [column for column in OTHER_COLUMNS if any(column[0] in r["metrics"] for r in records)]
    several_models = len({r["model"] for r in records}) > 1
    header = (["Model"] if several_models else []) + ["Method", "#Bits (W-A-KV)"]
    header += [TASK_LABELS.get(t, t) for t in tasks] + (["Avg."] if tasks else []) + [c[1] for c in others]
    rows = []
    for record in records:
        metrics = record["metrics"]
        accuracies = [metrics.get(f"{t}/acc") for t in tasks]
        present = [100 * a for a in accuracies if a is not None]
        row = ([record["model"]] if several_models else []) + [METHOD_LABELS[record["method"]], bits_label(record)]
        row += [MISSING if a is None else ACCURACY_FORMAT.format(100 * a) for a in accuracies]
        if tasks:  # an average over fewer tasks than the other rows would not be comparable
            row.append(ACCURACY_FORMAT.format(sum(present) / len(present)) if len(present) == len(tasks) else MISSING)
        row += [MISSING if key not in metrics else fmt.format(scale * metrics[key]) for key, _, scale, fmt in others]
        rows.append(row)
    return header, rows


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def write_markdown(records, path: Path, heldout: str = "") -> None:
    header, rows = build_table(records)
    notes = ("Accuracies (%) are lm-eval `acc`, zero-shot; Avg. is their mean (– where a task is missing). "
             if accuracy_tasks(records) else "")
    notes += heldout + ("Text ppl: perplexity on the evaluation text; KL to teacher: mean per-token KL(teacher || "
                        "model) in nats on held-out sequences.")
    sources = "\n".join(f"- {row_label(r)}: `{r['path']}` ({r.get('checkpoint', r['model'])})"
                        for r in sort_records(records))
    path.write_text(f"# Results\n\n{markdown_table(header, rows)}\n{notes}\n\nSources:\n{sources}\n")


def plot(records, path: Path) -> None:
    """One panel of grouped bars for the accuracy tasks (and their average), one panel per other metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = sort_records(records)
    several_models = len({r["model"] for r in records}) > 1
    labels = [(f"{r['model']} " if several_models else "") + row_label(r) for r in records]
    tasks = accuracy_tasks(records)
    others = [column for column in OTHER_COLUMNS if any(column[0] in r["metrics"] for r in records)]
    panels = (1 if tasks else 0) + len(others)
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 1.2 * len(tasks) + 2) + 3 * len(others), 4), squeeze=False,
                             gridspec_kw={"width_ratios": ([max(2, len(tasks) + 1) / 2] if tasks else []) + [1] * len(others)})
    axes = list(axes[0])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / len(records)
    if tasks:
        ax = axes.pop(0)
        names = [TASK_LABELS.get(t, t) for t in tasks] + ["Avg."]
        for i, record in enumerate(records):
            accuracies = [record["metrics"].get(f"{t}/acc") for t in tasks]
            present = [a for a in accuracies if a is not None]
            values = [100 * (a if a is not None else float("nan")) for a in accuracies]
            values.append(100 * sum(present) / len(present) if len(present) == len(tasks) else float("nan"))
            ax.bar([x + (i - (len(records) - 1) / 2) * width for x in range(len(names))], values, width,
                   label=labels[i], color=colors[i % len(colors)])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Zero-shot accuracy")
    for ax, (key, title, scale, _) in zip(axes, others):
        values = [scale * r["metrics"].get(key, float("nan")) for r in records]
        ax.bar(range(len(records)), values, color=[colors[i % len(colors)] for i in range(len(records))])
        ax.set_xticks(range(len(records)), labels, rotation=30, ha="right")
        ax.set_title(title)
    handles = [matplotlib.patches.Patch(color=colors[i % len(colors)], label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(records, out: Path, allow_mixed_heldout: bool = False) -> Path:
    """results.md and results.png in `out`; returns the markdown file."""
    heldout = heldout_note(records, allow_mixed_heldout)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(records, out / "results.md", heldout)
    plot(records, out / "results.png")
    logger.info("Wrote %s and %s", out / "results.md", out / "results.png")
    return out / "results.md"
