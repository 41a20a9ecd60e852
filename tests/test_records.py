"""utils/data/records.py: the one reader and writer of the .jsonl record and the teacher identity."""
import json

import pytest

from utils.data.records import SequenceRecord, TeacherIdentity, read_sequence

TEACHER = TeacherIdentity("SmolLM2-135M-Instruct", 128, "0123456789ab")


def test_identity_string_is_the_on_disk_format_and_parses_back():
    assert str(TEACHER) == "SmolLM2-135M-Instruct|vocab=128|tokenizer=0123456789ab"
    assert TeacherIdentity.parse(str(TEACHER)) == TEACHER
    assert TeacherIdentity.parse("/models/a|b|vocab=7|tokenizer=x") == TeacherIdentity("/models/a|b", 7, "x")
    for bad in ("tiny", "tiny|vocab=x|tokenizer=y", "tiny|tokenizer=y|vocab=7", 7):
        with pytest.raises(ValueError, match="NAME\\|vocab=N\\|tokenizer=HASH"):
            TeacherIdentity.parse(bad)


def test_same_token_ids_ignores_the_name():
    assert TEACHER.same_token_ids(TeacherIdentity("/elsewhere/smol", 128, "0123456789ab"))
    assert not TEACHER.same_token_ids(TeacherIdentity("SmolLM2-135M-Instruct", 129, "0123456789ab"))
    assert not TEACHER.same_token_ids(TeacherIdentity("SmolLM2-135M-Instruct", 128, "ffffffffffff"))


def test_record_round_trips_through_a_line():
    record = SequenceRecord([5, 6, 7], 5, 3, 2, 8, TEACHER, "greedy=3,4,5 max_length=16", "a b c")
    line = record.to_line()
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert list(json.loads(line)) == ["text", "input_ids", "start_token", "greedy_tokens", "shard", "num_shards",
                                      "teacher", "sampling"]
    assert SequenceRecord.from_line(line) == record


@pytest.mark.parametrize("change,message", [
    ({"sampling": None}, "'sampling' missing"), ({"num_shards": "1"}, "'num_shards' missing or not int"),
    ({"input_ids": [5, 128]}, "outside the vocabulary"), ({"input_ids": [6, 7]}, "do not begin with start_token"),
    ({"teacher": "tiny"}, "NAME\\|vocab"), ({"shard": True}, "'shard' missing or not int")])
def test_a_line_with_a_bad_field_says_which(change, message):
    fields = {**json.loads(SequenceRecord([5, 6], 5, 3, 0, 1, TEACHER, "s").to_line()), **change}
    with pytest.raises(ValueError, match=message):
        SequenceRecord.from_line(json.dumps(fields))


def test_training_lines_need_only_ids_or_text():
    assert read_sequence('{"input_ids": [1, 2]}') == ([1, 2], None)
    assert read_sequence(json.dumps({"input_ids": [3], "teacher": str(TEACHER)})) == ([3], TEACHER)
    assert read_sequence('{"text": "ab"}', tokenizer=lambda text: {"input_ids": [len(text)]}) == ([2], None)
    with pytest.raises(ValueError, match="outside the vocabulary \\(0..127\\)"):
        read_sequence('{"input_ids": [1, 128]}', vocab_size=128)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        read_sequence('{"input_ids": [-1]}')
