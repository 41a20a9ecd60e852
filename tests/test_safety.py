"""What every stage shares (utils/safety.py): checks made before any long work, crash-safe writes, lock files."""
import fcntl

import pytest
from transformers import GPT2Config, PretrainedConfig

from utils.safety import atomic_file, check_positions, file_lock, remove_leftovers, staged_directory


def test_sequences_past_the_models_positions_are_refused_where_the_config_says_how_many():
    check_positions(16, "--max-length", GPT2Config(n_positions=16))  # GPT-2 calls it n_positions
    with pytest.raises(ValueError, match=r"^--max-length 17 is longer than the model's 16 positions "
                                         r"\(n_positions in its config.json\); pass --max-length 16 or less$"):
        check_positions(17, "--max-length", GPT2Config(n_positions=16))
    check_positions(10**6, "--max-length", PretrainedConfig())  # no such field: nothing to check against


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as out:
        out.write("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old" and [path.name for path in tmp_path.iterdir()] == ["result.json"]
    with atomic_file(target) as out:
        out.write("new")
    assert target.read_text() == "new" and [path.name for path in tmp_path.iterdir()] == ["result.json"]


def test_a_directory_appears_whole_and_replaces_an_old_one_only_when_asked(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "part").write_text("1")
        raise RuntimeError("killed while writing")
    assert not list(tmp_path.iterdir())
    with staged_directory(target) as staging:
        (staging / "part").write_text("1")
    with pytest.raises(OSError), staged_directory(target) as staging:
        (staging / "part").write_text("2")
    with staged_directory(target, replace=True) as staging:
        (staging / "part").write_text("3")
    assert (target / "part").read_text() == "3" and [path.name for path in tmp_path.iterdir()] == ["store"]


def test_what_a_killed_writer_left_is_removed(tmp_path):
    target = tmp_path / "store"
    for leftover in ("store.tmp-a1", "store.tmp-b2/part"):
        (tmp_path / leftover).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / leftover).write_text("")
    (tmp_path / "other.tmp-c3").write_text("")
    remove_leftovers(target)
    assert [path.name for path in tmp_path.iterdir()] == ["other.tmp-c3"]


def test_a_held_lock_refuses_with_the_message_given(tmp_path):
    path = tmp_path / "shard.lock"
    with path.open("a") as other, pytest.raises(ValueError, match="^someone else writes it$"):
        fcntl.flock(other, fcntl.LOCK_EX)  # another process holds it
        with file_lock(path, busy="someone else writes it"):
            pass
    with file_lock(path, busy="someone else writes it"):  # released: taken at once
        assert path.exists()
