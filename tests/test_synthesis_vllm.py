"""Synthesis with vLLM (generate_data.py --engine vllm): the HF engine's plan (start tokens, greedy prefixes, stop
tokens, lengths), its records and shard files with their resume after a kill, and its distribution: the engines cannot
give the same tokens (other kernels, other random numbers), so their statistics on one plan are compared with the
spread between seeds of the HF engine (utils/data/distribution.py).

A tiny Llama vLLM's CPU attention takes, with logits large enough (initializer range 0.3) that the temperature and
the top-k change the text measurably; its ten most frequent sampled tokens are stop tokens, so lengths vary too. One
vLLM engine serves the whole module. The vLLM tests need `make vllm` (.venv-vllm, or LLM_QAT_VLLM_PYTHON) and skip
with that reason without it.
"""
import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import vllm_sized_llama
from utils.data.distribution import KOLMOGOROV_1_PERCENT, distribution_gaps, sample_statistics
from utils.data.records import SequenceRecord, TeacherIdentity
from utils.data.sampler import HFGenerator, SamplingConfig
from utils.data.synthesis import shard_path, synthesize_shard
from utils.data.vllm_engine import VLLM_PYTHON, VLLMGenerator

pytestmark = pytest.mark.slow
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="vLLM is not installed (make vllm)")

CONFIG = SamplingConfig(max_length=24, seed=0)
START_TOKENS = list(range(1000, 1016))  # 16 start tokens x 3 greedy lengths: 48 sequences
HF_SEEDS = (0, 1, 2, 3)
SPREAD_MULTIPLE = 2  # vLLM's gap to an HF seed may be at most this many times the largest gap between two HF seeds


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model, tokenizer = vllm_sized_llama(initializer_range=0.3)
    directory = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer, directory


def plan(generator) -> list[tuple[list[int], int]]:
    """(token ids, greedy length) of every sequence of the plan, in one order."""
    return [(ids, greedy) for greedy in CONFIG.greedy_lengths for ids in generator(START_TOKENS, greedy)[0]]


@pytest.fixture(scope="module")
def stop_tokens(teacher):
    """The ten tokens an HF run with another seed samples most."""
    model, _, _ = teacher
    pilot = plan(HFGenerator(model, replace(CONFIG, seed=100), set()))
    return {token for token, _ in Counter(t for ids, greedy in pilot for t in ids[greedy:]).most_common(10)}


@pytest.fixture(scope="module")
def hf_plans(teacher, stop_tokens):
    model, _, _ = teacher
    return {seed: plan(HFGenerator(model, replace(CONFIG, seed=seed), stop_tokens)) for seed in HF_SEEDS}


@pytest.fixture(scope="module")
def hf_statistics(teacher, hf_plans):
    model, _, _ = teacher
    return {seed: sample_statistics(model, samples, CONFIG) for seed, samples in hf_plans.items()}


@pytest.fixture(scope="module")
def vllm(teacher, stop_tokens, tmp_path_factory):
    _, _, directory = teacher
    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    with VLLMGenerator(directory, CONFIG, stop_tokens, log, memory_fraction=0.05, max_num_seqs=64, eager=True) as engine:
        yield engine


@needs_vllm
def test_vllm_follows_the_plan(stop_tokens, hf_plans, vllm):
    """Same greedy prefixes as the HF engine (top-1 of float32 logits), at most --max-length tokens, and a sequence
    ends early only right after a stop token, which it keeps."""
    for (ids, greedy), (hf_ids, _) in zip(plan(vllm), hf_plans[CONFIG.seed]):
        assert ids[0] == hf_ids[0] and ids[:greedy] == hf_ids[:greedy]
        assert len(ids) <= CONFIG.max_length and not stop_tokens & set(ids[1:-1])
        assert len(ids) == CONFIG.max_length or ids[-1] in stop_tokens
    assert plan(vllm) == plan(vllm)  # a seed per sequence: the same batch asked again gives the same sequences


