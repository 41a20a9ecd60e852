"""bench/gpu_check.sh, the prepared GPU check, on CPU with a tiny shape (a 2-layer hidden-64 LLaMA, 32 tokens; part
(d) loads the embedded SmolLM2-135M): every part gives a row of numbers, the table parses and lands in $OUT. A part
that fails or overruns its time limit gives a "failed" row instead of ending the check. No timings are asserted."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, load_script

PART_PREFIXES = ("(a)", "(b)", "(c)", "(d)")


gpu_check = load_script("gpu_check", "bench")


def table(text: str) -> list[list[str]]:
    """The Markdown table's rows as cells (pipes escaped as \\| stay inside their cell)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def number(text: str) -> float:
    return float(re.match(r"-?\d+(\.\d+)?(e[+-]?\d+)?", text).group())


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, out


def test_every_part_prints_a_row_of_numbers(tiny_check):
    stdout, _ = tiny_check
    header, separator, *rows = table(stdout)
    assert header == list(gpu_check.COLUMNS)
    assert separator == ["---"] * len(gpu_check.COLUMNS)
    assert all(len(row) == len(header) for row in rows)
    assert not [row for row in rows if any("failed" in cell for cell in row)]
    for prefix in PART_PREFIXES:
        part_rows = [row for row in rows if row[0].startswith(prefix)]
        assert part_rows, f"no row for part {prefix}"
        for check, _, measured, _, ratio, verdict in part_rows:
            assert number(measured) >= 0, check
            if prefix != "(d)":
                assert number(ratio) > 0, check
    differences = [number(row[2]) for row in rows if row[0].startswith("(d)")]
    assert differences == [0.0, 0.0, 0.0]  # CPU against CPU: the same step to the bit


def test_results_are_written_to_out(tiny_check):
    stdout, out = tiny_check
    assert table((out / "gpu_check.md").read_text()) == table(stdout)
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["settings"] == {"device": "cpu", "tiny": True, "layers": None, "seq_len": 32, "steps": 5,
                                 "warmup": 2}
    assert set(saved["results"]) == set(gpu_check.PARTS)
    assert not [result for result in saved["results"].values() if "error" in result]
    assert len(saved["results"]["memory"]["step_seconds"]) == 5
    assert all((out / f"gpu_check-{part}.log").is_file() for part in gpu_check.PARTS)


def test_a_part_over_its_time_limit_fails_alone():
    settings = {"device": "cpu", "tiny": True, "layers": None, "seq_len": 32, "steps": 1, "warmup": 0}
    assert gpu_check.run_part("rotation", settings, 0.5, None) == {
        "error": "timed out after 0.5 s (limit of this part)"}


def test_failed_and_unreadable_parts_give_failed_rows():
    settings = {"device": "cuda", "seq_len": 2048, "warmup": 2}
    plain_run = {"device": "GPU", "model": "LLaMA-7B", "layers": 20, "all_layers": 32, "fsdp": True,
                 "step_seconds": [1.0, 1.2, 1.1]}
    results = {"memory": {"error": "torch.OutOfMemoryError: CUDA out of memory"}, "step_time": plain_run,
               "rotation": {"device": "GPU", "width": 11008}}
    rows = table(gpu_check.report(results, settings, {part: 1.0 for part in results}))[2:]
    assert rows[0][:3] == ["(a) peak memory", "", "failed: torch.OutOfMemoryError: CUDA out of memory"]
    assert rows[1][0] == "(b) step time, 16-16-16" and number(rows[1][2]) == 1.1
    assert "CUDA out of memory" in rows[1][3]  # no ratio without (a)'s W4A8KV4 steps, and it says why
    assert rows[2][2].startswith("failed: unreadable result (KeyError")


def test_the_failure_reason_is_the_exception_a_traceback_ends_with():
    stderr = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\nwarning\n"
    assert gpu_check.error_line(stderr) == "torch.OutOfMemoryError: CUDA out of memory."
    assert gpu_check.error_line("Killed\n") == "Killed"
