"""Glue to the lm-eval harness: evaluate an already-loaded (and possibly quantized) model object.

The model is wrapped in `lm_eval.models.huggingface.HFLM` as it is, so the harness runs exactly the modules
it is given: QuantLinear layers fake-quantize weights, activations and KV during the evaluation, and the
quantized modules are logged first so a run's log shows what was active.

Tasks from `include_path` (local task YAMLs) may give `data_files` relative to their YAML; they are
resolved here, so a task folder works from any working directory.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from models.quantize import QATConfig, quantized_modules
from utils.evaluation.tasks import DEFAULT_TASKS

logger = logging.getLogger(__name__)

DATA_HELP = ("the harness downloads task datasets from the Hugging Face hub, so it needs network access, or a "
             "local copy: fill the datasets cache once with network and set HF_DATASETS_OFFLINE=1, or write a task "
             "YAML with `dataset_path: json` and local `data_files` and pass its folder with --include-path "
             "(example: tests/data/commonsense_mini.yaml)")


class HarnessDataError(OSError):
    """A task's dataset could not be loaded (typically: no network and no local copy)."""


def quantization_summary(model) -> list[str]:
    """One line per group of quantized modules with the same bits (grouped by module name, e.g. k_proj)."""
    groups = defaultdict(list)
    for name, module in quantized_modules(model).items():
        groups[(module.w_bits, module.w_group_size or 0, module.a_bits, module.out_bits)].append(name.rpartition(".")[2])
    if not groups:
        return ["no quantized modules: evaluating the model in full precision"]
    lines = []
    for (w_bits, group_size, a_bits, out_bits), names in sorted(groups.items()):
        kinds = ", ".join(dict.fromkeys(names))  # unique, in model order
        per_group = f" (per group of {group_size} columns)" if group_size else ""
        output = f", output (KV cache) {out_bits} bits" if out_bits != 16 else ""
        lines.append(f"{len(names)} x {kinds}: weights {w_bits} bits{per_group}, input activations {a_bits} bits{output}")
    settings = getattr(model.config, "llm_qat", None) or {}
    if settings.get("kv_placement") == "post_rope" and settings["kv_bits"] != 16:
        lines.append(f"keys after rotary embedding (KV cache): {settings['kv_bits']} bits per token")
    lines.append("full precision: embeddings, norms, lm_head")
    return lines


def log_quantization(model) -> None:
    settings = getattr(model.config, "llm_qat", None)
    header = (f"Quantization active during evaluation ({QATConfig(**settings).label()}):" if settings
              else "Quantization during evaluation:")
    logger.info(header)
    for line in quantization_summary(model):
        logger.info("  %s", line)


def build_lm(model, tokenizer, batch_size: int = 1, max_length: int | None = None):
    """An lm-eval `HFLM` around the model object itself (on its current device and dtype)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def task_manager_for(tasks: list[str], include_path: str | Path | None = None):
    """A TaskManager that knows every task in `tasks`. Indexing lm-eval's thousands of built-in YAMLs takes
    seconds, so when `include_path` alone has them all, only it is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include-path {include_path} is not a directory; pass the folder holding "
                                    "the task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}; check the names (`lm_eval ls tasks`) "
                         "or pass --include-path DIR holding their YAML files")
    return manager


def _resolve_data_files(data_files, base: Path):
    if isinstance(data_files, dict):
        return {split: _resolve_data_files(files, base) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [_resolve_data_files(files, base) for files in data_files]
    path = Path(data_files)
    return str(path if path.is_absolute() or "://" in str(data_files) else base / path)


def _task_spec(manager, task: str, include_path: str | Path | None):
    """The task's name, or, for a YAML under `include_path` with local `data_files`, its config with those
    files resolved against the YAML's folder (lm-eval itself would resolve them against the working directory)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task)
    yaml_path = getattr(entry, "yaml_path", None)
    if include_path is None or yaml_path is None or Path(include_path).resolve() not in Path(yaml_path).resolve().parents:
        return task
    config = load_yaml(yaml_path, resolve_func=True)
    dataset_kwargs = config.get("dataset_kwargs") or {}
    if "data_files" not in dataset_kwargs:
        return task
    config["dataset_kwargs"] = {**dataset_kwargs,
                                "data_files": _resolve_data_files(dataset_kwargs["data_files"], Path(yaml_path).parent)}
    return config


def load_tasks(tasks: list[str], include_path: str | Path | None = None):
    """(task manager, loaded task objects); a dataset that cannot be loaded is a `HarnessDataError`."""
    manager = task_manager_for(tasks, include_path)
    loaded = []
    for task in tasks:
        try:
            loaded.extend(manager.load([_task_spec(manager, task, include_path)])["tasks"].values())
        except (ConnectionError, FileNotFoundError) as err:  # datasets raises these offline / for missing files
            raise HarnessDataError(f"lm-eval task '{task}' could not load its dataset ({err}); {DATA_HELP}") from None
    return manager, loaded


def tasks_loadable(tasks: list[str], include_path: str | Path | None = None) -> bool:
    """Whether every task's dataset loads here (network or a local copy): the table's choice of tasks."""
    try:
        load_tasks(tasks, include_path)
    except (HarnessDataError, ValueError) as err:
        logger.info("lm-eval tasks not available: %s", str(err).splitlines()[0][:200])
        return False
    return True


def run_harness(model, tokenizer, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                include_path: str | Path | None = None, limit: int | float | None = None, batch_size: int = 1,
                bootstrap_iters: int = 100000, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` on the model object, zero-shot (every task here defaults to it, as in the paper); returns lm-eval's result dict."""
    from lm_eval import simple_evaluate

    tasks = list(tasks)
    manager, loaded = load_tasks(tasks, include_path)
    log_quantization(model)
    logger.info("Running lm-eval on %s (limit %s, batch size %d)", ", ".join(tasks), limit, batch_size)
    return simple_evaluate(model=build_lm(model, tokenizer, batch_size), tasks=loaded, task_manager=manager,
                           limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": x, ...}}} as {"task/acc": x, ...} (numbers only; a filter
    other than "none" stays in the name)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
                flat[f"{task}/{name}"] = float(value)
    return flat
