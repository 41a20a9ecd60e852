"""The paper table (scripts/paper_table.py, utils/report/): table layout, a 2-row grid end to end on a tiny model
with caching, resumption and a failing cell (the llm-compressor baselines themselves: tests/test_baselines.py)."""
import csv
import json

import pytest

from conftest import load_script, save_tiny_teacher
from utils.report import cells
from utils.report.methods import row_bits
from utils.report.table import grid_rows, write_ablation
from utils.safety import CommandError


def record(**metrics):
    return {"metrics": metrics}


def test_rows_parse_and_bad_rows_name_the_fix():
    assert row_bits("4-8-16") == (4, 8, 16)
    with pytest.raises(ValueError, match="W-A-KV bits such as 4-8-4"):
        row_bits("4-8")


def test_grid_table_has_a_column_per_method_and_metric_and_the_gap_qat_closes():
    fp, rtn, qat = record(heldout_perplexity=10.0), record(heldout_perplexity=30.0), record(heldout_perplexity=14.0)
    grid = {"4-8-4": {"fp": fp, "rtn": rtn, "gptq": "not installed", "smoothquant": "failed", "qat": qat},
            "4-16-16": {"fp": fp, "rtn": rtn, "gptq": "pending", "smoothquant": "n/a", "qat": rtn}}
    header, rows = grid_rows(grid)
    assert header == ["#Bits (W-A-KV)", "Held-out ppl: FP", "Held-out ppl: RTN", "Held-out ppl: GPTQ",
                      "Held-out ppl: SmoothQuant", "Held-out ppl: LLM-QAT", "QAT gap closed (held-out)"]
    assert rows[0] == ["4-8-4", "10.00", "30.00", "not installed", "failed", "14.00", "80%"]  # (30-14)/(30-10)
    assert rows[1][-3:] == ["n/a", "30.00", "0%"]


def test_rotated_methods_are_columns_with_their_own_share_of_the_unrotated_gap():
    fp, rtn, qat = record(heldout_perplexity=10.0), record(heldout_perplexity=30.0), record(heldout_perplexity=14.0)
    grid = {"4-4-4": {"fp": fp, "rtn": rtn, "gptq": "n/a", "smoothquant": "n/a", "qat": qat,
                      "rtn_rotated": record(heldout_perplexity=25.0), "qat_rotated": record(heldout_perplexity=12.0)}}
    header, rows = grid_rows(grid)
    assert header[-4:] == ["Held-out ppl: RTN + rotation", "Held-out ppl: LLM-QAT + rotation",
                           "QAT gap closed (held-out)", "QAT + rotation gap closed (held-out)"]
    assert rows[0][-4:] == ["25.00", "12.00", "80%", "90%"]  # (30-12)/(30-10): against the unrotated RTN


def test_ablation_table_rows_are_settings_with_their_gap(tmp_path):
    rows = {"FP": record(heldout_perplexity=10.0, top1_agreement=1.0), "RTN": record(heldout_perplexity=20.0),
            "Loss: next-token labels": record(heldout_perplexity=15.0, top1_agreement=0.5)}
    write_ablation(rows, tmp_path, "ablation", "notes")
    lines = (tmp_path / "ablation.md").read_text().splitlines()
    assert "| Loss: next-token labels | 15.00 | 50.0 | 50% |" in lines
    assert (tmp_path / "ablation.csv").read_text().splitlines()[0] == \
        "Setting,Held-out ppl,Top-1 agree. (%),Gap closed (held-out)"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def table_args(teacher, out, *extra):
    return ["--model", str(teacher), "--rows", "4-8-4", "8-8-16", "--out", str(out), "--num-start-tokens", "4",
            "--heldout-start-tokens", "1", "--seq-len", "16", "--tasks", "none", "--calibration-samples", "4", *extra]


def ran(output: str) -> list[str]:
    return [line.split(":")[0].removeprefix("[table] ") for line in output.splitlines() if line.endswith(")")
            and ": running (log" in line]


