"""train.py end to end on a tiny model: checkpoint round trip, resume, and a two-process run."""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_utils
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

import train
from conftest import save_tiny_teacher
from models import QuantLinear
from models.quantize import QATConfig, quantize_model
from utils.data.dataset import TEACHER_TAIL_KEYS, TEACHER_TOPK_KEYS, PadCollator
from utils.data.sampler import sample_tail
from utils.data.teacher_topk import SequenceTopK, write_store
from utils.training.kd_trainer import cached_kd_loss
from utils.training.loading import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded default's tokenizer, plus a few token sequences."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_teacher(root / "teacher")
    with (root / "data.jsonl").open("w") as f:
        for row in range(4):
            f.write(json.dumps({"input_ids": torch.randint(0, 1000, (12 + row,)).tolist()}) + "\n")
    return root


def train_args(root, output, *extra):
    return ["--model_name_or_path", str(root / "teacher"), "--data_path", str(root / "data.jsonl"),
            "--output_dir", str(output), "--model_max_length", "16", "--w_bits", "4", "--a_bits", "8",
            "--kv_bits", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--use_cpu", *extra]


@pytest.fixture
def model_loads(monkeypatch):
    """The model loads train.py makes, by path and dtype."""
    loads = []

    def load(path, dtype, training_args):
        loads.append((path, dtype))
        return load_model(path, dtype, quantized=False)

    monkeypatch.setattr(train, "load_float_model", load)
    return loads


def logged_losses(output):
    history = json.loads((Path(output) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_checkpoint_reloads_as_the_quantized_student(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--per_device_train_batch_size", "2"))
    config = json.loads((output / "config.json").read_text())
    assert config["llm_qat"]["w_bits"] == 4 and config["llm_qat"]["kv_bits"] == 4
    student = load_model(output)
    remote = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert isinstance(student.model.layers[0].self_attn.k_proj, QuantLinear)
    assert remote.model.layers[0].self_attn.k_proj.out_bits == 4
    ids = torch.randint(0, 1000, (1, 10))
    assert torch.equal(student(ids).logits, remote(ids).logits)
    teacher = load_model(tiny_teacher_dir / "teacher")
    assert not torch.equal(student(ids).logits, teacher(ids).logits)
    assert (output / "tokenizer.json").is_file()


def test_a_floating_point_scheme_trains_and_reloads_with_its_formats(tiny_teacher_dir, tmp_path):
    """--scheme NVFP4 --kv_scheme FP8 (no integer bits): the checkpoint says so and reloads, also by remote code, as
    the student of those formats; the W4A8KV4 defaults do not creep in."""
    from models.quantize import FloatQuantizer

    output = tmp_path / "out"
    args = train_args(tiny_teacher_dir, output, "--max_steps", "2", "--scheme", "NVFP4", "--kv_scheme", "FP8")
    for flag in ("--w_bits", "--a_bits", "--kv_bits"):
        del args[args.index(flag):args.index(flag) + 2]
    train.main(args)
    saved = json.loads((output / "config.json").read_text())["llm_qat"]
    assert (saved["scheme"], saved["kv_scheme"], saved["w_bits"], saved["a_bits"], saved["kv_bits"]) == \
        ("NVFP4", "FP8", 16, 16, 16)
    student = load_model(output)
    remote = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    k_proj = student.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj.weight_quantizer, FloatQuantizer) and isinstance(k_proj.input_quantizer, FloatQuantizer)
    assert isinstance(k_proj.output_quantizer.quantizer, FloatQuantizer)
    ids = torch.randint(0, 1000, (1, 10))
    assert torch.equal(student(ids).logits, remote(ids).logits)
    float_student = load_model(output, quantized=False)
    assert torch.equal(student(ids).logits, quantize_model(float_student, QATConfig(scheme="NVFP4", kv_scheme="FP8"))(
        ids).logits)
    assert not torch.equal(student(ids).logits, load_model(output, quantized=False)(ids).logits)


def test_rerun_resumes_from_the_last_checkpoint(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--save_steps", "1"))
    assert (output / "checkpoint-2" / "modeling_llm_qat.py").is_file()  # checkpoints reload quantized too
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "4", "--save_steps", "1"))
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert len(logged_losses(output)) == 4  # steps 1-2 from the first run, 3-4 resumed: none repeated


def test_resuming_a_run_with_other_bits_is_refused(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "1", "--save_steps", "1"))
    with pytest.raises(ValueError, match="was trained with"):
        train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--w_bits", "2"))
    assert json.loads((output / "config.json").read_text())["llm_qat"]["w_bits"] == 4


def test_bad_bits_stop_before_loading_anything(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="2..8, or 16"):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", "--w_bits", "9"))


@pytest.mark.slow
def test_two_process_run_matches_one_process_first_step(tiny_teacher_dir, tmp_path):
    common = ["--max_steps", "1", "--save_strategy", "no", "--dataloader_drop_last"]
    train.main(train_args(tiny_teacher_dir, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(REPO / "train.py"), *train_args(tiny_teacher_dir, tmp_path / "two", *common,
                                                   "--per_device_train_batch_size", "2", "--ddp_backend", "gloo")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 1
    assert two[0] == pytest.approx(one[0], rel=1e-4)


# ---- bad input and kill points: a one-line error naming the fix, or a run that works ----

def test_a_checkpoint_cut_off_while_saving_is_moved_aside_and_the_run_resumes(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--save_steps", "1"))
    (output / "checkpoint-2" / "trainer_state.json").unlink()  # what a kill -9 during the save of step 2 leaves
    with pytest.raises(ValueError, match="checkpoint-2 is not a whole checkpoint"):
        train.main(train_args(tiny_teacher_dir, output, "--max_steps", "3", "--resume_from_checkpoint",
                              str(output / "checkpoint-2")))
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "3", "--save_steps", "1"))
    assert (output / "incomplete-checkpoint-2" / "model.safetensors").is_file()  # kept, out of the way
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    assert len(logged_losses(output)) == 3  # step 1 from the first run, steps 2-3 after resuming at 1


def test_token_ids_outside_the_vocabulary_stop_training_before_it_starts(tiny_teacher_dir, tmp_path):
    vocab_size = json.loads((tiny_teacher_dir / "teacher" / "config.json").read_text())["vocab_size"]
    for bad_id in (999999, vocab_size, -1):
        data = tmp_path / "bad.jsonl"
        data.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": [5, bad_id]}) + "\n")
        args = train_args(tiny_teacher_dir, tmp_path / "o", "--max_steps", "2")
        args[args.index("--data_path") + 1] = str(data)
        with pytest.raises(ValueError, match=rf"bad\.jsonl:2 .*token id {bad_id} is outside the vocabulary"):
            train.main(args)
        assert not (tmp_path / "o" / "checkpoint-1").exists()


@pytest.mark.parametrize("length", ["0", "-5"])
def test_non_positive_model_max_length_names_the_flag(tiny_teacher_dir, tmp_path, length):
    with pytest.raises(ValueError, match=f"--model_max_length {length} must be at least 1"):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", "--model_max_length", length))


def test_run_train_checks_the_bits_before_generating_data(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_train.sh"), "0", "8", "4"], capture_output=True,
                            text=True, env={**os.environ, "DATA": str(tmp_path / "gen" / "all.jsonl"),
                                            "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("train.py: error: w_bits=0 is not supported; use an integer in 2..8, or 16 "
                                     "for full precision")
    assert not (tmp_path / "gen").exists()


def test_quantizer_options_are_flags_and_recorded_in_the_checkpoint(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "1", "--w_group_size", "16",
                          "--kv_placement", "post_rope", "--ste_clip", "0"))
    saved = json.loads((output / "config.json").read_text())["llm_qat"]
    assert (saved["w_group_size"], saved["kv_placement"], saved["ste_clip"]) == (16, "post_rope", None)
    student = load_model(output)
    assert student.model.layers[0].mlp.up_proj.w_group_size == 16
    assert student.model.layers[0].self_attn.k_proj.out_bits == 16  # keys: quantized after rotary embedding


def test_rotated_student_trains_from_the_unrotated_teacher_and_reloads(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--a_bits", "4", "--kv_placement",
                          "post_rope", "--rotate", "hadamard", "--save_steps", "1"))
    assert json.loads((output / "config.json").read_text())["llm_qat"]["rotate"] == "hadamard"
    student = load_model(output)
    remote = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert student.model.layers[0].mlp.down_proj.input_rotation is not None
    ids = torch.randint(0, 1000, (1, 10))
    assert torch.equal(student(ids).logits, remote(ids).logits)
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "3", "--a_bits", "4", "--kv_placement",
                          "post_rope", "--rotate", "hadamard", "--save_steps", "1"))  # resumes the rotated run
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    with pytest.raises(ValueError, match="pass --kv_placement post_rope"):
        train.main(train_args(tiny_teacher_dir, tmp_path / "other", "--rotate", "hadamard"))


