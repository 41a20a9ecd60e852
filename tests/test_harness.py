"""lm-eval integration on the offline local task (tests/data): FP, RTN and a saved QAT checkpoint, with the
quantizers proven active during the harness run."""
import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import models.quantize
from models import quantize_model, save_quantized
from utils.data.records import TeacherIdentity
from utils.evaluation.harness import HarnessDataError, load_tasks, quantization_summary, run_harness
from utils.training.loading import load_tokenizer

from conftest import load_script

LOCAL_TASKS = Path(__file__).parent / "data"
TASK = "commonsense_mini"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the embedded default's tokenizer: cached, loads in well under a second


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny random Llama whose vocabulary matches the real tokenizer, so lm-eval can tokenize the task."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def loglikelihoods(results):
    """Every choice's log-likelihood, in document order: what accuracy is computed from."""
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return torch.tensor([ll for sample in samples for ll, _ in sample["filtered_resps"]])


def evaluate(model, tokenizer):
    return run_harness(model, tokenizer, [TASK], include_path=LOCAL_TASKS, bootstrap_iters=0, log_samples=True)


def train_a_little(model, tokenizer, steps=3):
    """Stands in for QAT: a few optimizer steps through the fake quantizers move the latent weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = tokenizer(["The river starts as a thin stream high in the mountains."], return_tensors="pt")["input_ids"]
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_local_task_fp_rtn_and_saved_qat_checkpoint(tiny_model, tokenizer, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fp = evaluate(tiny_model, tokenizer)
    rtn = evaluate(quantize_model(copy.deepcopy(tiny_model), 4, 8, 4), tokenizer)
    student = train_a_little(quantize_model(copy.deepcopy(tiny_model), 4, 8, 4), tokenizer)
    qat_in_memory = evaluate(student, tokenizer)
    save_quantized(student, tmp_path / "qat", tokenizer)

    # The documented command line: lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True
    quantized_calls = Counter()

    def count_quantized_linears(module, args, output):
        if type(module).__name__ == "QuantLinear":
            quantized_calls[(module.w_bits, module.a_bits, module.out_bits)] += 1

    manager, tasks = load_tasks([TASK], LOCAL_TASKS)
    hook = torch.nn.modules.module.register_module_forward_hook(count_quantized_linears)
    try:
        qat = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'qat'},trust_remote_code=True",
                              tasks=tasks, task_manager=manager, device="cpu", batch_size=1, bootstrap_iters=0,
                              log_samples=True)
    finally:
        hook.remove()

    assert set(quantized_calls) == {(4, 8, 4), (4, 8, 16)}  # k/v projections with KV bits, the others without
    fp_ll, rtn_ll, qat_ll = loglikelihoods(fp), loglikelihoods(rtn), loglikelihoods(qat)
    assert len(fp_ll) == 65  # 22 questions, 2-3 choices each: the whole local task ran
    assert not torch.allclose(rtn_ll, fp_ll, rtol=0, atol=1e-6)  # quantized logits differ from FP
    assert not torch.allclose(qat_ll, fp_ll, rtol=0, atol=1e-6)
    assert not torch.allclose(qat_ll, rtn_ll, rtol=0, atol=1e-6)  # training moved the student
    # lm-eval's own loading evaluates the quantized student, not the float weights it stores
    torch.testing.assert_close(qat_ll, loglikelihoods(qat_in_memory), rtol=1e-5, atol=1e-5)
    for result in (fp, rtn, qat):
        assert 0 <= result["results"][TASK]["acc,none"] <= 1


def test_fake_quantizers_run_during_the_harness_evaluation(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    calls = Counter()
    real_fake_quantize = models.quantize.fake_quantize

    def counting_fake_quantize(x, bits, *args, **kwargs):
        if bits != 16:
            calls[bits] += 1
        return real_fake_quantize(x, bits, *args, **kwargs)

    monkeypatch.setattr(models.quantize, "fake_quantize", counting_fake_quantize)
    evaluate(tiny_model, tokenizer)
    assert not calls  # the float model has no quantizers
    evaluate(quantize_model(tiny_model, 4, 8, 4), tokenizer)
    assert set(calls) == {4, 8}  # weights and KV at 4 bits, activations at 8
    # 2 layers x 7 linear layers per forward: each quantizes its weight and input, k/v also their output
    assert calls[8] > 0 and calls[8] % (2 * 7) == 0
    assert calls[4] == calls[8] // 7 * 9


def test_quantization_summary_names_modules_and_bits(tiny_model):
    assert quantization_summary(tiny_model) == ["no quantized modules: evaluating the model in full precision"]
    lines = quantization_summary(quantize_model(tiny_model, 4, 8, 4))
    assert "4 x k_proj, v_proj: weights 4 bits, input activations 8 bits, output (KV cache) 4 bits" in lines
    assert "10 x q_proj, o_proj, gate_proj, up_proj, down_proj: weights 4 bits, input activations 8 bits" in lines


def test_missing_dataset_says_how_to_get_one(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network: fail at once, no retries
    task = (LOCAL_TASKS / f"{TASK}.yaml").read_text()
    (tmp_path / "hub_task.yaml").write_text(
        task.replace(f"task: {TASK}", "task: hub_task").replace("dataset_path: json", "dataset_path: no-org/no-data"))
    (tmp_path / "lost_task.yaml").write_text(
        task.replace(f"task: {TASK}", "task: lost_task").replace(f"{TASK}.jsonl", "moved_away.jsonl"))
    for name in ("hub_task", "lost_task"):
        with pytest.raises(HarnessDataError, match=f"'{name}'.*needs network access, or a local copy.*--include-path"):
            load_tasks([name], tmp_path)


def test_relative_data_files_resolve_against_the_yaml_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    _, tasks = load_tasks([TASK], LOCAL_TASKS)
    assert len(list(tasks[0].eval_docs)) == 22


def load_evaluate_script():
    return load_script("evaluate")


def test_evaluate_script_errors_are_one_clear_line(tiny_model, tokenizer, tmp_path, capsys):
    evaluate_script = load_evaluate_script()
    checkpoint = tmp_path / "qat"
    save_quantized(quantize_model(tiny_model, 4, 8, 4), checkpoint, tokenizer)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    with pytest.raises(SystemExit, match="already a QAT checkpoint .* omit W A KV"):
        evaluate_script.main([str(checkpoint), "4", "8", "4", "--tasks", "none"])
    with pytest.raises(SystemExit, match="needs --teacher MODEL"):
        evaluate_script.main([str(checkpoint), "--tasks", "none", "--heldout", str(heldout)])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate_script.main([str(tmp_path / "nowhere"), "--tasks", "none"])
    with pytest.raises(SystemExit):
        evaluate_script.main([str(checkpoint), "4", "8"])
    assert "give all three bit-widths W A KV" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_script_rtn_on_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output = tmp_path / "rtn.json"
    load_evaluate_script().main(["default", "4", "8", "4", "--tasks", TASK, "--include-path", str(LOCAL_TASKS),
                                 "--limit", "3", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["method"] == "rtn" and record["bits"] == {"w": 4, "a": 8, "kv": 4}
    assert record["model"] == "SmolLM2-135M-Instruct"
    assert record["metrics"][f"{TASK}/sample_len"] == 3
    assert 0 <= record["metrics"][f"{TASK}/acc"] <= 1
    assert record["metrics"]["perplexity"] > 1


def test_evaluate_script_checks_flags_and_output_before_loading_a_model(tiny_model, tokenizer, tmp_path, capsys,
                                                                         monkeypatch):
    evaluate_script = load_evaluate_script()
    for flag in ("--batch-size", "--max-length", "--limit"):
        with pytest.raises(SystemExit) as refused:
            evaluate_script.main(["default", "--tasks", "none", flag, "0"])
        assert refused.value.code == 2 and f"argument {flag}: 0 must be above 0" in capsys.readouterr().err

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad output was reported")

    monkeypatch.setattr(evaluate_script, "load_model", no_loading)
    blocker = tmp_path / "a_file"  # a directory that cannot be created (chmod does not stop root, CI's user)
    blocker.write_text("")
    for output, message in ((tmp_path, "is a directory"), (blocker / "sub" / "r.json", "not writable")):
        with pytest.raises(SystemExit, match=f"evaluate.py: error: .*{message}"):
            evaluate_script.main(["default", "4", "8", "4", "--tasks", "none", "--output", str(output)])


def test_evaluate_script_refuses_heldout_ids_of_another_teacher_or_outside_the_vocabulary(tiny_model, tokenizer,
                                                                                         tmp_path):
    evaluate_script = load_evaluate_script()
    model_dir = tmp_path / "fp"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    other = TeacherIdentity("llama", 32000, "def")
    for name, line, message in (("other.jsonl", {"input_ids": [5, 6, 7], "teacher": str(other)}, "was generated by llama"),
                                ("oov.jsonl", {"input_ids": [5, len(tokenizer)]}, "outside the vocabulary")):
        (tmp_path / name).write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(SystemExit, match=rf"{name}:2 .*{message}"):
            evaluate_script.main([str(model_dir), "--tasks", "none", "--heldout", str(tmp_path / name),
                                  "--output", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_evaluate_script_records_rtn_options_in_the_result_and_its_label(tiny_model, tokenizer, tmp_path):
    evaluate_script = load_evaluate_script()
    model_dir = tmp_path / "fp"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    record = evaluate_script.main([str(model_dir), "4", "8", "4", "--w-group-size", "32", "--kv-placement",
                                   "post_rope", "--tasks", "none", "--output", str(tmp_path / "r.json")])
    assert record["method"] == "rtn" and record["label"] == "4g32-8-4k"
    assert json.loads((tmp_path / "r.json").read_text())["quantization"]["w_group_size"] == 32
    record = evaluate_script.main([str(model_dir), "4", "8", "4", "--recipe", "deploy", "--tasks", "none",
                                   "--output", str(tmp_path / "deploy.json")])
    assert record["label"] == "4-8-4+deploy"
    assert json.loads((tmp_path / "deploy.json").read_text())["quantization"]["grid"] == "full"
    record = evaluate_script.main([str(model_dir), "4", "4", "16", "--rotate", "hadamard", "--tasks", "none",
                                   "--output", str(tmp_path / "rotated.json")])
    assert record["label"] == "4-4-16+hadamard" and record["quantization"]["rotate"] == "hadamard"
    record = evaluate_script.main([str(model_dir), "--scheme", "MXFP4", "--kv-scheme", "FP8", "--tasks", "none",
                                   "--output", str(tmp_path / "mxfp4.json")])
    assert record["method"] == "rtn" and record["label"] == "MXFP4-kvfp8"
    assert record["bits"] == {"w": 4, "a": 4, "kv": 8, "scheme": "MXFP4", "kv_scheme": "FP8"}
    checkpoint = tmp_path / "qat"
    save_quantized(quantize_model(tiny_model, 4, 8, 4), checkpoint, tokenizer)
    with pytest.raises(SystemExit, match="omit W A KV, --w-group-size, --kv-placement"):
        evaluate_script.main([str(checkpoint), "--w-group-size", "32", "--tasks", "none"])


def test_evaluate_script_refuses_sequences_longer_than_the_models_positions(tiny_model, tokenizer, tmp_path,
                                                                            monkeypatch):
    """The tiny model has 256 positions: --max-length 512 is refused before loading it (a rotary model would
    evaluate past its positions without a word); the default, 2048, becomes the model's 256."""
    evaluate_script = load_evaluate_script()
    model_dir = tmp_path / "fp"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    windows = []
    monkeypatch.setattr(evaluate_script, "token_sequences", lambda *args, **kwargs: windows.append(args[2]) or [[5, 6]])
    evaluate_script.main([str(model_dir), "--tasks", "none", "--output", str(tmp_path / "r.json")])
    assert windows == [256]
    monkeypatch.setattr(evaluate_script, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"--max-length 512 is longer than the model's 256 positions .*; pass "
                                         r"--max-length 256 or less"):
        evaluate_script.main([str(model_dir), "--tasks", "none", "--max-length", "512", "--output",
                              str(tmp_path / "r.json")])