@needs_vllm
def test_vllm_samples_the_distribution_of_the_hf_engine(teacher, hf_statistics, vllm):
    model, _, _ = teacher
    between_seeds = [distribution_gaps(hf_statistics[a], hf_statistics[b])
                     for a, b in itertools.combinations(HF_SEEDS, 2)]
    spread = {name: max(gaps[name] for gaps in between_seeds) for name in between_seeds[0]}
    served = sample_statistics(model, plan(vllm), CONFIG)
    to_vllm = [distribution_gaps(served, hf_statistics[seed]) for seed in HF_SEEDS]
    vllm_gap = {name: max(gaps[name] for gaps in to_vllm) for name in spread}
    print(f"\nmean NLL: HF seeds {[round(s.nll, 3) for s in hf_statistics.values()]}, vLLM {served.nll:.3f}")
    print("| statistic | largest gap between HF seeds | largest gap vLLM - HF seed |")
    for name in spread:
        print(f"| {name} | {spread[name]:.3f} | {vllm_gap[name]:.3f} |")
    print(f"calibration (KS from uniform, {served.sampled_tokens} sampled tokens, passes under "
          f"{KOLMOGOROV_1_PERCENT / served.sampled_tokens ** 0.5:.3f}): HF seeds "
          f"{[round(s.calibration, 3) for s in hf_statistics.values()]}, vLLM {served.calibration:.3f}")
    for name in spread:
        assert vllm_gap[name] <= SPREAD_MULTIPLE * spread[name], name
    assert served.calibrated()


@pytest.mark.parametrize("setting", [{"temperature": 0.7}, {"top_k": 0}])
def test_the_check_catches_a_sampler_off_by_one_setting(teacher, stop_tokens, hf_statistics, setting):
    """No vLLM needed: the HF engine run with another temperature or top-k fails the checks vLLM passes."""
    model, _, _ = teacher
    spread = max(abs(a.nll - b.nll) for a, b in itertools.combinations(hf_statistics.values(), 2))
    other = sample_statistics(model, plan(HFGenerator(model, replace(CONFIG, **setting), stop_tokens)), CONFIG)
    gap = abs(other.nll - hf_statistics[CONFIG.seed].nll)
    print(f"\n{setting}: NLL gap {gap:.3f} (seed spread {spread:.3f}), calibration {other.calibration:.3f}")
    assert gap > SPREAD_MULTIPLE * spread and not other.calibrated()


@needs_vllm
def test_a_vllm_shard_has_the_hf_records_and_resumes_after_a_kill(teacher, vllm, tmp_path):
    model, tokenizer, _ = teacher
    identity = TeacherIdentity.of("tiny", tokenizer, model.config.vocab_size)
    whole = shard_path(tmp_path, 0, 1)
    assert synthesize_shard(vllm, tokenizer, START_TOKENS[:6], whole, 4, 0, 1, identity) == 18
    lines = whole.read_text().splitlines(keepends=True)
    for line in lines:
        record = SequenceRecord.from_line(line)  # the HF engine's format, read by merge_gen_data.py as it is
        assert record.teacher == identity and record.text == tokenizer.decode(record.input_ids)
        assert record.sampling == CONFIG.describe("vllm") == CONFIG.describe() + " engine=vllm"
    killed = tmp_path / "killed" / whole.name
    killed.parent.mkdir()
    killed.write_text("".join(lines[:7]) + lines[7][:30])  # what a kill leaves: some lines, then part of one
    assert synthesize_shard(vllm, tokenizer, START_TOKENS[:6], killed, 4, 0, 1, identity) == 11
    assert sorted(killed.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    with pytest.raises(ValueError, match="engine=vllm', but this run uses .* pass another --output-dir"):  # nor HF
        synthesize_shard(HFGenerator(model, CONFIG, set()), tokenizer, START_TOKENS[:6], killed, 4, 0, 1, identity)


@needs_vllm
def test_vllm_top_k_rows_are_the_teachers_distribution(teacher, stop_tokens, tmp_path):
    """vLLM's raw log-probabilities of every step (greedy prefix and sampled tail) are the HF teacher's on the same
    text, up to float32 kernels."""
    model, _, directory = teacher
    config = replace(CONFIG, save_topk=6)
    with VLLMGenerator(directory, config, stop_tokens, tmp_path / "engine.log", memory_fraction=0.05, max_num_seqs=64,
                       eager=True) as engine:
        sequences, topk = engine(START_TOKENS[:8], 4)
    assert not (tmp_path / "engine.log.topk").exists()  # its scratch file goes with the engine
    for ids, rows in zip(sequences, topk):
        assert rows.ids.shape == (len(ids), 6)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)[:-1]
        chosen = torch.from_numpy(rows.ids[:-1]).long()
        torch.testing.assert_close(torch.from_numpy(rows.logprobs[:-1]).double(), reference.gather(1, chosen),
                                   atol=2e-4, rtol=0)
        # the six most likely, in order, up to near-ties
        assert (reference.gather(1, chosen)[:, -1] >= reference.topk(6).values[:, -1] - 2e-4).all()
        assert (np.diff(rows.logprobs[:-1], axis=1) <= 0).all()
        assert (rows.ids[-1] == 0).all() and np.isneginf(rows.logprobs[-1]).all()
