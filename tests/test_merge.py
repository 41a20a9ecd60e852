"""merge_gen_data: validation, duplicates, mixed teachers, overwrite protection, held-out start tokens."""
import json

import numpy as np
import pytest

import merge_gen_data
from utils.data.merge import (MixedSettingsError, MixedTeachersError, find_shard_files, heldout_start_tokens,
                              merge_shards)
from utils.data.records import SequenceRecord, TeacherIdentity
from utils.data.sampler import SamplingConfig
from utils.data.teacher_topk import SequenceTopK, append_rows, open_teacher_topk, side_file
from utils.safety import file_sha256

TEACHER = str(TeacherIdentity("tiny", 128, "abc"))
SAMPLING = SamplingConfig().describe()


def line(ids, teacher=TEACHER, greedy=3, **changes):
    """A shard line as generate_data.py writes it, with `changes` (possibly invalid values) on top."""
    record = SequenceRecord([1], 1, 3, 0, 1, TeacherIdentity.parse(TEACHER), SAMPLING, "t")
    fields = {**json.loads(record.to_line()), "input_ids": ids, "start_token": ids[0] if ids else 0,
              "greedy_tokens": greedy, "teacher": teacher, **changes}
    return json.dumps(fields) + "\n"


def write_shards(directory, *shards):
    paths = []
    for index, lines in enumerate(shards):
        path = directory / f"shard-{index:02d}-of-{len(shards):02d}.jsonl"
        path.write_text("".join(lines))
        paths.append(path)
    return paths


def read_ids(path):
    return [json.loads(text)["input_ids"] for text in path.read_text().splitlines()]


def test_bad_and_duplicate_lines_are_skipped_and_reported(tmp_path):
    shards = write_shards(
        tmp_path,
        [line([5, 6, 7]), "{not json\n", line([8, 9]), line([]), line([10, 200])],
        [line([5, 6, 7]), line([11, 12], greedy="3"), line([13, 14, 15]), '{"text": "half a li'],
    )
    before = [p.read_bytes() for p in shards]
    report = merge_shards(shards, tmp_path / "all.jsonl")
    assert read_ids(tmp_path / "all.jsonl") == [[5, 6, 7], [8, 9], [13, 14, 15]]
    assert report.summary() == ("kept 3; 5 malformed (shard-00-of-02.jsonl:2, shard-00-of-02.jsonl:4, "
                                "shard-00-of-02.jsonl:5, shard-01-of-02.jsonl:2, shard-01-of-02.jsonl:4); "
                                "1 duplicates")
    assert [p.read_bytes() for p in shards] == before  # shards are never changed
    assert report.train.describe() == "3 sequences, 8 tokens, length mean 2.7 min 2 max 3, 3 distinct start tokens"


def test_out_of_vocabulary_ids_are_malformed(tmp_path):
    shards = write_shards(tmp_path, [line([1, 127]), line([1, 128]), line([1, -1])])
    report = merge_shards(shards, tmp_path / "all.jsonl")
    assert report.kept == 1 and len(report.malformed) == 2


def test_mixed_teachers_are_refused(tmp_path):
    shards = write_shards(tmp_path, [line([5, 6])], [line([7, 8], teacher="other|vocab=128|tokenizer=def")])
    with pytest.raises(MixedTeachersError, match="one teacher at a time"):
        merge_shards(shards, tmp_path / "all.jsonl")
    assert not list(tmp_path.glob("all.jsonl*"))


def test_existing_output_needs_force(tmp_path):
    shards = write_shards(tmp_path, [line([5, 6])])
    output = tmp_path / "all.jsonl"
    output.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="--force"):
        merge_shards(shards, output)
    assert output.read_text() == "keep me\n"
    merge_shards(shards, output, force=True)
    assert read_ids(output) == [[5, 6]]


def test_heldout_start_tokens_never_meet_training(tmp_path):
    lines = [line([start, step, greedy], greedy=greedy) for start in range(20, 40) for greedy in (3, 4) for step in (1, 2)]
    shards = write_shards(tmp_path, lines[:30], lines[30:])
    report = merge_shards(shards, tmp_path / "all.jsonl", heldout=4, seed=1)
    train = {ids[0] for ids in read_ids(tmp_path / "all.jsonl")}
    heldout = [ids[0] for ids in read_ids(tmp_path / "heldout.jsonl")]
    assert len(set(heldout)) == 4 and len(heldout) == 16 and not train & set(heldout)
    assert train | set(heldout) == set(range(20, 40))
    assert (report.kept, len(report.heldout.lengths)) == (80, 16)
    assert set(heldout) == heldout_start_tokens(set(range(20, 40)), 4, seed=1)  # chosen from tokens, not order
    with pytest.raises(ValueError, match="fewer than 20"):
        merge_shards(shards, tmp_path / "again" / "all.jsonl", heldout=20)