def test_next_token_loss_trains_without_a_teacher_on_the_datas_own_tokens(tiny_teacher_dir, tmp_path, model_loads):
    """--loss ce (the paper's label ablation): the logged first loss is the student's next-token cross-entropy on
    the first batch, padding excluded; no teacher is loaded."""
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "1", "--per_device_train_batch_size", "4",
                          "--loss", "ce", "--dataloader_drop_last", "false", "--seed", "0"))
    assert len(model_loads) == 1  # the student only
    student = quantize_model(load_model(tiny_teacher_dir / "teacher", quantized=False), QATConfig(4, 8, 4))
    rows = [json.loads(line)["input_ids"][:16] for line in (tiny_teacher_dir / "data.jsonl").read_text().splitlines()]
    batch = PadCollator(0)([{"input_ids": ids} for ids in rows])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = student(**batch, labels=labels).loss.item()  # one batch of all four: order does not matter
    assert logged_losses(output)[0] == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="--loss 'mse' is not supported"):
        train.DistillationArguments(loss="mse")


def teacher_topk_rows(teacher_dir, data, k, tail=0):
    """Every line's rows as generate_data.py --save-topk K --save-tail S caches them: the teacher's top-K at each
    position, then S tokens drawn from the rest of its distribution, none at the last."""
    teacher = load_model(teacher_dir, quantized=False)
    rows = []
    for line in data.read_text().splitlines():
        with torch.no_grad():
            log_p = F.log_softmax(teacher(torch.tensor([json.loads(line)["input_ids"]])).logits[0].float(), -1)
        logprobs, ids = log_p.topk(k, -1)
        drawn = sample_tail(log_p, ids, torch.rand(len(ids), tail, generator=torch.Generator().manual_seed(0)))
        ids, logprobs = torch.cat([ids, drawn], -1), torch.cat([logprobs, log_p.gather(-1, drawn)], -1)
        rows.append(SequenceTopK(ids.int().numpy(), logprobs.numpy()))
        rows[-1].ids[-1], rows[-1].logprobs[-1] = 0, -np.inf
    return rows


