"""scripts/compare.py (utils.report.compare): the table holds the numbers of the result files, and a PNG is written."""
import json

import pytest

from conftest import load_script

main = load_script("compare").main

RESULTS = {
    "qat.json": {"method": "qat", "bits": {"w": 4, "a": 8, "kv": 4}, "model": "m",
                 "metrics": {"boolq/acc": 0.6312, "piqa/acc": 0.7048, "my_task/acc": 0.5, "perplexity": 14.287,
                             "kl_to_teacher": 0.0831, "top1_agreement": 0.8712, "piqa/acc_stderr": 0.01}},
    "fp.json": {"method": "fp", "bits": {"w": 16, "a": 16, "kv": 16}, "model": "m",
                "metrics": {"boolq/acc": 0.6804, "piqa/acc": 0.7451, "my_task/acc": 0.55, "perplexity": 12.5}},
    "rtn.json": {"method": "rtn", "bits": {"w": 4, "a": 8, "kv": 4}, "model": "m",
                 "metrics": {"boolq/acc": 0.5022, "piqa/acc": 0.6159, "perplexity": 31.02,
                             "kl_to_teacher": 0.7346, "top1_agreement": 0.6021}},
}


def write_results(directory):
    paths = []
    for name, record in RESULTS.items():
        (directory / name).write_text(json.dumps(record))
        paths.append(str(directory / name))
    return paths


def read_table(path):
    """The markdown table as {row label: {column: cell}}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[f"{cells['Method']} {cells['#Bits (W-A-KV)']}"] = cells
    return header, rows


def test_table_numbers_equal_the_result_files_and_png_is_written(tmp_path, capsys):
    main(write_results(tmp_path) + ["--out", str(tmp_path / "report")])
    header, rows = read_table(tmp_path / "report" / "results.md")

    assert list(rows) == ["FP 16-16-16", "RTN 4-8-4", "QAT 4-8-4"]  # the paper's order, whatever the input order
    assert header[:5] == ["Method", "#Bits (W-A-KV)", "BoolQ", "PIQA", "my_task"]
    columns = {"BoolQ": ("boolq/acc", 100), "PIQA": ("piqa/acc", 100), "my_task": ("my_task/acc", 100),
               "Text ppl": ("perplexity", 1), "KL to teacher": ("kl_to_teacher", 1),
               "Top-1 agree. (%)": ("top1_agreement", 100)}
    for label, record in zip(rows, (RESULTS["fp.json"], RESULTS["rtn.json"], RESULTS["qat.json"])):
        for column, (key, scale) in columns.items():
            cell = rows[label][column]
            if key in record["metrics"]:
                decimals = len(cell.partition(".")[2])
                assert float(cell) == pytest.approx(scale * record["metrics"][key], abs=0.51 * 10 ** -decimals)
            else:
                assert cell == "–"
        accuracies = [100 * v for k, v in record["metrics"].items() if k.endswith("/acc")]
        if len(accuracies) == 3:
            assert float(rows[label]["Avg."]) == pytest.approx(sum(accuracies) / 3, abs=0.051)
        else:  # RTN lacks my_task: no average over fewer tasks than the other rows
            assert rows[label]["Avg."] == "–"
    assert "stderr" not in " ".join(header)

    png = (tmp_path / "report" / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "| QAT | 4-8-4 |" in capsys.readouterr().out


def test_several_models_get_a_model_column(tmp_path):
    paths = write_results(tmp_path)
    other = dict(RESULTS["fp.json"], model="bigger")
    (tmp_path / "other.json").write_text(json.dumps(other))
    main(paths + [str(tmp_path / "other.json"), "--out", str(tmp_path)])
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[2].startswith("| Model | Method |")
    assert [line.split("|")[1].strip() for line in lines[4:8]] == ["m", "m", "m", "bigger"]


def test_bad_result_file_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"method": "gptq", "bits": {}, "metrics": {}}))
    with pytest.raises(SystemExit, match="not a result file of scripts/evaluate.py"):
        main([str(tmp_path / "bad.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing.json"), "--out", str(tmp_path)])


def test_rows_of_the_same_bits_with_other_options_stay_apart(tmp_path):
    paths = write_results(tmp_path)
    grouped = dict(RESULTS["rtn.json"], label="4g64-8-4k", metrics={"perplexity": 25.0})
    (tmp_path / "grouped.json").write_text(json.dumps(grouped))
    main(paths + [str(tmp_path / "grouped.json"), "--out", str(tmp_path)])
    _, rows = read_table(tmp_path / "results.md")
    assert rows["RTN 4-8-4"]["Text ppl"] == "31.02" and rows["RTN 4g64-8-4k"]["Text ppl"] == "25.00"


def test_a_directory_stands_for_its_result_files(tmp_path):
    (tmp_path / "results").mkdir()
    write_results(tmp_path / "results")
    main([str(tmp_path / "results") + "/", "--out", str(tmp_path / "report")])
    _, rows = read_table(tmp_path / "report" / "results.md")
    assert list(rows) == ["FP 16-16-16", "RTN 4-8-4", "QAT 4-8-4"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty is a directory without \.json files; pass the result files"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "report")])


def test_held_out_metrics_of_different_held_out_files_are_refused_unless_allowed(tmp_path, capsys):
    """Each result records its --heldout file: one file is named under the table; two are refused (their numbers
    do not compare), or with --allow-mixed-heldout tabulated with a note saying which row used which file."""
    for name, heldout in (("rtn.json", "gen/heldout.jsonl"), ("qat.json", "gen/heldout.jsonl"),
                          ("fp.json", None)):
        (tmp_path / name).write_text(json.dumps(dict(RESULTS[name], settings={"heldout": heldout})))
    paths = [str(tmp_path / name) for name in RESULTS]
    main(paths + ["--out", str(tmp_path / "same")])
    notes = (tmp_path / "same" / "results.md").read_text()
    assert "Held-out ppl, KL to teacher and top-1: on `gen/heldout.jsonl`." in notes

    moved = dict(RESULTS["qat.json"], settings={"heldout": "other/heldout.jsonl"})
    (tmp_path / "qat.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit) as refused:
        main(paths + ["--out", str(tmp_path / "mixed")])
    assert refused.value.code == 2 and not (tmp_path / "mixed").exists()
    assert capsys.readouterr().err == (
        "compare.py: error: the held-out metrics come from 2 different --heldout files (`gen/heldout.jsonl` for "
        "RTN 4-8-4; `other/heldout.jsonl` for QAT 4-8-4); evaluate every model on the same file, or pass "
        "--allow-mixed-heldout to show them with a note\n")
    main(paths + ["--out", str(tmp_path / "mixed"), "--allow-mixed-heldout"])
    assert ("Held-out metrics come from 2 different files and do not compare across them: `gen/heldout.jsonl` for "
            "RTN 4-8-4; `other/heldout.jsonl` for QAT 4-8-4.") in (tmp_path / "mixed" / "results.md").read_text()
