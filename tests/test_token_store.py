"""The token store: built once beside its .jsonl, reused while the source is unchanged, never trusted half-built."""
import fcntl
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from utils.data.dataset import TokenSequenceDataset
from utils.data.token_store import MANIFEST, TOKENS, open_token_store, store_directory

REPO = Path(__file__).resolve().parents[1]


def write_sequences(path, sequences):
    path.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in sequences))
    return path


def items(dataset):
    return [item["input_ids"] for item in dataset]


def never_read():
    raise AssertionError("the store was built again")
    yield


@pytest.fixture
def data(tmp_path):
    return write_sequences(tmp_path / "d.jsonl", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])


def leftovers(data):
    return sorted(path.name for path in data.parent.glob(data.name + ".tokens.tmp-*"))


def test_an_unchanged_source_reuses_the_store(data):
    first = TokenSequenceDataset(data, max_length=8)
    assert first.store.built and items(first) == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    second = TokenSequenceDataset(data, max_length=3)
    assert not second.store.built and items(second) == [[1, 2, 3], [4, 5], [6, 7, 8]]
    reused = open_token_store(data, never_read(), None, first.store.manifest["built_for"])
    assert len(reused) == 3


def test_a_changed_source_is_built_again(data):
    TokenSequenceDataset(data, max_length=8)
    write_sequences(data, [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    grown = TokenSequenceDataset(data, max_length=8)
    assert grown.store.built and items(grown)[-1] == [10]

    stat = data.stat()
    data.write_text(data.read_text().replace("10", "11"))  # the same size, in place
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    edited = TokenSequenceDataset(data, max_length=8)
    assert edited.store.built and items(edited)[-1] == [11]


def test_a_touched_or_copied_source_with_the_same_bytes_is_reused(data):
    TokenSequenceDataset(data, max_length=8)
    later = data.stat().st_mtime_ns + 10**9
    os.utime(data, ns=(later, later))
    touched = TokenSequenceDataset(data, max_length=8)
    assert not touched.store.built and items(touched) == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert touched.store.manifest["source"]["mtime_ns"] == later  # recorded: the next check skips the hash


def test_a_store_checked_for_another_vocabulary_is_checked_again(data):
    assert TokenSequenceDataset(data, max_length=8).store.built
    with pytest.raises(ValueError, match=r"d\.jsonl:2 .*token id 5 is outside the vocabulary \(0..4\)"):
        TokenSequenceDataset(data, max_length=8, vocab_size=5)
    assert TokenSequenceDataset(data, max_length=8, vocab_size=10).store.built


def drop_manifest(store):
    (store / MANIFEST).unlink()


def garble_manifest(store):
    (store / MANIFEST).write_text('{"format": 1, "dtype": "<u4", "tok')


def truncate_tokens(store):
    with (store / TOKENS).open("r+b") as f:
        f.truncate(4)


def killed_before_the_rename(store):
    os.rename(store, store.with_name(store.name + ".tmp-killed"))


@pytest.mark.parametrize("damage", [drop_manifest, garble_manifest, truncate_tokens, killed_before_the_rename])
def test_a_partial_store_is_built_again_not_trusted(data, damage):
    TokenSequenceDataset(data, max_length=8)
    damage(store_directory(data))
    again = TokenSequenceDataset(data, max_length=8)
    assert again.store.built and items(again) == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert leftovers(data) == []


def test_a_failed_build_leaves_no_store(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [1]}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2 "):
        TokenSequenceDataset(data, max_length=8)
    assert not store_directory(data).exists() and leftovers(data) == []


def test_a_pickled_dataset_carries_the_path_not_the_tokens(tmp_path):
    data = write_sequences(tmp_path / "d.jsonl", [list(range(1000))] * 50)
    dataset = TokenSequenceDataset(data, max_length=1000)
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 2000  # 50,000 tokens would take 100 kB
    assert items(pickle.loads(pickled)) == items(dataset)
    write_sequences(data, [[1, 2]])
    TokenSequenceDataset(data, max_length=8)
    with pytest.raises(RuntimeError, match="rebuilt while in use"):
        pickle.loads(pickled)


OPEN_IN_A_PROCESS = """
import json, sys
from utils.data.dataset import TokenSequenceDataset
dataset = TokenSequenceDataset(sys.argv[1], max_length=4, packing=True)
print(json.dumps({"built": dataset.store.built, "items": [item["input_ids"] for item in dataset]}))
"""


def test_processes_starting_together_build_one_store(tmp_path):
    data = write_sequences(tmp_path / "d.jsonl", [list(range(start, start + 7)) for start in range(0, 700, 7)])
    lock_path = store_directory(data).with_name(data.name + ".tokens.lock")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both processes queue behind this, then race for the store
        processes = [subprocess.Popen([sys.executable, "-c", OPEN_IN_A_PROCESS, str(data)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(result["built"] for result in results) == [False, True]
    assert results[0]["items"] == results[1]["items"] == [list(range(i, i + 4)) for i in range(0, 700, 4)]
    assert leftovers(data) == []