@pytest.mark.parametrize("flags, topk, tail, note", [
    (("--topk", "5"), 5, 0, "cached top-5 (of 8)"),
    (("--tail_samples", "2"), 8, 2, "cached top-8 (of 8) + 2 tail samples (of 3)"),
])
def test_cached_teacher_trains_from_the_top_k_stored_with_the_data(tiny_teacher_dir, tmp_path, model_loads, caplog,
                                                                   flags, topk, tail, note):
    """--teacher cached: no teacher is loaded; the logged first loss is the cached KL of the first batch, each
    position beside its own cached row, over the --topk most likely of the tokens stored, and the first
    --tail_samples of the tail samples stored after them."""
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny_teacher_dir / "data.jsonl", data)
    rows = teacher_topk_rows(tiny_teacher_dir / "teacher", data, k=8, tail=3)
    store = write_store(data, rows, hashlib.sha256(data.read_bytes()).hexdigest(), tail=3)
    output = tmp_path / "out"
    args = train_args(tiny_teacher_dir, output, "--max_steps", "2", "--per_device_train_batch_size", "4",
                      "--teacher", "cached", *flags, "--seed", "0")
    args[args.index("--data_path") + 1] = str(data)
    with caplog.at_level("INFO", logger="train"):
        train.main(args)
    assert len(model_loads) == 1  # the student only
    assert f"teacher: {note} from {store.directory}" in caplog.text
    assert isinstance(load_model(output).model.layers[0].self_attn.k_proj, QuantLinear)

    student = quantize_model(load_model(tiny_teacher_dir / "teacher", quantized=False), QATConfig(4, 8, 4))
    lines = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]  # all shorter than 16
    def example(ids, r):  # as the dataset serves it: the first topk columns, then the first tail samples
        item = {"input_ids": ids, **dict(zip(TEACHER_TOPK_KEYS, (r.ids[:, :topk], r.logprobs[:, :topk])))}
        if tail:
            item.update(zip(TEACHER_TAIL_KEYS, (r.ids[:, 8:8 + tail], r.logprobs[:, 8:8 + tail])))
        return item
    batch = PadCollator(0)([example(ids, r) for ids, r in zip(lines, rows)])
    with torch.no_grad():
        logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = cached_kd_loss(logits, *(batch[key] for key in TEACHER_TOPK_KEYS), batch["attention_mask"],
                              tail_ids=batch.get(TEACHER_TAIL_KEYS[0]), tail_logprobs=batch.get(TEACHER_TAIL_KEYS[1]))
    first, second = logged_losses(output)
    assert first == pytest.approx(expected.item(), rel=1e-3) and second < first


