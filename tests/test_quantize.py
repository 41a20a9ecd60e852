"""The LLM-QAT student (models/quantize.py): which modules are quantized, how, and that it changes what it should."""
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from models import QATConfig, QuantLinear, quantize_model, quantized_modules
import models.quantize as models_quantize
from models.quantize import KVQuantizer
from utils.training.loading import load_model_and_tokenizer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KV_PROJECTIONS = ("k_proj", "v_proj")


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def on_symmetric_grid(rows, bits):
    """Whether every row (last dim) lies on its own grid scale * {-qmax..qmax}, scale = max|row| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    rows = rows.reshape(-1, rows.shape[-1]).double()
    scale = rows.abs().amax(dim=1, keepdim=True) / qmax
    steps = rows / scale.clamp(min=1e-30)
    return bool(((steps - steps.round()).abs() < 1e-3).all())


def test_every_decoder_projection_becomes_quantlinear_and_nothing_else(tiny_llama):
    parameters = dict(tiny_llama.named_parameters())
    state_dict_keys = list(tiny_llama.state_dict())
    model = quantize_model(tiny_llama, w_bits=4, a_bits=8, kv_bits=4)
    assert model is tiny_llama
    modules = quantized_modules(model)
    assert len(modules) == len(PROJECTIONS) * model.config.num_hidden_layers
    assert {name.rpartition(".")[2] for name in modules} == set(PROJECTIONS)
    for name, module in modules.items():
        kv = name.rpartition(".")[2] in KV_PROJECTIONS
        assert (module.w_bits, module.a_bits, module.out_bits) == (4, 8, 4 if kv else 16)
    assert type(model.lm_head) is nn.Linear  # embeddings, norms and lm_head stay full precision
    # The student shares the teacher's parameter objects and adds no state: checkpoints stay plain Llama weights.
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert list(model.state_dict()) == state_dict_keys
    assert model.config.llm_qat == dict(w_bits=4, a_bits=8, kv_bits=4, act_symmetric=True, ste_clip=2.0,
                                        w_group_size=None, kv_placement="pre_rope", recipe="paper", grid="paper",
                                        arithmetic="float", rotate="none", rotate_seed=0, scheme=None, kv_scheme=None,
                                        learn_ranges="none")


def test_quantized_weight_equals_pytorch_per_channel_reference(tiny_llama):
    quantize_model(tiny_llama, w_bits=4)
    qmax = 7
    for module in quantized_modules(tiny_llama).values():
        weight = module.weight.detach()
        scale = (weight.abs().amax(dim=1) / qmax).float()
        zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
        reference = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -qmax, qmax)
        assert torch.equal(module.quantized_weight().detach(), reference)


def test_sixteen_bits_everywhere_gives_bit_identical_logits(make_tiny_model, tiny_config, tiny_input_ids):
    reference = logits(make_tiny_model(tiny_config), tiny_input_ids)
    student = quantize_model(make_tiny_model(tiny_config), 16, 16, 16)
    assert torch.equal(logits(student, tiny_input_ids), reference)


@pytest.mark.parametrize("bits", [(4, 8, 4), (4, 16, 16), (16, 8, 16), (16, 16, 4)], ids=["W4A8KV4", "W", "A", "KV"])
def test_each_quantized_part_changes_logits(bits, make_tiny_model, tiny_config, tiny_input_ids):
    reference = logits(make_tiny_model(tiny_config), tiny_input_ids)
    student_logits = logits(quantize_model(make_tiny_model(tiny_config), *bits), tiny_input_ids)
    assert torch.isfinite(student_logits).all()
    assert not torch.equal(student_logits, reference)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models(dtype, make_tiny_model, tiny_config, tiny_input_ids):
    reference = logits(make_tiny_model(tiny_config, dtype), tiny_input_ids)
    assert torch.equal(logits(quantize_model(make_tiny_model(tiny_config, dtype), 16, 16, 16), tiny_input_ids),
                       reference)
    student_logits = logits(quantize_model(make_tiny_model(tiny_config, dtype), 4, 8, 4), tiny_input_ids)
    assert student_logits.dtype == dtype
    assert torch.isfinite(student_logits).all()
    assert not torch.equal(student_logits, reference)


def record_kv_projections(model) -> list:
    """A list that fills with every k_proj / v_proj output of the model's forward passes."""
    outputs = []
    for name, module in quantized_modules(model).items():
        if name.endswith(KV_PROJECTIONS):
            module.register_forward_hook(lambda module, args, output: outputs.append(output))
    return outputs


def test_kv_quantizer_uses_one_scale_per_token_across_all_heads(tiny_llama, tiny_input_ids):
    quantize_model(tiny_llama, w_bits=16, a_bits=16, kv_bits=4)
    outputs = record_kv_projections(tiny_llama)
    logits(tiny_llama, tiny_input_ids)
    assert len(outputs) == 2 * tiny_llama.config.num_hidden_layers
    for output in outputs:  # [batch, tokens, kv_heads * head_dim]: one grid per token over all its heads
        assert on_symmetric_grid(output, 4)
        assert max(row.unique().numel() for row in output.reshape(-1, output.shape[-1])) <= 15