def test_shard_files_from_directories_globs_and_files(tmp_path):
    shards = write_shards(tmp_path, [line([5])], [line([6])])
    (tmp_path / "all.jsonl").write_text("")
    assert find_shard_files([str(tmp_path)]) == shards
    assert find_shard_files([str(tmp_path / "*.jsonl")], exclude=(tmp_path / "all.jsonl",)) == shards
    assert find_shard_files([str(shards[1]), str(tmp_path)]) == [shards[1], shards[0]]
    with pytest.raises(FileNotFoundError, match="gen_data"):
        find_shard_files([str(tmp_path / "nothing-*.jsonl")])


def test_command_line_prints_summary_and_statistics(tmp_path, capsys):
    write_shards(tmp_path, [line([5, 6]), line([5, 6]), "oops\n"], [line([7, 8, 9])])
    output = tmp_path / "all.jsonl"
    merge_gen_data.main([str(tmp_path), "--output", str(output)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "kept 2; 1 malformed (shard-00-of-02.jsonl:3); 1 duplicates"
    assert "2 sequences, 5 tokens" in printed[1] and TEACHER in printed[1]
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        merge_gen_data.main([str(tmp_path), "--output", str(output)])
    with pytest.raises(SystemExit, match="no shard files"):
        merge_gen_data.main([str(tmp_path / "empty"), "--output", str(tmp_path / "x.jsonl")])


def test_shards_of_different_settings_are_refused_unless_allowed(tmp_path, capsys):
    other = SamplingConfig(max_length=64, seed=1).describe()
    shards = write_shards(tmp_path, [line([5, 6])], [line([7, 8], sampling=other)])
    with pytest.raises(MixedSettingsError, match="--allow-mixed-settings"):
        merge_shards(shards, tmp_path / "all.jsonl")
    assert not list(tmp_path.glob("all.jsonl*"))
    merge_gen_data.main([str(tmp_path), "--output", str(tmp_path / "all.jsonl"), "--allow-mixed-settings"])
    assert read_ids(tmp_path / "all.jsonl") == [[5, 6], [7, 8]]
    assert other in capsys.readouterr().out


@pytest.mark.parametrize("inputs", [["{dir}"], ["{dir}/shard-*.jsonl"], ["{dir}/shard-00-of-02.jsonl", "{dir}"]])
def test_an_output_that_is_one_of_the_input_shards_is_refused_before_anything_is_written(tmp_path, capsys, inputs):
    shards = write_shards(tmp_path, [line([5, 6])], [line([7, 8])])
    before = [shard.read_text() for shard in shards]
    with pytest.raises(SystemExit) as refused:
        merge_gen_data.main([item.format(dir=tmp_path) for item in inputs] + ["--output", str(shards[0]), "--force"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"merge_gen_data.py: error: {shards[0]} is one of the inputs and would be "
                                       "overwritten by this merge; pass an --output that is not an input, e.g. "
                                       f"{tmp_path / 'all.jsonl'}\n")
    assert [shard.read_text() for shard in shards] == before  # nothing lost


def test_an_earlier_merge_found_by_a_glob_is_left_out_but_named_as_an_input_is_refused(tmp_path):
    write_shards(tmp_path, [line([5, 6])], [line([7, 8])])
    output = tmp_path / "all.jsonl"
    merge_gen_data.main([str(tmp_path), "--output", str(output)])
    merge_gen_data.main([str(tmp_path / "*.jsonl"), "--output", str(output), "--force"])  # all.jsonl is no input
    assert read_ids(output) == [[5, 6], [7, 8]]
    with pytest.raises(SystemExit, match="all.jsonl is one of the inputs and would be overwritten by this merge; .* e.g. .*merged.jsonl"):
        merge_gen_data.main([str(output), str(tmp_path), "--output", str(output), "--force"])
    assert read_ids(output) == [[5, 6], [7, 8]]


# ---- teacher top-K rows (generate_data.py --save-topk) ----

def rows_for(ids, k=3):
    """Rows that name their sequence and position: id = 1000 * first token + position, log-prob = -position."""
    positions = np.arange(len(ids))
    return SequenceTopK(((1000 * ids[0] + positions)[:, None] + np.arange(k)).astype(np.int32),
                        np.repeat(-positions[:, None].astype(np.float32), k, axis=1))


def topk_shard(path, sequences, k=3, tail=0, **changes):
    """A shard of `sequences` with their rows in its side file, as generate_data.py --save-topk k (--save-tail tail)
    writes it."""
    lines, row = [], 0
    with side_file(path).open("wb") as out:
        for ids in sequences:
            append_rows(out, [rows_for(ids, k + tail)], k + tail)
            lines.append(line(ids, topk=[k, row, tail] if tail else [k, row], **changes))
            row += len(ids)
    path.write_text("".join(lines))
    return path


def test_merged_stores_hold_the_kept_lines_rows_in_their_order(tmp_path):
    first = topk_shard(tmp_path / "shard-00-of-02.jsonl", [[start, 5, 6][:2 + start % 2] for start in range(20, 30)])
    # [21, 5, 6] repeats a line of the first shard: a duplicate, whose rows are not copied
    second = topk_shard(tmp_path / "shard-01-of-02.jsonl", [[21, 5, 6]] + [[start, 7] for start in range(30, 34)])
    report = merge_shards([first, second], tmp_path / "all.jsonl", heldout=3, seed=0)
    assert report.topk == 3 and report.duplicates == 1
    for name in ("all.jsonl", "heldout.jsonl"):
        path = tmp_path / name
        sequences = read_ids(path)
        store = open_teacher_topk(path, file_sha256(path), sum(map(len, sequences)), len(sequences))
        expected = [rows_for(ids) for ids in sequences]
        assert (store.ids[:] == np.concatenate([rows.ids for rows in expected])).all()
        assert (store.logprobs[:] == np.concatenate([rows.logprobs for rows in expected])).all()
    (tmp_path / "all.jsonl").write_text("[1, 2]\n")  # edited after the merge: its store no longer belongs to it
    with pytest.raises(ValueError, match="belongs to another version of .* merge it again"):
        open_teacher_topk(tmp_path / "all.jsonl", file_sha256(tmp_path / "all.jsonl"), 29, 14)


def test_tail_samples_travel_after_the_top_k_columns_into_the_store(tmp_path):
    sequences = [[20, 5, 6], [21, 5]]
    shard = topk_shard(tmp_path / "shard-00-of-01.jsonl", sequences, k=3, tail=2)
    report = merge_shards([shard], tmp_path / "all.jsonl")
    assert (report.topk, report.tail) == (3, 2)
    store = open_teacher_topk(tmp_path / "all.jsonl", file_sha256(tmp_path / "all.jsonl"), 5, 2)
    assert (store.k, store.tail, store.width) == (3, 2, 5)
    expected = np.concatenate([rows_for(ids, 5).ids for ids in sequences])
    assert (store.ids[:] == expected).all()


def test_shards_with_and_without_rows_or_with_another_k_are_not_merged_into_one_store(tmp_path):
    with_rows = topk_shard(tmp_path / "a.jsonl", [[20, 5], [21, 5]])
    other_k = topk_shard(tmp_path / "b.jsonl", [[22, 5]], k=4)
    with_tail = topk_shard(tmp_path / "c.jsonl", [[24, 5]], tail=2)
    (tmp_path / "plain").mkdir()
    without = write_shards(tmp_path / "plain", [line([23, 5])])[0]
    for shards, message in (([with_rows, without], "has no teacher rows but .* top-3"),
                            ([with_rows, other_k], "has top-4 teacher rows but .* top-3"),
                            ([with_rows, with_tail], r"has top-3 \+ 2 tail teacher rows but .* top-3;")):
        with pytest.raises(MixedSettingsError, match=message + ".*one --save-topk and --save-tail at a time"):
            merge_shards(shards, tmp_path / "all.jsonl", force=True)
    merge_shards([with_rows], tmp_path / "all.jsonl")
    assert (tmp_path / "all.jsonl.topk" / "manifest.json").exists()
    merge_shards([without], tmp_path / "all.jsonl", force=True)  # a merge without rows leaves no old store behind
    assert not (tmp_path / "all.jsonl.topk").exists()
