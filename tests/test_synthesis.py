"""Data synthesis: hybrid greedy-then-sampled generation, start-token plans and shards, resumable shard files."""
import json
import sys
from argparse import Namespace
from dataclasses import replace

import numpy as np
import pytest
import torch

from generate_data import apply_preset
from utils.data.records import SequenceRecord, TeacherIdentity
from utils.data.sampler import (HFGenerator, SamplingConfig, generate_batch, sample_tail, sample_top_k,
                                stop_token_ids)
from utils.data.start_tokens import (choose_start_tokens, eligible_start_tokens, resolve_shard, shard_start_tokens,
                                     special_token_ids)
from utils.data.synthesis import read_finished, shard_path, synthesize_shard
from utils.data.teacher_topk import read_rows, side_file
from utils.data.vllm_engine import VLLM_BATCH_SIZE, VLLM_MEMORY_FRACTION, VLLMGenerator, engine_gpus
from utils.training.loading import load_tokenizer

TEACHER = TeacherIdentity("tiny", 128, "test")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def argmax_continuation(model, start_token, length):
    """Greedy decoding without a KV cache: the whole prefix through the model at every step."""
    ids = [start_token]
    with torch.no_grad():
        while len(ids) < length:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


# ---- the sampler ----

def sequences_of(model, *args, **kwargs):
    return generate_batch(model, *args, **kwargs)[0]


def test_greedy_prefix_is_the_argmax_continuation(tiny_llama):
    starts = [20, 31, 57]
    for greedy in (3, 5):
        sequences = sequences_of(tiny_llama, starts, greedy, SamplingConfig(max_length=9))
        for start, ids in zip(starts, sequences):
            assert len(ids) == 9
            assert ids[:greedy] == argmax_continuation(tiny_llama, start, greedy)


def test_sampled_tail_depends_on_the_seed_and_only_on_it(tiny_llama):
    starts = [20, 31, 57, 90]
    first, again, other = (sequences_of(tiny_llama, starts, 3, SamplingConfig(max_length=16, seed=seed))
                           for seed in (0, 0, 1))
    assert first == again
    assert [ids[:3] for ids in first] == [ids[:3] for ids in other]
    assert [ids[3:] for ids in first] != [ids[3:] for ids in other]


def test_batched_equals_one_at_a_time_for_greedy_only(tiny_llama):
    starts = [18, 25, 40, 77, 101]
    config = SamplingConfig(greedy_lengths=(12,), max_length=12)
    batched = sequences_of(tiny_llama, starts, 12, config)
    assert batched == [sequences_of(tiny_llama, [s], 12, config)[0] for s in starts]
    assert batched == [argmax_continuation(tiny_llama, s, 12) for s in starts]


def test_sampled_sequence_does_not_depend_on_its_batch(tiny_llama):
    config = SamplingConfig(max_length=14, seed=3)
    batched = sequences_of(tiny_llama, [18, 25, 40], 4, config)
    assert batched[1] == sequences_of(tiny_llama, [25], 4, config)[0]


def test_a_row_that_emits_a_stop_token_ends_and_the_others_go_on(tiny_llama):
    config = SamplingConfig(greedy_lengths=(8,), max_length=8)
    starts = [18, 25, 40]
    free = sequences_of(tiny_llama, starts, 8, config)
    stop = free[1][2]  # the middle row emits this as its third token
    stopped = sequences_of(tiny_llama, starts, 8, config, stop_tokens={stop})
    assert stopped[1] == free[1][:3]
    for before, after in zip(free, stopped):
        cut = next((i + 1 for i, t in enumerate(before) if i > 0 and t == stop), len(before))
        assert after == before[:cut]