def test_kv_quantizer_changing_one_token_changes_no_other_token(tiny_llama):
    k_proj = quantize_model(tiny_llama, 4, 8, 4).model.layers[0].self_attn.k_proj
    hidden = torch.randn(1, 9, tiny_llama.config.hidden_size)
    changed = hidden.clone()
    changed[0, 5] *= 30
    with torch.no_grad():
        before, after = k_proj(hidden), k_proj(changed)
    assert torch.equal(before[0, :5], after[0, :5]) and torch.equal(before[0, 6:], after[0, 6:])
    assert not torch.equal(before[0, 5], after[0, 5])


def test_kv_cache_holds_quantized_values_and_cached_generation_matches(tiny_llama, tiny_input_ids):
    quantize_model(tiny_llama, w_bits=4, a_bits=8, kv_bits=4)
    projected = record_kv_projections(tiny_llama)
    attention_mask = torch.ones_like(tiny_input_ids)
    new_tokens = 8
    with torch.no_grad():
        cached = tiny_llama.generate(tiny_input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                     do_sample=False, use_cache=True, return_dict_in_generate=True)
    # With the cache, each decoding step projects only the newest token, and its key and value rows
    # (before rotary embedding) are on a 4-bit grid.
    decode_steps = projected[2 * tiny_llama.config.num_hidden_layers:]
    assert decode_steps and all(output.shape[1] == 1 for output in decode_steps)
    assert all(on_symmetric_grid(output, 4) for output in projected)
    # Values are cached as projected (no rotary embedding), so the cache itself must be on the grid:
    # [batch, kv_heads, tokens, head_dim] -> one row per token over all heads.
    for layer in cached.past_key_values.layers:
        values = layer.values.transpose(1, 2).flatten(2)
        assert values.shape[1] == tiny_input_ids.shape[1] + new_tokens - 1
        assert on_symmetric_grid(values, 4)
    with torch.no_grad():
        uncached = tiny_llama.generate(tiny_input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                       do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, uncached)


def test_weight_gradient_is_straight_through():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    student = QuantLinear(linear, QATConfig(w_bits=4, a_bits=8))
    identity_weight = QuantLinear(linear, QATConfig(w_bits=16, a_bits=8))  # the weight quantizer as identity
    assert not torch.equal(student.quantized_weight(), linear.weight)
    x, upstream = torch.randn(3, 5, 64), torch.randn(3, 5, 32)
    (student(x) * upstream).sum().backward()
    through_quantizer, linear.weight.grad = linear.weight.grad, None
    (identity_weight(x) * upstream).sum().backward()
    assert through_quantizer.abs().sum() > 0
    assert torch.equal(through_quantizer, linear.weight.grad)


def test_input_gradient_is_straight_through():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    student = QuantLinear(linear, QATConfig(w_bits=4, a_bits=4))
    identity_input = QuantLinear(linear, QATConfig(w_bits=4, a_bits=16))
    x, upstream = torch.randn(3, 5, 64).clamp(-1.9, 1.9).requires_grad_(), torch.randn(3, 5, 32)
    (student(x) * upstream).sum().backward()
    through_quantizer, x.grad = x.grad, None
    (identity_input(x) * upstream).sum().backward()
    assert torch.equal(through_quantizer, x.grad)


@pytest.mark.parametrize("ste_clip", [2.0, None])
def test_weight_gradient_clipped_only_where_weight_reaches_ste_clip(ste_clip):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[0, :4] = torch.tensor([-3.0, -2.0, 2.0, 5.0])
    student = QuantLinear(linear, QATConfig(w_bits=4, ste_clip=ste_clip))
    x, upstream = torch.randn(4, 16), torch.randn(4, 8)
    (student(x) * upstream).sum().backward()
    unclipped = upstream.T @ x  # d(loss)/d(weight) of a plain linear layer
    if ste_clip is None:
        assert torch.allclose(linear.weight.grad, unclipped)
    else:
        outside = linear.weight.detach().abs() >= ste_clip
        assert outside.sum() == 4
        assert torch.equal(linear.weight.grad[outside], torch.zeros(4))
        assert torch.allclose(linear.weight.grad[~outside], unclipped[~outside])


@pytest.mark.parametrize("bad", [0, 1, 9, 32, "four", 4.0, True])
@pytest.mark.parametrize("part", ["w_bits", "a_bits", "kv_bits"])
def test_bad_bits_raise_a_clear_value_error(part, bad, tiny_llama):
    with pytest.raises(ValueError, match=rf"{part}=.*2\.\.8.*16"):
        quantize_model(tiny_llama, **{part: bad})
    assert not quantized_modules(tiny_llama)  # nothing was half-replaced


def test_bad_ste_clip_raises_a_clear_value_error():
    with pytest.raises(ValueError, match="ste_clip"):
        QATConfig(ste_clip=0)


