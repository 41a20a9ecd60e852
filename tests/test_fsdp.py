"""train.py sharded with FSDP2 over two CPU processes (gloo): student and teacher both sharded, bf16 mixed precision,
loaded by rank 0 only (scripts/fsdp_config.json's cpu_ram_efficient_loading).

The run goes through tests/fsdp_worker.py, which only turns on Accelerate's FSDP path for CPU processes.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import probe_logits
from safetensors.torch import load_file
from test_train import logged_losses, tiny_teacher_dir, train_args  # noqa: F401 (tiny_teacher_dir: a fixture)
from transformers import AutoModelForCausalLM

from models import QATConfig, QuantLinear, quantize_model, save_quantized
from utils.data.dataset import PadCollator, TokenSequenceDataset
from utils.training.kd_trainer import kd_loss
from utils.training.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "scripts" / "fsdp_config.json"
FSDP = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(FSDP_CONFIG), "--bf16",
        "--ddp_backend", "gloo", "--per_device_train_batch_size", "2", "--dataloader_drop_last"]
# A first step of SGD with learning rate 1 and no clipping subtracts the gradient itself. Momentum gives the optimizer
# a state: torch's FSDP2 optimizer loading fails on a stateless one ("Expected device to be set").
SGD = ["--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "1", "--lr_scheduler_type", "constant",
       "--max_grad_norm", "0", "--save_steps", "1"]


def run_sharded(root, output, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               str(REPO / "tests" / "fsdp_worker.py"), *train_args(root, output, *FSDP, *extra)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def rank_reports(output):
    return [json.loads((output / f"fsdp_rank{rank}.json").read_text()) for rank in range(2)]


def assert_teacher_sharded(output):
    for report in rank_reports(output):
        assert report["fsdp_module"] and report["resharded_after_forward"] and not report["requires_grad"]
        assert report["local_share"] == pytest.approx(0.5, abs=0.05)  # half the teacher per process, not a replica


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def sharded_run(tiny_teacher_dir, tmp_path_factory):
    """One sharded step: the saved weights are the old ones minus the gradient; it saves checkpoint-1."""
    output = tmp_path_factory.mktemp("sharded") / "out"
    run_sharded(tiny_teacher_dir, output, "--max_steps", "1", *SGD)
    return output


@pytest.fixture(scope="module")
def one_process_step(tiny_teacher_dir):
    """The same first step in one process with bf16 parameters, on both ranks' rows: its loss and gradients."""
    teacher_dir = tiny_teacher_dir / "teacher"
    teacher = load_model(teacher_dir, dtype=torch.bfloat16)
    student = quantize_model(load_model(teacher_dir, dtype=torch.bfloat16), 4, 8, 4)
    dataset = TokenSequenceDataset(tiny_teacher_dir / "data.jsonl", 16)
    batch = PadCollator(teacher.config.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
    loss = kd_loss(student(**batch).logits, teacher_logits, batch["attention_mask"])
    loss.backward()
    return loss.item(), {name: parameter.grad.float() for name, parameter in student.named_parameters()}


def assert_step_matches(output, teacher_dir, one_process_step):
    loss, gradients = one_process_step
    assert logged_losses(output)[0] == pytest.approx(loss, rel=1e-3)
    before = load_file(teacher_dir / "model.safetensors")
    after = load_file(output / "model.safetensors")
    errors = {name: relative_error(before[name] - after[name], gradient) for name, gradient in gradients.items()}
    assert max(errors.values()) < 1e-2, errors  # bf16 rounding: measured 0.4% at most


@pytest.mark.slow
def test_sharded_step_matches_one_process_with_bf16_params(tiny_teacher_dir, sharded_run, one_process_step):
    assert_teacher_sharded(sharded_run)
    assert_step_matches(sharded_run, tiny_teacher_dir / "teacher", one_process_step)


@pytest.mark.slow
def test_only_rank_0_reads_the_weights(tiny_teacher_dir, sharded_run, one_process_step, tmp_path):
    """RAM-efficient loading under FSDP2 (README "Paper scale on GPUs"): rank 1 builds both models without reading
    them, and the broadcast at sharding gives it rank 0's (the step above matches one process), rotary buffers and
    tied embeddings included. With cpu_ram_efficient_loading off, every rank reads both models, and the step is the
    same."""
    inv_freq = load_model(tiny_teacher_dir / "teacher").model.rotary_emb.inv_freq.tolist()
    reports = rank_reports(sharded_run)
    assert [report["weight_files_read"] for report in reports] == [2, 0]  # teacher and student, by rank 0 only
    for report in reports:
        assert report["tied"] == {"student": True, "teacher": True}
        assert report["inv_freq"] == {"student": inv_freq, "teacher": inv_freq}

    config = tmp_path / "fsdp_config.json"
    config.write_text(json.dumps({**json.loads(FSDP_CONFIG.read_text()), "cpu_ram_efficient_loading": False}))
    output = tmp_path / "out"
    run_sharded(tiny_teacher_dir, output, "--max_steps", "1", *SGD, "--fsdp_config", str(config))
    assert [report["weight_files_read"] for report in rank_reports(output)] == [2, 2]
    assert_step_matches(output, tiny_teacher_dir / "teacher", one_process_step)


@pytest.mark.slow
def test_sharded_checkpoints_resume_and_reload_as_the_quantized_student(tiny_teacher_dir, sharded_run, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(sharded_run, output)
    checkpoint = output / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # the sharded run's own resume state
    assert (checkpoint / "modeling_llm_qat.py").is_file()  # and a full model that loads quantized
    run_sharded(tiny_teacher_dir, output, "--max_steps", "2", *SGD)
    assert_teacher_sharded(output)
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert len(logged_losses(output)) == 2  # step 1, then step 2 resumed: none repeated

    for directory in (checkpoint, output):
        student = load_model(directory)
        remote = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        k_proj = remote.model.layers[0].self_attn.k_proj
        assert isinstance(student.model.layers[0].self_attn.k_proj, QuantLinear)
        assert (k_proj.w_bits, k_proj.a_bits, k_proj.out_bits) == (4, 8, 4)
        ids = torch.randint(0, 1000, (1, 10))
        assert torch.equal(student(ids).logits, remote(ids).logits)


def test_rotated_student_shards_with_the_rotation_folded_on_rank_0_only(tiny_teacher_dir, tmp_path):
    """Rank 1 builds the rotated structure without weights (an untied lm_head, online rotations) and gets rank 0's
    folded weights by broadcast: with learning rate 0 the saved student is the rotated teacher, weight for weight."""
    output = tmp_path / "rotated"
    config = QATConfig(4, 4, 4, kv_placement="post_rope", rotate="hadamard")
    run_sharded(tiny_teacher_dir, output, "--max_steps", "1", *SGD, "--learning_rate", "0", "--a_bits", "4",
                "--kv_placement", "post_rope", "--rotate", "hadamard")
    expected = quantize_model(load_model(tiny_teacher_dir / "teacher"), config)
    saved = load_file(output / "model.safetensors")
    assert "lm_head.weight" in saved
    for name, parameter in expected.named_parameters():
        assert torch.equal(saved[name].float(), parameter.detach()), name
    assert QATConfig(**load_model(output).config.llm_qat) == config


def test_a_rotated_checkpoint_teaches_the_same_function_on_every_rank(tiny_teacher_dir, tmp_path):
    """A rotated QAT checkpoint as the teacher: rank 1 builds it without reading its weights and must keep its
    online R4 as rank 0 (which reads them) does, or it distils from another function."""
    root = tmp_path / "rotated"
    teacher = quantize_model(load_model(tiny_teacher_dir / "teacher"), QATConfig(rotate="hadamard"))
    save_quantized(teacher, root / "teacher", load_tokenizer(tiny_teacher_dir / "teacher"))
    shutil.copyfile(tiny_teacher_dir / "data.jsonl", root / "data.jsonl")
    run_sharded(root, tmp_path / "out", "--max_steps", "1", *SGD, "--a_bits", "4", "--kv_placement", "post_rope",
                "--rotate", "hadamard")
    expected = probe_logits(load_model(root / "teacher", dtype=torch.bfloat16, quantized=False))
    first, second = (torch.tensor(report["teacher_probe_logits"]) for report in rank_reports(tmp_path / "out"))
    assert torch.equal(first, second)
    assert relative_error(first, expected) < 1e-2  # bf16 rounding


@pytest.mark.slow
def test_learned_ranges_shard_with_their_layer_and_reload(tiny_teacher_dir, tmp_path):
    """--learn_ranges weights under FSDP2 with bf16 parameters: the clipping factors train in their own group and the
    saved student reloads with them, here and through remote code."""
    output = tmp_path / "out"
    run_sharded(tiny_teacher_dir, output, "--max_steps", "2", "--learn_ranges", "weights",
                "--range_learning_rate", "0.05", "--save_steps", "1")
    student = load_model(output)
    remote = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    clips = {name: parameter for name, parameter in student.named_parameters() if name.endswith("learned_clip")}
    assert len(clips) == 2 * 7 and all((clip != 1).any() for clip in clips.values())
    ids = torch.randint(0, 1000, (1, 10))
    assert torch.equal(student(ids).logits, remote(ids).logits)