def teacher_forced_log_probs(model, ids):
    """log softmax of the teacher's logits at every position of `ids`, in one forward without a KV cache."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def test_saved_top_k_rows_are_the_teachers_distribution_at_every_position(tiny_llama):
    config = SamplingConfig(max_length=12, seed=1, save_topk=5)
    starts = [18, 25, 40]
    sequences, topk = generate_batch(tiny_llama, starts, 4, config, stop_tokens={7, 9})
    assert sequences == sequences_of(tiny_llama, starts, 4, replace(config, save_topk=0))  # the same text
    for ids, rows in zip(sequences, topk):
        assert rows.ids.shape == rows.logprobs.shape == (len(ids), 5)
        reference = teacher_forced_log_probs(tiny_llama, ids)
        best = reference.topk(5, dim=-1)
        # row t: the distribution the token at t + 1 came from, most likely first
        torch.testing.assert_close(torch.from_numpy(rows.logprobs[:-1]).double(), best.values[:-1], atol=1e-5, rtol=0)
        assert (rows.ids[:-1] == best.indices[:-1].numpy()).all()
        assert (rows.ids[-1] == 0).all() and np.isneginf(rows.logprobs[-1]).all()  # never computed


def test_tail_samples_are_drawn_outside_the_top_k_with_the_teachers_log_probs(tiny_llama):
    config = SamplingConfig(max_length=12, seed=1, save_topk=5, save_tail=3)
    starts = [18, 25, 40]
    sequences, rows = generate_batch(tiny_llama, starts, 4, config, stop_tokens={7, 9})
    top_sequences, top_rows = generate_batch(tiny_llama, starts, 4, replace(config, save_tail=0), stop_tokens={7, 9})
    assert sequences == top_sequences  # the tail draws its own uniforms: the text is the same
    drawn = set()
    for ids, with_tail, top in zip(sequences, rows, top_rows):
        assert with_tail.ids.shape == (len(ids), 8)
        np.testing.assert_array_equal(with_tail.ids[:, :5], top.ids)  # the top-K columns first, as without a tail
        np.testing.assert_array_equal(with_tail.logprobs[:, :5], top.logprobs)
        reference = teacher_forced_log_probs(tiny_llama, ids)[:-1]
        samples = torch.from_numpy(with_tail.ids[:-1, 5:]).long()
        assert not (samples.unsqueeze(-1) == torch.from_numpy(top.ids[:-1]).long().unsqueeze(1)).any()
        torch.testing.assert_close(torch.from_numpy(with_tail.logprobs[:-1, 5:]).double(),
                                   reference.gather(-1, samples), atol=1e-5, rtol=0)
        drawn |= set(samples.flatten().tolist())
    assert len(drawn) > 10  # samples, not one token repeated


def test_tail_sampling_draws_the_rest_in_proportion_to_its_probability():
    log_probs = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0, 3.0, float("-inf"), 0.0, 1.0]]), -1)
    top = torch.tensor([[3, 0]])
    n = 200_000
    uniforms = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_tail(log_probs, top, uniforms)[0], minlength=7).double()
    rest = log_probs[0].exp().double().scatter(0, top[0], 0)
    assert counts[[0, 3, 4]].sum() == 0  # never a top-K token, never one the teacher gives no probability
    torch.testing.assert_close(counts / n, rest / rest.sum(), atol=3e-3, rtol=0)
    # the inverse CDF: uniforms near 0 pick the first token of the rest, near 1 its last
    assert sample_tail(log_probs, top, torch.tensor([[0.0, 0.999999]])).tolist() == [[1, 6]]


def test_top_k_sampling_stays_in_the_top_k():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(1))
    chosen = sample_top_k(logits, uniforms, temperature=1.0, top_k=5)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == chosen.unsqueeze(1)).any(dim=1).all()
    assert torch.equal(sample_top_k(logits, uniforms, 1.0, top_k=1), logits.argmax(dim=-1))
    # uniforms near 0 pick the most likely token, near 1 the least likely of the k
    assert torch.equal(sample_top_k(logits, torch.zeros(64), 1.0, 5), top5[:, 0])
    assert torch.equal(sample_top_k(logits, torch.full((64,), 0.999999), 1.0, 5), top5[:, 4])


# ---- which start tokens, which shard ----

def test_special_tokens_are_left_out_unless_asked(tokenizer):
    specials = special_token_ids(tokenizer)
    assert tokenizer.eos_token_id in specials
    eligible = eligible_start_tokens(tokenizer, vocab_size=128)
    assert not specials & set(eligible) and eligible[-1] == 127
    assert eligible_start_tokens(tokenizer, 128, include_special=True) == list(range(128))


def test_start_token_choices():
    eligible = list(range(3, 100))
    assert choose_start_tokens(eligible) == eligible
    assert choose_start_tokens(eligible, token_range=(0, 10)) == list(range(3, 10))
    subset = choose_start_tokens(eligible, num_tokens=16, seed=7)
    assert len(set(subset)) == 16 and set(subset) <= set(eligible)
    assert subset == choose_start_tokens(eligible, num_tokens=16, seed=7)
    assert subset != choose_start_tokens(eligible, num_tokens=16, seed=8)
    for bad in (dict(num_tokens=0), dict(num_tokens=98), dict(token_range=(5, 5)), dict(token_range=(200, 300))):
        with pytest.raises(ValueError, match="--"):
            choose_start_tokens(eligible, **bad)


@pytest.mark.parametrize("count,num_shards", [(100, 1), (100, 7), (5, 8), (49135, 64)])
def test_shards_are_disjoint_and_cover_the_request(count, num_shards):
    tokens = list(range(17, 17 + count))
    shards = [shard_start_tokens(tokens, i, num_shards) for i in range(num_shards)]
    flat = [t for shard in shards for t in shard]
    assert sorted(flat) == tokens and len(set(flat)) == len(flat)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_comes_from_flags_positional_or_torchrun():
    assert resolve_shard(None, None, None, environ={}) == (0, 1)
    assert resolve_shard(None, None, 5, environ={}) == (5, 64)  # the released code's `generate_data.py i`
    assert resolve_shard(None, 8, 5, environ={}) == (5, 8)
    assert resolve_shard(2, 4, None, environ={"RANK": "1", "WORLD_SIZE": "3"}) == (2, 4)
    assert resolve_shard(None, None, None, environ={"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_shard(4, 4, None, environ={})
    with pytest.raises(ValueError, match="out of range"):
        resolve_shard(None, None, 64, environ={})


def test_presets_fill_only_what_the_user_left_out():
    def args(**given):
        base = dict(preset=None, start_token_range=None, num_start_tokens=None, all_start_tokens=False,
                    max_length=None)
        return Namespace(**{**base, **given})
    quick = args()
    assert apply_preset(quick, cuda_available=False) == "quick"
    assert (quick.num_start_tokens, quick.max_length) == (16, 128)
    paper = args()
    assert apply_preset(paper, cuda_available=True) == "paper"
    assert (paper.num_start_tokens, paper.max_length) == (None, 2048)
    explicit = args(preset="paper", start_token_range=[0, 500], max_length=64)
    apply_preset(explicit, cuda_available=False)
    assert (explicit.num_start_tokens, explicit.max_length) == (None, 64)


# ---- shard files: same seed same output, kill and resume ----

def run_shard(model, tokenizer, path, starts=tuple(range(20, 31)), batch_size=4, engine=HFGenerator,
              **sampling):
    config = SamplingConfig(**{"max_length": 10, **sampling})
    generator = engine(model, config, stop_token_ids(model.generation_config, tokenizer))
    return synthesize_shard(generator, tokenizer, list(starts), path, batch_size, 0, 1, TEACHER)


def test_shard_lines_hold_the_promised_fields(tiny_llama, tokenizer, tmp_path):
    path = shard_path(tmp_path, 0, 1)
    assert run_shard(tiny_llama, tokenizer, path) == 33
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["start_token"], r["greedy_tokens"]) for r in records} == {(s, g) for s in range(20, 31) for g in (3, 4, 5)}
    for record in records:
        assert record["input_ids"][0] == record["start_token"] and 1 < len(record["input_ids"]) <= 10
        assert record["text"] == tokenizer.decode(record["input_ids"])
        assert (record["shard"], record["teacher"]) == (0, str(TEACHER))


def test_same_command_same_output(tiny_llama, tokenizer, tmp_path):
    run_shard(tiny_llama, tokenizer, tmp_path / "a.jsonl", seed=5)
    run_shard(tiny_llama, tokenizer, tmp_path / "b.jsonl", seed=5)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize("lines_kept,partial_bytes", [(0, 7), (5, 0), (13, 40), (32, 1)])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_llama, tokenizer, tmp_path, lines_kept,
                                                          partial_bytes):
    whole = tmp_path / "whole.jsonl"
    run_shard(tiny_llama, tokenizer, whole)
    lines = whole.read_text().splitlines(keepends=True)
    # What a kill leaves: the first lines, then part of the next one.
    killed = tmp_path / "killed.jsonl"
    killed.write_text("".join(lines[:lines_kept]) + lines[lines_kept][:partial_bytes])
    assert run_shard(tiny_llama, tokenizer, killed) == len(lines) - lines_kept
    assert sorted(killed.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    assert run_shard(tiny_llama, tokenizer, killed) == 0  # a finished shard has nothing left to do


@pytest.mark.parametrize("lines_kept,extra_rows,tail", [(0, 3, 0), (5, 0, 0), (13, 20, 0), (5, 7, 2)])
def test_a_killed_run_with_top_k_rows_resumes_to_the_uninterrupted_rows(tiny_llama, tokenizer, tmp_path, lines_kept,
                                                                       extra_rows, tail):
    whole = tmp_path / "whole.jsonl"
    run_shard(tiny_llama, tokenizer, whole, save_topk=4, save_tail=tail)
    lines = whole.read_text().splitlines(keepends=True)
    records = [SequenceRecord.from_line(line) for line in lines]
    assert [r.topk[1] for r in records] == list(np.cumsum([0] + [len(r.input_ids) for r in records[:-1]]))
    # What a kill leaves: the first lines, their rows and some rows of the batch whose lines it never wrote.
    killed = tmp_path / "killed.jsonl"
    killed.write_text("".join(lines[:lines_kept]))
    rows_kept = sum(len(r.input_ids) for r in records[:lines_kept]) + extra_rows
    side_file(killed).write_bytes(side_file(whole).read_bytes()[:rows_kept * (4 + tail) * 8])
    assert run_shard(tiny_llama, tokenizer, killed, save_topk=4, save_tail=tail) == len(lines) - lines_kept
    assert killed.read_bytes() == whole.read_bytes()  # batches in order: the very same bytes
    assert side_file(killed).read_bytes() == side_file(whole).read_bytes()
    first = records[7]
    rows = read_rows(side_file(killed), first.topk[1], len(first.input_ids), 4 + tail)
    reference = teacher_forced_log_probs(tiny_llama, first.input_ids).topk(4, dim=-1)
    assert (rows.ids[:-1, :4] == reference.indices[:-1].numpy()).all()


def test_rows_cut_short_are_an_error_naming_the_fix(tiny_llama, tokenizer, tmp_path):
    path = tmp_path / "shard.jsonl"
    run_shard(tiny_llama, tokenizer, path, starts=[20, 21], save_topk=4)
    side_file(path).write_bytes(side_file(path).read_bytes()[:100])
    with pytest.raises(ValueError, match="delete the shard file shard.jsonl too and generate it again"):
        run_shard(tiny_llama, tokenizer, path, starts=[20, 21, 22], save_topk=4)
    with pytest.raises(ValueError, match="another --output-dir"):  # top-K rows are part of the settings
        run_shard(tiny_llama, tokenizer, path, starts=[20, 21], save_topk=8)


def test_a_rerun_with_other_settings_or_the_other_engine_is_refused(tiny_llama, tokenizer, tmp_path):
    path = tmp_path / "shard.jsonl"
    run_shard(tiny_llama, tokenizer, path, starts=[20, 21])
    with pytest.raises(ValueError, match="another --output-dir"):
        run_shard(tiny_llama, tokenizer, path, starts=[20, 21], max_length=12)
    class OtherEngine(HFGenerator):
        engine = "vllm"
    with pytest.raises(ValueError, match="engine=vllm'; pass another --output-dir"):  # no shard of two engines
        run_shard(tiny_llama, tokenizer, path, starts=[20, 21, 22], engine=OtherEngine)
    path.write_text('{"not": "ours"}\n')
    with pytest.raises(ValueError, match=":1 is not a line this tool wrote"):
        read_finished(path, TEACHER, SamplingConfig().describe())


# ---- the command line, with the embedded default teacher ----

@pytest.mark.slow
def test_generate_then_merge_from_the_command_line(tmp_path, monkeypatch, capsys):
    import generate_data
    import merge_gen_data
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "gen"
    generate_data.main(["--num-start-tokens", "3", "--max-length", "6", "--greedy-lengths", "3", "4",
                        "--output-dir", str(out), "--device", "cpu"])
    shard = out / "shard-00-of-01.jsonl"
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(records) == 6 and records[0]["teacher"].startswith("SmolLM2-135M-Instruct|vocab=49152|")
    merge_gen_data.main([str(out), "--output", str(out / "all.jsonl")])
    # Two greedy lengths of one start token can write the same sequence when the sample equals the argmax.
    distinct = len({tuple(r["input_ids"]) for r in records})
    assert capsys.readouterr().out.startswith(f"kept {distinct}; 0 malformed; {6 - distinct} duplicates")
    merged = [json.loads(line) for line in (out / "all.jsonl").read_text().splitlines()]
    assert {tuple(r["input_ids"]) for r in merged} == {tuple(r["input_ids"]) for r in records}


@pytest.mark.slow
def test_cached_top_k_from_generate_data_to_the_training_dataset(tmp_path, monkeypatch, capsys):
    """generate_data.py --save-topk, merge_gen_data.py and the dataset of train.py --teacher cached: every example's
    rows are the teacher's top-K at its positions."""
    import generate_data
    import merge_gen_data
    from utils.data.dataset import TEACHER_TOPK_KEYS, TokenSequenceDataset
    from utils.training.loading import load_model
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "gen"
    generate_data.main(["--num-start-tokens", "4", "--max-length", "7", "--greedy-lengths", "3", "--save-topk", "4",
                        "--output-dir", str(out), "--device", "cpu"])
    merge_gen_data.main([str(out), "--output", str(out / "all.jsonl"), "--heldout", "1"])
    assert "teacher top-4 log-probs of every token" in capsys.readouterr().out
    dataset = TokenSequenceDataset(out / "all.jsonl", 5, teacher_topk=True)  # truncated: rows sliced alike
    teacher = load_model(quantized=False)
    assert len(dataset) == 3
    for example in dataset:
        ids, logprobs = (np.asarray(example[key]) for key in TEACHER_TOPK_KEYS)
        reference = teacher_forced_log_probs(teacher, example["input_ids"]).topk(4, dim=-1)
        assert (ids == reference.indices.numpy()).all()  # 5 of 7 tokens: every row has a distribution
        torch.testing.assert_close(torch.from_numpy(logprobs).double(), reference.values, atol=1e-4, rtol=0)