def test_learned_ranges_train_at_their_own_rate_and_reload(tiny_teacher_dir, tmp_path, monkeypatch):
    """--learn_ranges weights: the clipping factors leave 1 (MinMax) in a parameter group of their own, at
    --range_learning_rate without weight decay, and the saved student reloads with them."""
    groups = []
    create = train.KDTrainer.create_optimizer

    def recording(self, model=None):
        optimizer = create(self, model)
        groups.extend(dict(group) for group in optimizer.param_groups)  # as made: the scheduler moves lr later
        return optimizer

    monkeypatch.setattr(train.KDTrainer, "create_optimizer", recording)
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--per_device_train_batch_size", "2",
                          "--learn_ranges", "weights", "--range_learning_rate", "0.05", "--weight_decay", "0.1"))
    student = load_model(output)
    layers = [module for module in student.modules() if isinstance(module, QuantLinear)]
    clips = [layer.weight_quantizer.learned_clip for layer in layers]
    learned = next(group for group in groups if group.get("learned_clip"))
    assert len(learned["params"]) == len(layers) and learned["weight_decay"] == 0.0
    assert learned["lr"] == 0.05 and {group["lr"] for group in groups if group is not learned} == {1e-3}
    assert all(clip.shape == (layer.out_features, 1) for clip, layer in zip(clips, layers))
    assert all((clip != 1).any() for clip in clips)  # every layer's clipping moved
    assert train.QATConfig(**student.config.llm_qat).learn_ranges == "weights"


def test_cached_teacher_without_a_store_stops_before_loading_a_model(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_float_model", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(FileNotFoundError, match=r"^\S*data\.jsonl has no teacher top-K store \(\S*data\.jsonl\.topk\); "
                                                "generate the data with generate_data.py --save-topk K"):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", "--teacher", "cached"))
    assert not (tmp_path / "o" / "config.json").exists()


def test_kd_trainer_refuses_a_loss_that_does_not_match_its_teacher(tiny_teacher_dir, tmp_path):
    from utils.training.kd_trainer import KDTrainer
    student = load_model(tiny_teacher_dir / "teacher", quantized=False)
    args = train.QATTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="use loss 'kd' with a teacher or 'ce' without one"):
        KDTrainer(model=student, teacher=None, loss="kd", args=args)
    with pytest.raises(ValueError, match="use loss 'kd' with a teacher or 'ce' without one"):
        KDTrainer(model=student, teacher=student, loss="ce", args=args)