def test_kv_bits_on_a_model_without_k_and_v_projections_are_refused():
    class FusedAttention(nn.Module):  # a qkv_proj instead of q/k/v projections
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(8, 24)
            self.config = SimpleNamespace()

        def get_output_embeddings(self):
            return None

    model = FusedAttention()
    with pytest.raises(ValueError, match="k_proj/v_proj"):
        quantize_model(model, 4, 8, 4)
    assert type(model.qkv_proj) is nn.Linear  # refused before any module was replaced
    assert isinstance(quantize_model(model, 4, 8, 16).qkv_proj, QuantLinear)


def test_a_model_with_no_linear_layer_is_refused_instead_of_saved_unquantized():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no nn.Linear layer to quantize"):
        quantize_model(model, QATConfig(4, 8, 16))
    assert quantize_model(model, QATConfig(16, 16, 16)).config.llm_qat["w_bits"] == 16  # nothing asked, nothing done


def test_requantizing_changes_the_bits(make_tiny_model, tiny_config, tiny_input_ids):
    model = make_tiny_model(tiny_config)
    parameters = dict(model.named_parameters())
    quantize_model(model, 4, 8, 4)
    quantize_model(model, 8, 4, 8, act_symmetric=False)
    assert model.config.llm_qat["w_bits"] == 8 and model.config.llm_qat["a_bits"] == 4
    for name, module in quantized_modules(model).items():
        kv = name.rpartition(".")[2] in KV_PROJECTIONS
        assert (module.w_bits, module.a_bits, module.out_bits, module.act_symmetric) == (8, 4, 8 if kv else 16, False)
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    fresh = quantize_model(make_tiny_model(tiny_config), 8, 4, 8, act_symmetric=False)
    assert torch.equal(logits(model, tiny_input_ids), logits(fresh, tiny_input_ids))
    quantize_model(model, 16, 16, 16)
    assert torch.equal(logits(model, tiny_input_ids), logits(make_tiny_model(tiny_config), tiny_input_ids))


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, MistralConfig])
def test_other_llama_family_models(config_class, tiny_sizes, make_tiny_model, tiny_input_ids):
    config = config_class(**tiny_sizes)
    reference = logits(make_tiny_model(config), tiny_input_ids)
    model = make_tiny_model(config)
    state_dict_keys = list(model.state_dict())
    quantize_model(model, 4, 8, 4)
    modules = quantized_modules(model)
    assert len(modules) == len(PROJECTIONS) * config.num_hidden_layers
    assert all(module.out_bits == 4 for name, module in modules.items() if name.endswith(KV_PROJECTIONS))
    assert list(model.state_dict()) == state_dict_keys
    assert not torch.equal(logits(model, tiny_input_ids), reference)
    assert torch.equal(logits(quantize_model(model, 16, 16, 16), tiny_input_ids), reference)


PERPLEXITY_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every evening the keeper climbed "
    "the narrow stairs, lit the lamp, and watched the ships pass safely through the dark water below. When the "
    "town built a modern beacon on the harbour wall, the lighthouse was closed, but people still walked up the "
    "hill on summer nights to look at the sea and tell stories about the storms it had seen."
)


@pytest.mark.slow
def test_embedded_smollm2_w8a8kv8_changes_perplexity_less_than_w4a8kv4():
    model, tokenizer = load_model_and_tokenizer()
    input_ids = tokenizer(PERPLEXITY_TEXT, return_tensors="pt").input_ids

    def perplexity():
        with torch.no_grad():
            return model(input_ids, labels=input_ids).loss.exp().item()

    full_precision = perplexity()
    quantize_model(model, 8, 8, 8)
    w8a8kv8 = perplexity()
    quantize_model(model, 4, 8, 4)  # re-quantizing rebuilds every QuantLinear with the new bits
    w4a8kv4 = perplexity()
    print(f"\nSmolLM2-135M perplexity on {input_ids.shape[1]} tokens: FP {full_precision:.3f}, "
          f"W8A8KV8 {w8a8kv8:.3f}, W4A8KV4 {w4a8kv4:.3f}")
    assert w8a8kv8 != full_precision and w4a8kv4 != full_precision
    assert abs(w8a8kv8 - full_precision) < abs(w4a8kv4 - full_precision)


# ---- the options beyond the paper: group-wise weights, keys quantized after rotary embedding ----

def per_token_rows(states):
    """Keys or values as attention reads them, [batch, kv_heads, tokens, head_dim], as one row per token."""
    return states.transpose(1, 2).flatten(2)


KV_SETTINGS = {"pre_rope": QATConfig(4, 8, 4), "post_rope": QATConfig(4, 8, 4, kv_placement="post_rope"),
               "post_rope+hadamard": QATConfig(4, 8, 4, kv_placement="post_rope", rotate="hadamard")}


def run_decoding(model, mode, input_ids):
    """One way of running the model: a plain forward, or `generate` with a dynamic or static cache, beam search, or
    a left-padded batch."""
    mask = torch.ones_like(input_ids)
    options = dict(do_sample=False, max_new_tokens=4, attention_mask=mask)
    with torch.no_grad():
        if mode == "forward":
            model(input_ids, use_cache=False)
        elif mode == "dynamic_cache":
            model.generate(input_ids, **options)
        elif mode == "static_cache":
            model.generate(input_ids, cache_implementation="static", **options)
        elif mode == "beam_search":
            model.generate(input_ids, num_beams=3, **options)
        else:  # left padding: the first sequence is 4 tokens shorter
            padded, mask = input_ids.clone(), mask.clone()
            padded[0, :4], mask[0, :4] = model.config.pad_token_id, 0
            model.generate(padded, **{**options, "attention_mask": mask})


