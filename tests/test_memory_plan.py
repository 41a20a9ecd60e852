import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import load_script
from models import quantize_model
from utils.training.kd_trainer import kd_loss
from utils.training.memory_plan import (CUDA_CONTEXT_BYTES, FRAGMENTATION, GIB, KD_CHUNK_ROWS, SHIPPED_MODELS,
                               TrainingSetup, layer_activation_bytes_per_token, load_config, model_shape,
                               plan_memory, suggestions)

ROOT = Path(__file__).parents[1]




@pytest.fixture(scope="module")
def llama_shapes():
    return {name: model_shape(load_config(name), name) for name in SHIPPED_MODELS}


def test_shipped_configs_have_the_published_parameter_counts(llama_shapes):
    counts = {name: shape.parameters for name, shape in llama_shapes.items()}
    assert counts == {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-30b": 32_528_943_616}
    assert llama_shapes["llama-7b"].layer_parameters == 202_383_360  # 4 x 4096^2 + 3 x 4096 x 11008 + 2 norms


def test_components_on_a_tiny_config_match_a_hand_count(tiny_config):
    # tiny_config: vocab 128, hidden 64, intermediate 128, 2 layers, 4 query heads / 2 kv heads of 16, untied.
    layer_linears = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (64 * 128)  # q, k+v, o, gate+up+down = 36864
    layer = layer_linears + 2 * 64  # + two RMSNorm weights
    root = 2 * 128 * 64 + 64  # embeddings, lm_head, final norm
    n = 2 * layer + root
    shape = model_shape(tiny_config, "tiny")
    assert (shape.parameters, shape.layer_parameters, shape.layer_linear_weights) == (n, layer, layer_linears)

    tokens = 2 * 32
    plan = plan_memory(shape, TrainingSetup(gpus=4, gpu_memory_gib=1, seq_len=32, batch_size=2))
    per_token = (2 * (4 * 64 + 2 * 64 + 4)  # two norms: fp32 upcast, bf16 normalized, rsqrt
                 + 3 * (3 * 64 + 64 + 2 * 64 + 128)  # inputs of q,k,v / o / gate,up / down: 1-byte mask + bf16 copy
                 + 2 * 32  # k and v output masks
                 + 2 * (64 + 32 + 32 + 64) + 4 * 4  # attention saves q, k, v, output (bf16) + logsumexp (fp32)
                 + 3 * 2 * 128)  # gate output, SiLU output, up output
    expected = {
        "student weights": 4 * n / 4,
        "student gradients": 4 * n / 4,
        "AdamW state": 8 * n / 4,
        "teacher weights": 2 * n / 4,
        "gathered units in flight": 2 * (root + 2 * layer) + 2 * (root + layer),
        "activations kept for backward": tokens * 2 * 64 * 2 + tokens * (8 * 64 + 4),
        "recomputed layer activations": tokens * per_token + 3 * layer_linears,
        "logits and KD loss": tokens * 128 * 3 * 2 + tokens * 128 * 5 * 4,
    }
    assert {c.name: c.bytes for c in plan.components} == expected
    assert plan.total == pytest.approx(sum(expected.values()) * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES)

    # One device in fp32 without checkpointing: no FSDP units, every layer keeps its input and saved tensors.
    plain = plan_memory(shape, TrainingSetup(gpus=1, seq_len=32, batch_size=2, precision="fp32",
                                             gradient_checkpointing=False))
    per_token_fp32 = (12 * 64 + 8) + 5 * 512 + 2 * 32 + (4 * 192 + 4 * 4) + 3 * 4 * 128
    assert plain.bytes_of("gathered units in flight") == plain.bytes_of("recomputed layer activations") == 0
    assert plain.bytes_of("activations kept for backward") == (
        2 * (tokens * 64 * 4 + tokens * per_token_fp32 + 5 * layer_linears) + tokens * (12 * 64 + 4))
    assert plain.bytes_of("teacher weights") == 4 * n


def test_kd_chunk_rows_is_kd_losss_default():
    assert inspect.signature(kd_loss).parameters["chunk_rows"].default == KD_CHUNK_ROWS


def saved_activation_bytes(layer, hidden, position_embeddings):
    """Bytes autograd saves for backward in one decoder layer's forward, beyond its input and parameters."""
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        layer(hidden, position_embeddings=position_embeddings, attention_mask=None)
    known = [hidden, *position_embeddings, *layer.parameters()]
    return sum(saved.values()) - sum(saved.get(t.untyped_storage().data_ptr(), 0) for t in known)


@pytest.mark.parametrize("dtype, compute_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_layer_activations_match_what_autograd_saves(tiny_config, make_tiny_model, dtype, compute_bytes):
    model = quantize_model(make_tiny_model(tiny_config, dtype), 4, 8, 4)
    tokens = 24
    hidden = torch.randn(2, tokens // 2, tiny_config.hidden_size, dtype=dtype, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(tokens // 2)[None])
    shape = model_shape(tiny_config)
    expected = (tokens * layer_activation_bytes_per_token(shape, compute_bytes)
                + (1 + compute_bytes) * shape.layer_linear_weights)  # quantized weight copies and their masks
    assert saved_activation_bytes(model.model.layers[0], hidden, position_embeddings) == expected


def test_paper_models_on_8_gpus(llama_shapes):
    on_80 = TrainingSetup(gpus=8, gpu_memory_gib=80)
    plans = {name: plan_memory(shape, on_80) for name, shape in llama_shapes.items()}
    assert plans["llama-7b"].fits and plans["llama-13b"].fits and not plans["llama-30b"].fits
    offloaded = plan_memory(llama_shapes["llama-30b"], replace(on_80, offload=True))
    assert offloaded.fits
    assert [offloaded.bytes_of(name) for name in ("student weights", "student gradients", "AdamW state")] == [0] * 3


def test_the_cached_teacher_saves_the_teacher_weights_and_logits_and_adds_its_rows(llama_shapes):
    shape = llama_shapes["llama-30b"]
    setup = TrainingSetup(gpus=8, gpu_memory_gib=80)
    with_model = plan_memory(shape, setup)
    cached = plan_memory(shape, replace(setup, teacher="cached", topk=32))
    tokens = 2048
    teacher_weights = 2 * shape.parameters / 8  # bf16, 1/8 shard
    teacher_logits = tokens * shape.vocab_size * 2  # bf16 [tokens, vocab]
    cached_rows = tokens * 32 * (8 + 4)  # int64 ids + float32 log-probs
    assert cached.bytes_of("teacher weights") == 0
    assert with_model.subtotal - cached.subtotal == teacher_weights + teacher_logits - cached_rows
    assert with_model.total - cached.total == pytest.approx((1 + FRAGMENTATION) * (with_model.subtotal
                                                                                    - cached.subtotal))
    unchanged = [c.name for c in with_model.components if c.name not in ("teacher weights", "logits and KD loss")]
    assert all(with_model.bytes_of(name) == cached.bytes_of(name) for name in unchanged)
    assert not with_model.fits and cached.total < with_model.total - 7 * GIB


def test_each_suggestion_is_the_smallest_change_that_fits(llama_shapes):
    plan = plan_memory(llama_shapes["llama-13b"], TrainingSetup(gpus=8, gpu_memory_gib=40, batch_size=8))
    assert not plan.fits
    found = {s.setting: s for s in suggestions(plan)}
    assert set(found) == {"gpus", "offload", "teacher", "seq_len", "batch_size"}
    assert all(s.plan.fits for setting, s in found.items() if setting != "teacher")
    cached = found["teacher"]  # suggested even where not enough alone, as offload and checkpointing are
    assert cached.plan.setup.cached_teacher and cached.plan.total < plan.total and "--teacher cached" in cached.change
    one_step_back = [replace(plan.setup, gpus=found["gpus"].value - 1),
                     replace(plan.setup, seq_len=found["seq_len"].value + 128),
                     replace(plan.setup, batch_size=found["batch_size"].value + 1)]
    assert not any(plan_memory(plan.shape, setup).fits for setup in one_step_back)


def test_checkpointing_is_suggested_when_it_is_off(llama_shapes):
    plan = plan_memory(llama_shapes["llama-7b"], TrainingSetup(gpus=8, gpu_memory_gib=24,
                                                               gradient_checkpointing=False))
    checkpointed = next(s.plan for s in suggestions(plan) if s.setting == "gradient_checkpointing")
    assert checkpointed.setup.gradient_checkpointing and checkpointed.fits
    kept = "activations kept for backward"
    assert plan.bytes_of(kept) > 10 * checkpointed.bytes_of(kept)


def test_cli_prints_the_table_and_json(capsys):
    cli = load_script("plan_memory")
    cli.main(["--model", "llama-7b", "llama-30b", "--gpus", "8", "--gpu-memory", "80"])
    printed = capsys.readouterr().out
    assert "| verdict | fits | **does not fit** |" in printed
    assert "llama-30b does not fit; change one of:" in printed and "--offload" in printed
    cli.main(["--model", str(ROOT / "configs" / "llama-7b" / "config.json"), "--gpus", "1", "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    assert result["parameters"] == 6_738_415_616 and not result["fits"]
    assert result["total_gib"] == pytest.approx(sum(result["components_gib"].values()) + result["margin_gib"])
    assert result["components_gib"]["AdamW state"] == pytest.approx(8 * 6_738_415_616 / GIB)
    cli.main(["--model", "llama-30b", "--teacher", "cached", "--topk", "64", "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    assert result["setup"]["teacher"] == "cached" and result["setup"]["topk"] == 64
    assert result["components_gib"]["teacher weights"] == 0
    cli.main(["--model", "llama-7b", "--teacher", "cached"])
    printed = capsys.readouterr().out
    assert ", cached teacher top-32" in printed.splitlines()[0]
    assert "| teacher weights | 0.0 | none: cached top-K log-probs |" in printed


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "--model: no-such-model: no such config.json; give a model directory"),
    (["--gpus", "0"], "argument --gpus: must be a positive integer, got '0'"),
    (["--gpu-memory", "-8"], "argument --gpu-memory: must be a positive number, got '-8'"),
    (["--seq-len", "1.5"], "argument --seq-len: must be a positive integer, got '1.5'"),
    (["--batch-size", "none"], "argument --batch-size: must be a positive integer, got 'none'"),
    (["--teacher", "logits"], "argument --teacher: invalid choice: 'logits'"),
    (["--topk", "0"], "argument --topk: must be a positive integer, got '0'"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        load_script("plan_memory").main(argv)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"plan_memory.py: error: {message}") and error.count("\n") == 1


def test_cli_refuses_a_config_that_is_not_llama_family(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
                                                      "n_head": 2, "vocab_size": 100}))
    with pytest.raises(SystemExit) as refused:
        load_script("plan_memory").main(["--model", str(tmp_path)])
    assert refused.value.code == 2
    assert "is not a LLaMA-family decoder" in capsys.readouterr().err


def test_cli_refuses_a_config_without_its_shape(tmp_path, capsys):
    """{"model_type": "llama"} alone would be planned as LlamaConfig's defaults, a 6.74B model, and said to fit."""
    config = json.loads((ROOT / "configs" / "llama-7b" / "config.json").read_text())
    del config["intermediate_size"], config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as refused:
        load_script("plan_memory").main(["--model", str(tmp_path)])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"plan_memory.py: error: --model: {tmp_path / 'config.json'} lacks "
                                       "num_hidden_layers, intermediate_size; give the model's full config.json, "
                                       "which has its shape\n")