def test_only_the_main_process_moves_an_incomplete_checkpoint_aside(tmp_path):
    """Under torchrun every process looks for the checkpoint to resume: one moves a cut-off checkpoint aside, the
    others skip it (renaming it on every process would race) and all of them resume from the same one."""
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("{}")  # checkpoint-2 was cut off while saving

    def resume_on(process_index):  # one process's look (under torchrun main_process_first lets the first look first)
        args = SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path), process_index=process_index,
                               main_process_first=lambda **kwargs: contextlib.nullcontext())
        return train.checkpoint_to_resume(args, QATConfig(4, 8, 4))

    assert resume_on(1) == str(tmp_path / "checkpoint-1")
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "incomplete-checkpoint-2").exists()
    assert resume_on(0) == str(tmp_path / "checkpoint-1")
    assert (tmp_path / "incomplete-checkpoint-2").is_dir() and not (tmp_path / "checkpoint-2").exists()


def test_a_checkpoint_with_a_truncated_weight_file_is_moved_aside_and_the_run_resumes(tiny_teacher_dir, tmp_path):
    output = tmp_path / "out"
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--save_steps", "1"))
    weights = output / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short, or a disk that filled up
    with pytest.raises(ValueError, match=r"checkpoint-2 is not a whole checkpoint \(model.safetensors is truncated"):
        train.main(train_args(tiny_teacher_dir, output, "--max_steps", "3", "--resume_from_checkpoint",
                              str(output / "checkpoint-2")))
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "3", "--save_steps", "1"))
    assert (output / "incomplete-checkpoint-2" / "model.safetensors").is_file()
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    assert len(logged_losses(output)) == 3  # step 1 from the first run, steps 2-3 after resuming at 1