@pytest.mark.parametrize("mode", ["forward", "dynamic_cache", "static_cache", "beam_search", "left_padded"])
@pytest.mark.parametrize("setting", list(KV_SETTINGS))
def test_the_kv_quantizers_run_at_every_forward_however_the_model_is_run(make_tiny_model, tiny_config,
                                                                         tiny_input_ids, setting, mode):
    """Proven by counting calls, not by "the logits differ": every attention layer's key and value quantizers run
    once per forward of the model, in the placement the settings say."""
    model = quantize_model(make_tiny_model(tiny_config), KV_SETTINGS[setting])
    quantizers = {name: module for name, module in model.named_modules() if isinstance(module, KVQuantizer)}
    expected = {f"model.layers.{i}.self_attn.{where}" for i in range(tiny_config.num_hidden_layers)
                for where in (("k_proj.output_quantizer", "v_proj.output_quantizer") if setting == "pre_rope" else
                              ("key_quantizer", "value_quantizer"))}
    assert set(quantizers) == expected
    calls, forwards = Counter(), []
    for name, module in quantizers.items():
        module.register_forward_hook(lambda module, args, output, name=name: calls.update([name]))
    model.register_forward_hook(lambda *args: forwards.append(1))
    run_decoding(model, mode, tiny_input_ids)
    assert forwards and calls == Counter({name: len(forwards) for name in expected})


@pytest.mark.parametrize("setting", list(KV_SETTINGS))
def test_attention_reads_keys_and_values_on_the_grid_the_placement_says(make_tiny_model, tiny_config, tiny_input_ids,
                                                                       setting, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    model = quantize_model(make_tiny_model(tiny_config, torch.float64), KV_SETTINGS[setting])
    sdpa, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recording_sdpa(module, query, key, value, *args, **kwargs):
        seen.append((key, value))
        return sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording_sdpa)
    with torch.no_grad():
        model.generate(tiny_input_ids, attention_mask=torch.ones_like(tiny_input_ids), do_sample=False,
                       max_new_tokens=3)
    assert len(seen) == 3 * tiny_config.num_hidden_layers  # the prefill and two decode steps, every layer
    assert all(key.shape[2] in (12, 13, 14) for key, _ in seen)  # the whole cache is read at each step
    for key, value in seen:
        assert on_symmetric_grid(per_token_rows(value), 4)
        # pre_rope quantizes keys before rotary embedding, which moves them off the grid; post_rope after it; with
        # a rotation they are on the grid in the rotated basis, not in this one.
        assert on_symmetric_grid(per_token_rows(key), 4) == (setting == "post_rope")


def test_an_attention_that_bypasses_the_interface_fails_instead_of_running_unquantized(make_tiny_model, tiny_config,
                                                                                      tiny_input_ids):
    model = quantize_model(make_tiny_model(tiny_config), QATConfig(16, 16, 4, kv_placement="post_rope"))
    model.config._attn_implementation_internal = "sdpa"  # as if transformers dispatched around the student's function
    with pytest.raises(RuntimeError, match="post-RoPE KV quantizer did not run; use kv_placement=pre_rope"):
        logits(model, tiny_input_ids)