def test_two_row_grid_runs_caches_resumes_and_reports_a_failing_cell(tiny_teacher, tmp_path, capsys):
    """Baselines through a stand-in environment that has `llmcompressor` but whose runs fail: those cells say
    'failed' and the table is still written; a second call runs only what failed; a lost cell is run again."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *'import llmcompressor'*) exit 0;; esac\n"
                    "echo 'baseline.py: error: stand-in failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "table"
    paper_table = load_script("paper_table")
    paper_table.main(table_args(tiny_teacher, out, "--baseline-python", str(fake)))
    first = ran(capsys.readouterr().out)
    assert [name.rsplit("-", 1)[0] for name in first] == [
        "data-hybrid", "data-hybrid", "fp", "rtn-4-8-4", "rtn-8-8-16", "gptq-w4", "smoothquant", "gptq-w8",
        "qat-4-8-4", "qat-4-8-4", "qat-8-8-16", "qat-8-8-16"]
    table = (out / "table.md").read_text()
    assert "| 4-8-4 | " in table and "| 8-8-16 | " in table
    header, *rows = list(csv.reader((out / "table.csv").open()))
    assert header[0] == "#Bits (W-A-KV)" and {"Held-out ppl: FP", "Held-out ppl: RTN"} <= set(header)
    for row in rows:  # every metric's GPTQ and SmoothQuant column says so; the other methods have numbers
        cells = dict(zip(header, row))
        assert {cells[name] for name in header if name.endswith(("GPTQ", "SmoothQuant"))} == {"failed"}
        assert all(float(cells[name]) >= 0 for name in header if name.endswith(("RTN", "LLM-QAT")))
    assert (out / "table.png").is_file()

    paper_table.main(table_args(tiny_teacher, out, "--baseline-python", str(fake)))
    assert [name.rsplit("-", 1)[0] for name in ran(capsys.readouterr().out)] == ["gptq-w4", "smoothquant", "gptq-w8"]

    next((out / "cells").glob("rtn-8-8-16-*.json")).unlink()  # as if a run was killed before this cell
    paper_table.main(table_args(tiny_teacher, out, "--baseline-python", str(tmp_path / "missing")))
    output = capsys.readouterr().out
    assert [name.rsplit("-", 1)[0] for name in ran(output)] == ["rtn-8-8-16"]
    assert "not installed" in (out / "table.md").read_text()

    # A changed training setting retrains QAT only (new names), and nothing else.
    paper_table.main(table_args(tiny_teacher, out, "--baseline-python", str(tmp_path / "missing"),
                                "--learning-rate", "1e-3"))
    assert [name.rsplit("-", 1)[0] for name in ran(capsys.readouterr().out)] == \
        ["qat-4-8-4", "qat-4-8-4", "qat-8-8-16", "qat-8-8-16"]


def test_rotation_adds_rtn_and_qat_cells_and_the_users_quantizer_variables_do_not_leak_in(tiny_teacher, tmp_path,
                                                                                         capsys, monkeypatch):
    """--rotate adds RTN + rotation and LLM-QAT + rotation (keys after RoPE at KV4, as rotation needs); the plain QAT
    cell stays the paper's even when run_train.sh's option variables are set in the caller's environment."""
    for name, value in (("W_GROUP_SIZE", "8"), ("KV_PLACEMENT", "post_rope"), ("RECIPE", "deploy"), ("ROTATE", "random"),
                        ("SCHEME", "MXFP4"), ("KV_SCHEME", "FP8")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "table"
    load_script("paper_table").main(["--model", str(tiny_teacher), "--rows", "4-8-4", "--out", str(out),
                                     "--num-start-tokens", "2", "--heldout-start-tokens", "1", "--seq-len", "16",
                                     "--tasks", "none", "--baseline-python", str(tmp_path / "missing"),
                                     "--rotate", "hadamard"])
    assert [name.rsplit("-", 1)[0] for name in ran(capsys.readouterr().out)][-5:] == [
        "qat-4-8-4", "qat-4-8-4", "rtn-4-8-4-hadamard", "qat-4-8-4-hadamard", "qat-4-8-4-hadamard"]
    configs = {path.name.rsplit("-", 1)[0]: json.loads((path / "config.json").read_text())["llm_qat"]
               for path in (out / "models").iterdir()}
    assert {name: (c["rotate"], c["kv_placement"], c["recipe"], c["w_group_size"], c["scheme"], c["kv_scheme"])
            for name, c in configs.items()} == {"qat-4-8-4": ("none", "pre_rope", "paper", None, None, None),
                                                "qat-4-8-4-hadamard": ("hadamard", "post_rope", "paper", None, None, None)}
    rotated_rtn = json.loads(next((out / "cells").glob("rtn-4-8-4-hadamard-*.json")).read_text())
    assert rotated_rtn["label"] == "4-8-4k+hadamard"
    header = next(csv.reader((out / "table.csv").open()))
    assert "Held-out ppl: LLM-QAT + rotation" in header and "QAT + rotation gap closed (held-out)" in header


@pytest.mark.parametrize("extra, message", [
    (["--rows", "4-8"], "W-A-KV bits such as 4-8-4"),
    (["--rows", "4-8-1"], "bits"),
    (["--heldout-start-tokens", "4"], "leaves no training data"),
    (["--real-text", "missing.txt", "--ablations", "data"], "does not exist"),
    (["--epochs", "0"], "--epochs 0 (EPOCHS in paper_table.sh) trains nothing"),
    (["--learning-rate", "abc"], "--learning-rate 'abc' (LEARNING_RATE in paper_table.sh) is not a positive number"),
])
def test_bad_input_is_one_line_before_any_work(tiny_teacher, tmp_path, capsys, extra, message):
    out = tmp_path / "table"
    with pytest.raises(CommandError) as err:
        load_script("paper_table").main(table_args(tiny_teacher, out, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (out / "data").exists()


def test_cell_keys_follow_the_code_the_cells_run(tmp_path, monkeypatch):
    """A result computed before a code fix is not reused after it: the code is part of every cell's key. The
    fingerprint reads the code (entry points, models/, utils/, scripts/), not docs or tests."""
    for name in ("train.py", "models/quantize.py", "utils/data.py", "scripts/run_train.sh", "docs/NOTES.md",
                 "tests/test_x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    fingerprint = cells.code_fingerprint(tmp_path)
    for name in ("docs/NOTES.md", "tests/test_x.py"):
        (tmp_path / name).write_text("changed\n")
    assert cells.code_fingerprint(tmp_path) == fingerprint
    changed = set()
    for name in ("train.py", "models/quantize.py", "utils/data.py", "scripts/run_train.sh"):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "# a fix\n")
        changed.add(cells.code_fingerprint(tmp_path))
    assert fingerprint not in changed and len(changed) == 4

    key = cells.settings_key(bits="4-8-4", lr="3e-4")
    assert cells.settings_key(bits="4-8-4", lr="3e-4") == key  # unchanged code: the cell is reused
    monkeypatch.setattr(cells, "code_fingerprint", lambda: "after a fix")
    assert cells.settings_key(bits="4-8-4", lr="3e-4") != key


def test_ablations_train_on_each_data_source_and_loss_and_write_their_table(tiny_teacher, tmp_path, capsys):
    """Greedy, sampled and real-text data, and the next-token loss, each train once at the ablation bits; the
    hybrid / KD row is the grid's own cell (not trained again)."""
    real = tmp_path / "real.txt"
    real.write_text("The river starts as a thin stream high in the mountains and grows as it flows. " * 40)
    out = tmp_path / "table"
    load_script("paper_table").main(["--model", str(tiny_teacher), "--rows", "4-8-4", "--out", str(out),
                                     "--num-start-tokens", "2", "--heldout-start-tokens", "1", "--seq-len", "16",
                                     "--tasks", "none", "--baseline-python", str(tmp_path / "missing"),
                                     "--ablations", "data", "loss", "--real-text", str(real)])
    trained = [name.rsplit("-", 1)[0] for name in ran(capsys.readouterr().out) if name.startswith("qat-4-8-4")]
    assert trained == ["qat-4-8-4"] * 2 + ["qat-4-8-4"] * 2 * 3 + ["qat-4-8-4-ce"] * 2  # grid; 3 data; the loss
    greedy = [json.loads(line) for line in next((out / "data").glob("greedy-*")).joinpath("all.jsonl").open()]
    assert {record["greedy_tokens"] for record in greedy} == {16}
    real_lines = [json.loads(line) for line in next((out / "data").glob("real-*")).joinpath("all.jsonl").open()]
    assert {len(record["input_ids"]) for record in real_lines} == {16}
    rows = [line.split(" | ")[0].removeprefix("| ") for line in (out / "ablation.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Setting")]
    assert rows == ["FP", "RTN", "Data: generated, hybrid (paper)", "Data: generated, greedy",
                    "Data: generated, sampled", "Data: real text (real.txt)", "Loss: KD on logits (paper)",
                    "Loss: next-token labels"]