def test_bad_command_lines_fail_with_one_line(tmp_path, capsys):
    import generate_data
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv, message in ((["--shard", "3", "--num-shards", "2"], "out of range"),
                          (["--output-dir", str(blocker / "sub")], "not writable"),
                          (["--max-length", "2"], "--max-length"),
                          (["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path)], "does not exist"),
                          (["--engine", "vllm", "--vllm-python", str(tmp_path / "none")],
                           "does not exist: run make vllm"),
                          (["--tensor-parallel-size", "2"], "vLLM's: add --engine vllm"),
                          (["--engine", "vllm", "--vllm-python", str(blocker), "--tensor-parallel-size", "0"],
                           "--tensor-parallel-size 0 must be at least 1"),
                          (["--save-tail", "4"], "--save-tail 4 samples the teacher's distribution outside its top-K; "
                                                 "add --save-topk K"),
                          (["--engine", "vllm", "--vllm-python", str(blocker), "--save-topk", "8", "--save-tail", "4"],
                           "--save-tail 4 needs the teacher's whole distribution")):
        with pytest.raises(SystemExit) as exit_info:
            generate_data.main(argv + ["--device", "cpu"])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_two_runs_on_one_shard_at_once_are_refused(tiny_llama, tokenizer, tmp_path):
    import fcntl
    path = shard_path(tmp_path, 0, 1)
    with (tmp_path / f"{path.name}.lock").open("w") as held:  # another process is writing this shard
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another generate_data.py is writing"):
            run_shard(tiny_llama, tokenizer, path)
    assert not path.exists() or path.read_text() == ""
    assert run_shard(tiny_llama, tokenizer, path) == 33  # released: the run goes ahead


@pytest.mark.parametrize("argv,message", [(["--temperature", "nan"], "--temperature nan must be a finite number"),
                                          (["--temperature", "inf"], "--temperature inf must be a finite number"),
                                          (["--num-shards", "0"], "--num-shards 0 must be at least 1"),
                                          (["--top-k", "-1"], r"--top-k -1 must be 0 or more \(paper: 50; 0 = no")])
def test_silently_wrong_numbers_are_refused(tmp_path, argv, message):
    import generate_data
    with pytest.raises(SystemExit, match=message) as refused:
        generate_data.main(argv + ["--device", "cpu", "--output-dir", str(tmp_path)])
    assert refused.value.code == 2


def test_sequences_longer_than_the_models_positions_are_refused_before_loading_it(tmp_path, monkeypatch):
    """A LLaMA with 16 positions would generate 32 tokens without a word (GPT-2 would fail with an IndexError)."""
    import generate_data
    from conftest import save_tiny_teacher
    teacher = save_tiny_teacher(tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    monkeypatch.setattr(generate_data, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"--max-length 32 is longer than the model's 16 positions .*; pass "
                                         r"--max-length 16 or less"):
        generate_data.main(["--model", str(teacher), "--max-length", "32", "--device", "cpu",
                            "--output-dir", str(tmp_path / "gen")])
    assert not list((tmp_path / "gen").glob("shard-*"))


# ---- the vLLM engine's plumbing (tests/test_synthesis_vllm.py runs vLLM itself) ----

def test_each_gpu_process_gets_its_own_block_of_gpus():
    assert engine_gpus(0, 1, 8, environ={}) == "0"
    assert engine_gpus(3, 2, 8, environ={}) == "6,7"  # torchrun --nproc-per-node 4, a teacher on 2 GPUs each
    assert engine_gpus(1, 2, 0, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "6,7"
    with pytest.raises(ValueError, match="needs GPUs 6..7, but 7 are visible; start fewer processes per node"):
        engine_gpus(3, 2, 7, environ={})


def test_an_engine_that_dies_says_why_in_one_line(tmp_path):
    """This environment has no vLLM, so its python makes an engine that dies at the import."""
    generator = VLLMGenerator("some-model", SamplingConfig(), set(), tmp_path / "engine.log", python=sys.executable)
    with pytest.raises(OSError, match=r"the vLLM engine stopped \(exit status 1\): ModuleNotFoundError: No module "
                                      r"named 'vllm' \(its log: .*engine.log\)"), generator:
        generator([20, 21], 3)


def test_engine_vllm_gets_the_plan_the_stop_tokens_and_the_settings_of_the_command_line(tmp_path, monkeypatch):
    """The command line's side of --engine vllm, with the HF sampler standing in for vLLM (no vLLM needed)."""
    import generate_data
    from conftest import save_tiny_teacher
    from utils.data.records import SequenceRecord
    from utils.training.loading import load_model
    teacher = save_tiny_teacher(tmp_path / "teacher")
    made = {}

    class StandIn(HFGenerator):
        engine = "vllm"

        def __init__(self, model_path, config, stop_tokens, log_path, **options):
            made.update(model_path=model_path, stop_tokens=stop_tokens, log_path=log_path, **options)
            super().__init__(load_model(model_path), config, stop_tokens)

        def __enter__(self):
            return self

        def __exit__(self, *error):
            made["closed"] = True

    monkeypatch.setattr(generate_data, "VLLMGenerator", StandIn)
    generate_data.main(["--model", str(teacher), "--engine", "vllm", "--vllm-python", sys.executable,
                        "--num-start-tokens", "2", "--max-length", "6", "--output-dir", str(tmp_path / "gen"),
                        "--device", "cpu", "--threads", "1"])
    shard = tmp_path / "gen" / "shard-00-of-01.jsonl"
    records = [SequenceRecord.from_line(line) for line in shard.read_text().splitlines()]
    assert len(records) == 6 and all(record.sampling.endswith(" engine=vllm") for record in records)
    hf_stop_tokens = stop_token_ids(load_model(teacher).generation_config, load_tokenizer(teacher))
    assert made == dict(model_path=str(teacher), stop_tokens=hf_stop_tokens,
                        log_path=tmp_path / "gen" / "shard-00-of-01.jsonl.vllm.log", dtype="float32",
                        max_num_seqs=VLLM_BATCH_SIZE, memory_fraction=VLLM_MEMORY_FRACTION["cpu"],
                        tensor_parallel_size=1, eager=True, threads=1, gpus=None, python=sys.executable, closed=True)
