"""bench/bench_vllm.py refuses bad input in one line before it exports or times anything, and never writes into a
--work-dir it did not create or created for another model. No timings here: the bench itself is run by hand."""
import sys

import pytest

from conftest import load_script, save_tiny_teacher


bench_vllm = load_script("bench_vllm", "bench")


@pytest.mark.parametrize("flags, error", [
    (["--rows", "w4a16/float32"], "--rows w4a16/float32: vLLM's int4 kernels do not run in float32 .* pass w4a16/bfloat16"),
    (["--rows", "w8a8"], "--rows w8a8: write SCHEME/DTYPE"),
    (["--generate", "1"], "--batch, .* --generate at least 2"),
    (["--vllm-python", "no-such-python"], "no-such-python does not exist: run make vllm"),
])
def test_bad_flags_are_refused_in_one_line(tmp_path, flags, error):
    with pytest.raises(SystemExit, match=f"bench_vllm.py: error: {error}"):
        bench_vllm.main(["--work-dir", str(tmp_path / "work"), *flags])
    assert not (tmp_path / "work").exists()


def test_a_work_dir_of_someone_else_or_of_another_model_is_refused(tmp_path):
    model, other = save_tiny_teacher(tmp_path / "model"), save_tiny_teacher(tmp_path / "other")
    common = ["--vllm-python", sys.executable, "--rows", "fp/float32", "--prompt-len", "8", "--generate", "2"]
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--work-dir .* is not empty and this bench did not write it"):
        bench_vllm.main([*common, "--model", str(model), "--work-dir", str(users)])
    assert [path.name for path in users.iterdir()] == ["notes.txt"]

    claimed = bench_vllm.claim_work_dir(tmp_path / "work", str(model.resolve()))
    with pytest.raises(SystemExit, match="holds exports of another model"):
        bench_vllm.main([*common, "--model", str(other), "--work-dir", str(claimed)])