@pytest.mark.parametrize("error", [SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_save_on_a_full_disk_is_one_line_and_leaves_no_checkpoint_to_resume(tiny_teacher_dir, tmp_path,
                                                                               monkeypatch, error):
    def full_disk(*args, **kwargs):
        raise error

    output = tmp_path / "out"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(OSError, match=rf"^could not save the model to {output / 'checkpoint-1'} "
                                      r"\(.*No space left on device.*\); free space on that disk"):
        train.main(train_args(tiny_teacher_dir, output, "--max_steps", "2", "--save_steps", "1"))
    assert not (output / "checkpoint-1" / "config.json").exists()  # no half-saved model passes for a saved one
    monkeypatch.undo()
    train.main(train_args(tiny_teacher_dir, output, "--max_steps", "1", "--save_steps", "1"))  # starts afresh
    assert (output / "incomplete-checkpoint-1").is_dir()
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.parametrize("flags, message", [
    (("--num_train_epochs", "0"), "--num_train_epochs 0 trains nothing"),
    (("--num_train_epochs", "-1"), "--num_train_epochs -1 trains nothing"),
    (("--max_steps", "0"), "--max_steps 0 trains nothing"),
    (("--model_max_length", "4096"), r"--model_max_length 4096 is longer than the model's 2048 positions"),
    (("--teacher", "cached", "--loss", "ce"), "--teacher cached distils from the teacher's cached log-probs, but "
                                              "--loss ce uses no teacher; drop --teacher cached or use --loss kd"),
    (("--teacher", "cached", "--packing"), r"--packing cannot be used with the cached teacher \(--teacher cached\)"),
    (("--teacher", "logits"), "--teacher 'logits' is not supported; use model or cached"),
    (("--topk", "8"), "--topk 8 selects among the cached teacher's tokens; add --teacher cached, or drop --topk"),
    (("--range_learning_rate", "0.01"), "--range_learning_rate 0.01 trains learned ranges; add --learn_ranges "
                                        "weights, or drop --range_learning_rate"),
    (("--tail_samples", "4"), "--tail_samples 4 selects among the cached teacher's tokens; add --teacher cached, or "
                              "drop --tail_samples"),
    (("--init_from", "gptq-model"), r"--init_from starts from GPTQ's codes, which lie on the full grid "
                                    r"\(int4: -8..7\); add --recipe deploy"),
    (("--init_from", "gptq-model", "--recipe", "deploy", "--w_bits", "16"), "--init_from starts the student from "
                                                                            "GPTQ's integer weights"),
])
def test_a_run_that_would_not_train_as_asked_is_refused_before_loading_anything(tiny_teacher_dir, tmp_path,
                                                                                 monkeypatch, flags, message):
    monkeypatch.setattr(train, "load_float_model", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", *flags))
    assert not (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize("made, message", [
    (None, "is not a GPTQ model"),
    ({"w_bits": 8}, "this GPTQ model has 8-bit weights per channel, not 4-bit weights per channel; use it at W = 8"),
    ({"model": "another-model"}, "is a GPTQ model of another-model, not of the teacher"),
])
def test_a_gptq_start_that_is_not_the_teachers_at_these_bits_is_refused_before_loading_anything(
        tiny_teacher_dir, tmp_path, monkeypatch, made, message):
    """--init_from's directory is read before any weights or data (the GPTQ runs themselves: test_baselines.py)."""
    start = tmp_path / "gptq"
    start.mkdir()
    settings = {"method": "gptq", "w_bits": 4, "w_group_size": None, "model": str(tiny_teacher_dir / "teacher")}
    config = {} if made is None else {"llm_qat_baseline": {**settings, **made}}
    (start / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(train, "load_float_model", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", "--init_from", str(start), "--recipe", "deploy"))
    with pytest.raises(FileNotFoundError, match="is not a model directory; make the GPTQ model with"):
        train.main(train_args(tiny_teacher_dir, tmp_path / "o", "--init_from", str(tmp_path / "none"), "--recipe",
                              "deploy"))


def test_check_only_checks_the_flags_against_the_models_config_and_reads_no_data(tiny_teacher_dir, tmp_path):
    args = train_args(tiny_teacher_dir, tmp_path / "o", "--check_only")
    args[args.index("--data_path") + 1] = str(tmp_path / "not-made-yet.jsonl")
    train.main(args)
    assert not list((tmp_path / "o").iterdir())
    with pytest.raises(ValueError, match="w_group_size=24 does not divide the 32 input columns"):
        train.main([*args, "--w_group_size", "24"])


def test_run_train_checks_the_group_size_against_the_model_before_generating_data(tiny_teacher_dir, tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_train.sh"), "4", "8", "4"], capture_output=True,
                            text=True, env={**os.environ, "W_GROUP_SIZE": "100", "MODEL": str(tiny_teacher_dir / "teacher"),
                                            "DATA": str(tmp_path / "gen" / "all.jsonl"),
                                            "OUTPUT_DIR": str(tmp_path / "out"), "PYTHON": sys.executable},
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: w_group_size=100 does not divide the 32 input columns of model.layers.0")
    assert not (tmp_path / "gen").exists()


def test_the_fsdp_config_wraps_the_models_own_decoder_layers(tiny_sizes, make_tiny_model, tmp_path, monkeypatch):
    """scripts/fsdp_config.json names no layer class: Accelerate then wraps the model's `_no_split_modules`, the
    decoder layer of whichever LLaMA-family model it is (Qwen2 here)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import Qwen2Config

    config_file = REPO / "scripts" / "fsdp_config.json"
    assert "Llama" not in config_file.read_text()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it: restored after
    args = train.QATTrainingArguments(output_dir=str(tmp_path), fsdp="full_shard auto_wrap",
                                      fsdp_config=str(config_file), use_cpu=True, report_to=[])
    model = make_tiny_model(Qwen2Config(**tiny_sizes))
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args), model)
    wrapped = [module for module in model.modules() if policy(module)]
    assert wrapped and all(type(module).__name__ == "Qwen2DecoderLayer" for module in wrapped)
    assert len(wrapped) == tiny_sizes["num_hidden_layers"]