@pytest.mark.parametrize("placement", ["pre_rope", "post_rope"])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(make_tiny_model, tiny_config,
                                                                         tiny_input_ids, placement):
    from transformers import DynamicCache
    model = quantize_model(make_tiny_model(tiny_config, torch.float64), QATConfig(4, 8, 4, kv_placement=placement))
    full = logits(model, tiny_input_ids)
    cache, prefill = DynamicCache(), 5
    with torch.no_grad():
        steps = [model(tiny_input_ids[:, :prefill], cache=cache, use_cache=True).logits]
        steps += [model(tiny_input_ids[:, t:t + 1], cache=cache, use_cache=True).logits
                  for t in range(prefill, tiny_input_ids.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_post_rope_kv_is_quantized_without_a_cache_too_and_requantizing_removes_it(make_tiny_model, tiny_config,
                                                                                   tiny_input_ids):
    model = make_tiny_model(tiny_config)
    fp = logits(model, tiny_input_ids)
    pre = logits(quantize_model(make_tiny_model(tiny_config), QATConfig(16, 16, 4)), tiny_input_ids)
    post = logits(quantize_model(model, QATConfig(16, 16, 4, kv_placement="post_rope")), tiny_input_ids)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_bits == 16 and attention.v_proj.out_bits == 16  # both quantized where attention reads
    assert (attention.key_quantizer.bits, attention.value_quantizer.bits) == (4, 4)
    assert model.config._attn_implementation == "llm_qat_post_rope_kv_sdpa"
    assert not torch.equal(pre, post)
    assert torch.equal(logits(quantize_model(model, QATConfig(16, 16, 4)), tiny_input_ids), pre)
    assert not hasattr(attention, "key_quantizer") and model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(quantize_model(model, QATConfig(16, 16, 16)), tiny_input_ids), fp)


def test_options_travel_with_the_checkpoint_and_remote_code(tiny_llama, tiny_input_ids, tmp_path):
    from transformers import AutoModelForCausalLM
    from models.checkpoint import save_quantized
    from utils.training.loading import load_model
    config = QATConfig(4, 8, 4, w_group_size=16, kv_placement="post_rope")
    expected = logits(quantize_model(tiny_llama, config), tiny_input_ids)
    save_quantized(tiny_llama, tmp_path / "ckpt")
    for loaded in (load_model(tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()):
        assert QATConfig(**loaded.config.llm_qat) == config
        assert loaded.model.layers[1].mlp.down_proj.w_group_size == 16
        assert torch.equal(logits(loaded, tiny_input_ids), expected)


def test_a_group_size_that_does_not_divide_names_the_sizes_that_do(tiny_llama):
    with pytest.raises(ValueError, match=r"w_group_size=48 does not divide the 64 input columns of "
                                         r"model\.layers\.0\.self_attn\.q_proj; use one of: 1, 2, 4, 8, 16, 32, 64"):
        quantize_model(tiny_llama, QATConfig(4, 8, 4, w_group_size=48))
    for bad in (0, -32, 2.5):
        with pytest.raises(ValueError, match="w_group_size"):
            QATConfig(4, w_group_size=bad)
    with pytest.raises(ValueError, match="kv_placement='after' is not one of pre_rope, post_rope"):
        QATConfig(kv_placement="after")


def test_labels_name_the_options_that_change_the_model():
    assert QATConfig(4, 8, 4).label() == "4-8-4"
    assert QATConfig(4, 8, 4, w_group_size=128).label() == "4g128-8-4"
    assert QATConfig(4, 8, 4, kv_placement="post_rope").label() == "4-8-4k"
    assert QATConfig(16, 8, 16, w_group_size=128, kv_placement="post_rope").label() == "16-8-16"


def test_recipes_set_the_defaults_of_grid_and_ste_clip_and_each_option_overrides():
    assert (QATConfig().grid, QATConfig().ste_clip) == ("paper", 2.0)  # the paper's recipe is the default
    assert (QATConfig(recipe="deploy").grid, QATConfig(recipe="deploy").ste_clip) == ("full", None)
    assert QATConfig(recipe="deploy", ste_clip=2.0).ste_clip == 2.0
    assert QATConfig(grid="full") == QATConfig(grid="full", ste_clip=2.0, recipe="paper")
    saved = QATConfig(4, 8, 4, recipe="deploy")
    assert QATConfig(**asdict(saved)) == saved  # what config.json records rebuilds the same config
    assert (QATConfig(recipe="vllm").grid, QATConfig(recipe="vllm").arithmetic) == ("paper", "vllm")
    for bad in (dict(recipe="tensorrt"), dict(grid="2^b"), dict(arithmetic="int")):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* is not one of"):
            QATConfig(**bad)


def test_recipe_flags_of_train_py():
    from transformers import HfArgumentParser

    from train import QuantArguments

    def parsed(*argv):
        return QATConfig.from_flags(**asdict(HfArgumentParser(QuantArguments).parse_args_into_dataclasses(list(argv))[0]))

    assert parsed() == QATConfig()
    assert parsed("--recipe", "deploy") == QATConfig(recipe="deploy")
    assert parsed("--recipe", "deploy", "--ste_clip", "2") == QATConfig(recipe="deploy", ste_clip=2.0)
    assert parsed("--ste_clip", "0", "--grid", "full") == QATConfig(grid="full", ste_clip=None)
    assert parsed("--recipe", "vllm", "--grid", "full") == QATConfig(recipe="vllm", grid="full")


def test_labels_name_the_recipe_and_the_options_that_differ_from_it():
    assert QATConfig(4, 8, 4, recipe="deploy").label() == "4-8-4+deploy"
    assert QATConfig(4, 8, 4, w_group_size=128, recipe="deploy").label() == "4g128-8-4+deploy"
    assert QATConfig(4, 8, 4, grid="full").label() == "4-8-4+grid=full"
    assert QATConfig(4, 8, 4, ste_clip=None).label() == "4-8-4+ste_clip=none"
    assert QATConfig(4, 8, 4, recipe="deploy", ste_clip=2.0).label() == "4-8-4+deploy+ste_clip=2.0"
    assert QATConfig(recipe="deploy", ste_clip=2.0).label() == "16-16-16"  # nothing quantized: no recipe to tell


def test_deploy_student_quantizes_on_the_full_grid(tiny_llama, tiny_input_ids):
    with torch.no_grad():
        paper = quantize_model(tiny_llama, 4, 8, 4)(tiny_input_ids).logits
        model = quantize_model(tiny_llama, QATConfig(4, 8, 4, recipe="deploy"))
        deploy = model(tiny_input_ids).logits
    assert {layer.grid for layer in quantized_modules(model).values()} == {"full"}
    assert model.config.llm_qat["recipe"] == "deploy" and model.config.llm_qat["grid"] == "full"
    assert not torch.allclose(paper, deploy, atol=1e-3)


def test_vllm_recipe_multiplies_integer_codes_and_scales_as_vllms_int8_kernel(tiny_llama, tiny_input_ids):
    """vLLM's int8 W8A8 on CPU (docs/EXPORT.md, measured): y = fl(fl(fl(acc) * s_w) * s_x), acc the exact int32 sum of
    the codes. The reference here sums in int64."""
    model = quantize_model(tiny_llama, QATConfig(8, 8, 16, recipe="vllm"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    x_scale = x.abs().amax(-1, keepdim=True) / 127
    x_codes = torch.round(x * x_scale.reciprocal()).long()
    w_scale = layer.weight.detach().abs().amax(-1, keepdim=True) / 127
    w_codes = torch.round(layer.weight.detach() * w_scale.reciprocal()).long()
    expected = ((x_codes @ w_codes.T).float() * w_scale.T) * x_scale
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        paper = quantize_model(tiny_llama, QATConfig(8, 8, 16)).model.layers[0].mlp.down_proj(x)
    assert not torch.equal(paper, expected)  # float products of dequantized values round elsewhere


def test_vllm_recipe_holds_int4_scales_and_weights_in_bfloat16(tiny_llama):
    """vLLM's CPU int4 kernel rounds the stored scales to bfloat16 and dequantizes into bfloat16."""
    weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = quantize_model(tiny_llama, QATConfig(4, 16, 16, recipe="vllm"))
    scale = (weight.abs().amax(-1, keepdim=True) / 7).bfloat16().float()
    codes = torch.round(weight / scale).clamp(-7, 7)
    expected = (codes * scale).bfloat16().float()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.quantized_weight(), expected)


def test_vllm_recipe_refuses_what_its_integer_product_cannot_compute():
    with pytest.raises(ValueError, match="one scale per output channel"):
        QATConfig(8, 8, 16, recipe="vllm", w_group_size=32)
    with pytest.raises(ValueError, match="symmetric int activations"):
        QATConfig(8, 8, 16, recipe="vllm", act_symmetric=False)
    assert QATConfig(4, 16, 16, recipe="vllm", w_group_size=32).weight_scale_dtype == torch.bfloat16


# ---- floating-point schemes (--scheme, --kv_scheme): models/schemes.py, models/float_quantizers.py ----
FLOAT_SETTINGS = {"NVFP4": QATConfig(scheme="NVFP4", kv_bits=4),
                  "MXFP4, FP8 KV": QATConfig(scheme="MXFP4", kv_scheme="FP8"),
                  "FP8_DYNAMIC, FP8 KV post-RoPE": QATConfig(scheme="FP8_DYNAMIC", kv_scheme="FP8",
                                                             kv_placement="post_rope"),
                  "FP8, per-tensor FP8 KV": QATConfig(scheme="FP8", kv_scheme="FP8_TENSOR"),
                  "NVFP4A16": QATConfig(scheme="NVFP4A16"),
                  "W4A8 int, FP8 KV post-RoPE rotated": QATConfig(4, 8, kv_scheme="FP8", kv_placement="post_rope",
                                                                  rotate="hadamard")}


@pytest.mark.parametrize("setting", list(FLOAT_SETTINGS))
def test_the_float_quantizers_run_once_each_at_every_forward(tiny_llama, tiny_input_ids, monkeypatch, setting):
    """Counted twice: every float quantizer module is called once per forward, and each call runs the float math."""
    from models.quantize import FloatQuantizer
    config = FLOAT_SETTINGS[setting]
    model = quantize_model(tiny_llama, config)
    quantizers = {name: module for name, module in model.named_modules() if isinstance(module, FloatQuantizer)}
    kv = ("k_proj.output_quantizer", "v_proj.output_quantizer") if config.kv_placement == "pre_rope" else \
        ("key_quantizer", "value_quantizer")
    expected = {f"{name}.weight_quantizer" for name in quantized_modules(model) if config.scheme} | \
        {f"{name}.input_quantizer" for name in quantized_modules(model) if config.input_spec} | \
        {f"model.layers.{i}.self_attn.{where}.quantizer" for i in range(tiny_llama.config.num_hidden_layers)
         for where in kv if config.kv_scheme}
    assert set(quantizers) == expected
    specs = Counter(module.spec for module in quantizers.values())
    calls, math_calls = Counter(), Counter()
    for name, module in quantizers.items():
        module.register_forward_hook(lambda module, args, output, name=name: calls.update([name]))

    def counted(x, spec, ste_clip):
        math_calls.update([spec])
        return fake_quantize_float(x, spec, ste_clip)

    from models.float_quantizers import fake_quantize_float
    monkeypatch.setattr(models_quantize, "fake_quantize_float", counted)
    for forwards in (1, 2):
        logits(model, tiny_input_ids)
        assert calls == Counter({name: forwards for name in quantizers})
        assert math_calls == Counter({spec: count * forwards for spec, count in specs.items()})


def test_a_scheme_quantizes_weights_and_inputs_as_its_float_quantizers_compute(tiny_llama):
    from models.float_quantizers import fake_quantize_float
    from models.schemes import SCHEMES
    model = quantize_model(tiny_llama, QATConfig(scheme="NVFP4", recipe="deploy"))
    layer = model.model.layers[0].mlp.down_proj
    assert (layer.w_bits, layer.a_bits, layer.w_group_size, layer.out_bits) == (4, 4, 16, 16)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    weight = fake_quantize_float(layer.weight, SCHEMES["NVFP4"].weights)
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), weight)
        assert torch.equal(layer(x), nn.functional.linear(fake_quantize_float(x, SCHEMES["NVFP4"].input_activations),
                                                          weight))
    weight_only = quantize_model(tiny_llama, QATConfig(scheme="MXFP4A16")).model.layers[0].mlp.down_proj
    assert (weight_only.w_bits, weight_only.a_bits, weight_only.w_group_size) == (4, 16, 32)


def test_float_schemes_refuse_what_conflicts_with_them_in_one_line():
    for options, fix in ((dict(w_bits=4), "--w_bits"), (dict(a_bits=8), "--a_bits"),
                         (dict(w_group_size=32), "--w_group_size"), (dict(act_symmetric=False), "--no_act_symmetric"),
                         (dict(recipe="vllm"), "--recipe/--arithmetic vllm")):
        with pytest.raises(ValueError, match=f"scheme=NVFP4 sets the weight and activation formats; drop {fix}"):
            QATConfig(scheme="NVFP4", **options)
    with pytest.raises(ValueError, match="drop one of --kv_scheme and --kv_bits"):
        QATConfig(kv_bits=4, kv_scheme="FP8")
    with pytest.raises(ValueError, match="scheme='NVFP8' is not one of FP8, FP8_DYNAMIC, NVFP4"):
        QATConfig(scheme="NVFP8")
    with pytest.raises(ValueError, match="kv_scheme='FP4' is not one of FP8, FP8_TENSOR"):
        QATConfig(kv_scheme="FP4")
    with pytest.raises(ValueError, match="pass --kv_placement post_rope"):
        QATConfig(kv_scheme="FP8", rotate="hadamard")


def test_a_scheme_whose_groups_do_not_divide_a_layer_names_the_schemes_without_groups(tiny_sizes, make_tiny_model):
    model = make_tiny_model(LlamaConfig(**tiny_sizes | dict(hidden_size=72, head_dim=18)))
    with pytest.raises(ValueError, match=r"scheme=NVFP4 quantizes groups of 16 input columns, which do not divide the "
                                         r"72 of model\.layers\.0\.self_attn\.q_proj; use a scheme without groups "
                                         r"\(FP8, FP8_DYNAMIC\)"):
        quantize_model(model, QATConfig(scheme="NVFP4"))
    quantize_model(model, QATConfig(scheme="FP8_DYNAMIC"))


def test_float_scheme_labels_name_the_scheme():
    assert QATConfig(scheme="NVFP4", kv_bits=4).label() == "NVFP4-kv4"
    assert QATConfig(scheme="NVFP4A16").label() == "NVFP4A16-kv16"
    assert QATConfig(scheme="FP8_DYNAMIC", kv_scheme="FP8", kv_placement="post_rope").label() == "FP8_DYNAMIC-kvfp8k"
    assert QATConfig(scheme="MXFP4", recipe="deploy").label() == "MXFP4-kv16+deploy"
    assert QATConfig(4, 8, kv_scheme="FP8_TENSOR").label() == "4-8-fp8tensor"
    assert QATConfig(kv_scheme="FP8").label() == "16-16-fp8"


def test_scheme_flags_of_train_py_and_its_default_bits():
    from transformers import HfArgumentParser

    from train import QuantArguments, with_default_bits

    def flags(*argv, train_defaults=False):
        parser = HfArgumentParser(QuantArguments)
        if train_defaults:
            parser.set_defaults(w_bits=None, a_bits=None, kv_bits=None)
        parsed = asdict(parser.parse_args_into_dataclasses(list(argv))[0])
        return QATConfig.from_flags(**(with_default_bits(parsed) if train_defaults else parsed))

    assert flags("--scheme", "NVFP4", "--kv_scheme", "FP8") == QATConfig(scheme="NVFP4", kv_scheme="FP8")
    assert flags(train_defaults=True) == QATConfig(4, 8, 4)
    assert flags("--scheme", "NVFP4", train_defaults=True) == QATConfig(scheme="NVFP4", kv_bits=4)
    assert flags("--kv_scheme", "FP8", train_defaults=True) == QATConfig(4, 8, kv_scheme="FP8")
    with pytest.raises(ValueError, match="drop --w_bits"):
        flags("--scheme", "NVFP4", "--w_bits", "4", train_defaults=True)


@pytest.mark.parametrize("setting", ["NVFP4", "FP8_DYNAMIC, FP8 KV post-RoPE"])
def test_float_schemes_travel_with_the_checkpoint_and_remote_code(tiny_llama, tiny_input_ids, tmp_path, setting):
    from transformers import AutoModelForCausalLM

    from models.checkpoint import save_quantized
    from utils.training.loading import load_model
    config = FLOAT_SETTINGS[setting]
    expected = logits(quantize_model(tiny_llama, config), tiny_input_ids)
    save_quantized(tiny_llama, tmp_path / "ckpt")
    for loaded in (load_model(tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()):
        assert QATConfig(**loaded.config.llm_qat) == config
        assert type(loaded.model.layers[1].mlp.down_proj.weight_quantizer).__name__ == "FloatQuantizer"
        assert torch.equal(logits(loaded, tiny_input_ids), expected)


# ---- learned ranges (--learn_ranges weights) ----

def with_learned_clips(model, seed=0):
    """Clipping factors in [0.6, 1): what training leaves, so that a lost one shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_modules(model).values():
            clip = layer.weight_quantizer.learned_clip
            clip.copy_(0.6 + 0.4 * torch.rand(clip.shape, generator=generator))
    return model


@pytest.mark.parametrize("group_size", [None, 16])
def test_learned_ranges_start_at_minmax_and_clip_every_weight_row(make_tiny_model, tiny_config, tiny_input_ids,
                                                                  group_size):
    minmax = quantize_model(make_tiny_model(tiny_config), QATConfig(4, 8, 4, w_group_size=group_size))
    learned = quantize_model(make_tiny_model(tiny_config), QATConfig(4, 8, 4, w_group_size=group_size,
                                                                     learn_ranges="weights"))
    assert torch.equal(logits(learned, tiny_input_ids), logits(minmax, tiny_input_ids))  # clip 1: the paper's start
    for layer in quantized_modules(learned).values():
        clip = layer.weight_quantizer.learned_clip
        rows = (layer.out_features, layer.in_features // group_size) if group_size else (layer.out_features,)
        assert clip.shape == (*rows, 1) and clip.requires_grad and (clip == 1).all()
    names = [name for name, _ in learned.named_parameters() if name.endswith(models_quantize.LEARNED_CLIP)]
    assert len(names) == len(quantized_modules(learned))
    assert not torch.equal(logits(with_learned_clips(learned), tiny_input_ids), logits(minmax, tiny_input_ids))
    learned(tiny_input_ids).logits.sum().backward()  # the clips are trained by the loss
    assert all(layer.weight_quantizer.learned_clip.grad.abs().sum() > 0
               for layer in quantized_modules(learned).values())


def test_learned_ranges_travel_with_the_checkpoint_and_remote_code(tiny_llama, tiny_input_ids, tmp_path):
    from transformers import AutoModelForCausalLM
    from models.checkpoint import save_quantized
    from utils.training.loading import load_model
    config = QATConfig(4, 8, 4, learn_ranges="weights", recipe="deploy")
    student = with_learned_clips(quantize_model(tiny_llama, config))
    expected = logits(student, tiny_input_ids)
    save_quantized(student, tmp_path / "ckpt")
    for loaded in (load_model(tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()):
        assert QATConfig(**loaded.config.llm_qat) == config
        assert torch.equal(logits(loaded, tiny_input_ids), expected)
    assert load_model(tmp_path / "ckpt", quantized=False)  # the float latent weights load as a teacher, clips aside


def test_learned_ranges_refuse_what_they_cannot_learn_in_one_line():
    for options, message in ((dict(scheme="NVFP4"), "learns the clipping of integer weights; pass --w_bits 2..8"),
                             (dict(w_bits=16, a_bits=8), "learns the clipping of integer weights"),
                             (dict(w_bits=4, learn_ranges="activations"), "learn_ranges='activations' is not one of")):
        with pytest.raises(ValueError, match=message):
            QATConfig(**{"learn_ranges": "weights", **options})
    assert QATConfig(4, 8, 4, learn_ranges="weights").label() == "4-8-4+learned-weights"


@pytest.mark.parametrize("bits", [(8, 8), (4, 16)])
def test_learned_ranges_with_the_vllm_recipe_start_as_its_student(make_tiny_model, tiny_config, tiny_input_ids, bits):
    """vLLM's arithmetic (integer products; bfloat16 int4 scales and weights) runs the learned scales too: at clip 1
    the student is the vllm recipe's, and its codes times its scales are its weights."""
    minmax = quantize_model(make_tiny_model(tiny_config), QATConfig(*bits, 16, recipe="vllm"))
    learned = quantize_model(make_tiny_model(tiny_config), QATConfig(*bits, 16, recipe="vllm", learn_ranges="weights"))
    assert torch.equal(logits(learned, tiny_input_ids), logits(minmax, tiny_input_ids))
    for layer in quantized_modules(with_learned_clips(learned)).values():
        codes, scales = layer.weight_codes()
        weight = models_quantize.in_scale_dtype(codes * scales, layer.weight_quantizer.scale_dtype)
        assert torch.equal(weight, layer.quantized_weight())
