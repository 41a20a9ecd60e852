"""Rotations before quantization (models/rotations.py): the matrices are orthogonal and equal their definitions,
folding through their factors equals the dense products, the rotated float model computes the original's function,
and the rotated student saves, reloads and quantizes what it should."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

from models import QATConfig, quantize_model
from models.checkpoint import load_student, save_quantized
from models.quantize import IntQuantizer, KVQuantizer
from models.quantizers import fake_quantize
from models.rotations import (DOWN_PROJ_INPUT, KEY, RESIDUAL, VALUE, WEIGHTS_UNREAD, Rotation, hadamard_factor,
                              hadamard_matrix, paley_hadamard, rotate, rotate_model, rotation, sylvester_hadamard)

F64 = dict(dtype=torch.float64)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def with_scaled_norms(model):
    """Norm scales away from 1, so that folding them into the linear layers is exercised."""
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.data = 0.5 + torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype)
    return model


def close(actual, expected, relative=1e-5):
    """Within float32 rounding of the largest logit: LLaMA's RMSNorm computes in float32 even in a float64 model."""
    return (actual - expected).abs().max() <= relative * expected.abs().max()


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60, 68])
def test_paley_constructions_give_hadamard_matrices(order):
    matrix = paley_hadamard(order)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(matrix @ matrix.T, order * torch.eye(order, **F64))


def test_williamson_array_gives_a_hadamard_matrix_of_order_172():
    matrix = hadamard_matrix(172)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(matrix @ matrix.T, 172 * torch.eye(172, **F64))


def test_hadamard_factors_of_the_embedded_model_and_unknown_orders():
    assert (hadamard_factor(64), hadamard_factor(576), hadamard_factor(1536)) == (1, 36, 12)  # head, hidden, MLP
    assert paley_hadamard(100) is None and hadamard_factor(100) is None


# docs/ROTATIONS.md: hidden sizes of LLaMA 7B/13B/30B/65B, then intermediate sizes of LLaMA 7B/13B/30B/65B,
# LLaMA-2/3 70B, LLaMA-3 8B and Mistral 7B, then head dimensions
@pytest.mark.parametrize("width,factor", [(4096, 1), (5120, 20), (6656, 104), (8192, 1), (11008, 172), (13824, 108),
                                          (17920, 140), (22016, 172), (28672, 28), (14336, 28), (128, 1), (64, 1)])
def test_every_llama_width_has_a_small_hadamard_factor(width, factor):
    assert hadamard_factor(width) == factor


def test_llama_7b_intermediate_size_rotates_through_h172_and_is_orthogonal():
    n = 11008
    rotation_ = rotation("hadamard", n, 0, DOWN_PROJ_INPUT)
    assert (rotation_.m, rotation_.inner.shape[0]) == (172, 64)  # not the dense 5504 x 5504 factor of Paley's
    rows = torch.eye(n, **F64)[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:32]]
    slab = rotation_.apply(rows)  # 32 rows of Q
    assert torch.allclose(slab @ slab.T, torch.eye(32, **F64), atol=1e-12)
    assert torch.allclose(rotation_.apply(slab, inverse=True), rows, atol=1e-12)


@pytest.mark.parametrize("kind,n", [("hadamard", 64), ("hadamard", 96), ("random", 96), ("random", 50)])
def test_rotations_are_orthogonal_and_inverse_undoes_them(kind, n):
    rotation_ = rotation(kind, n, 0, KEY)
    q = rotation_.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, **F64), atol=1e-12)
    x = torch.randn(3, 5, n, **F64)
    assert torch.allclose(rotation_.apply(x), x @ q, atol=1e-12)
    assert torch.allclose(rotation_.apply(x, inverse=True), x @ q.T, atol=1e-12)


def test_hadamard_rotation_is_signs_times_the_kronecker_product():
    n, m = 96, 12
    rotation_ = rotation("hadamard", n, 5, KEY)
    reference = torch.diag(rotation_.signs) @ torch.kron(paley_hadamard(m), sylvester_hadamard(n // m)) / n ** 0.5
    assert torch.allclose(rotation_.matrix(), reference, atol=1e-12)


def test_rotate_computes_in_float32_under_autocast():
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotated, rotated_bf16 = rotate(x, "hadamard", 0, KEY), rotate(x.bfloat16(), "hadamard", 0, KEY)
    assert rotated.dtype == torch.float32 and torch.equal(rotated, rotate(x, "hadamard", 0, KEY))
    assert torch.equal(rotated_bf16, rotate(x.bfloat16().float(), "hadamard", 0, KEY).bfloat16())


def test_unknown_hadamard_order_warns_and_falls_back_to_random():
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 100"):
        fallback = rotation("hadamard", 100, 0, 99).matrix()
    assert torch.allclose(fallback @ fallback.T, torch.eye(100, **F64), atol=1e-12)


def test_seeds_and_streams_give_other_matrices_and_the_same_seed_the_same():
    base = rotation("random", 32, 0, KEY).matrix()
    assert not torch.allclose(base, rotation("random", 32, 1, KEY).matrix())
    assert not torch.allclose(base, rotation("random", 32, 0, KEY + 1).matrix())
    rotation.cache_clear()  # rebuilt from scratch, as in a fresh process
    assert torch.equal(base, rotation("random", 32, 0, KEY).matrix())


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])  # Qwen2: q/k/v biases
def test_rotated_float_model_computes_the_original_logits(kind, config_class, tiny_sizes, make_tiny_model,
                                                          tiny_input_ids):
    model = with_scaled_norms(make_tiny_model(config_class(**tiny_sizes, tie_word_embeddings=True), torch.float64))
    expected = logits(model, tiny_input_ids)
    student = quantize_model(copy.deepcopy(model), QATConfig(rotate=kind))
    assert student.lm_head.weight is not student.model.embed_tokens.weight  # untied: R1 reaches them differently
    assert not torch.allclose(student.model.layers[0].self_attn.q_proj.weight,
                              model.model.layers[0].self_attn.q_proj.weight)
    assert close(logits(student, tiny_input_ids), expected)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_folding_through_the_factors_equals_the_dense_matrices(kind, tiny_sizes, make_tiny_model, monkeypatch):
    sizes = {**tiny_sizes, "hidden_size": 96, "intermediate_size": 160}  # H_12 x 8, H_12 x 2 per head, H_20 x 8
    model = with_scaled_norms(make_tiny_model(LlamaConfig(**sizes), torch.float64))
    config, layer = model.config, model.model.layers[0]
    r1, r2, r4 = (rotation(kind, n, 0, stream).matrix() for n, stream in
                  ((config.hidden_size, RESIDUAL), (config.head_dim, VALUE), (config.intermediate_size, DOWN_PROJ_INPUT)))
    r2_per_kv_head = torch.block_diag(*[r2] * config.num_key_value_heads)
    r2_per_head = torch.block_diag(*[r2] * config.num_attention_heads)
    attention_norm, final_norm = layer.input_layernorm.weight, model.model.norm.weight
    expected = {"model.embed_tokens.weight": model.model.embed_tokens.weight @ r1,
                "model.layers.0.self_attn.q_proj.weight": layer.self_attn.q_proj.weight * attention_norm @ r1,
                "model.layers.0.self_attn.v_proj.weight": r2_per_kv_head.T @ (layer.self_attn.v_proj.weight
                                                                              * attention_norm) @ r1,
                "model.layers.0.self_attn.o_proj.weight": r1.T @ layer.self_attn.o_proj.weight @ r2_per_head,
                "model.layers.0.mlp.down_proj.weight": r1.T @ layer.mlp.down_proj.weight @ r4,
                "lm_head.weight": model.lm_head.weight * final_norm @ r1}
    expected = {name: value.detach().clone() for name, value in expected.items()}
    monkeypatch.setattr(Rotation, "matrix", None)  # folding never builds a dense n x n matrix
    folded = dict(rotate_model(model, kind).named_parameters())
    for name, value in expected.items():
        assert torch.allclose(folded[name], value, rtol=0, atol=1e-12), name


def test_rotations_first_built_on_the_meta_device_still_rotate_real_weights(tiny_llama, tiny_input_ids):
    """train.py checks the settings against the model's structure under torch.device("meta"); the rotations that
    builds are cached for the real model after it."""
    model = with_scaled_norms(tiny_llama.double())
    rotation.cache_clear()
    with torch.device("meta"):
        quantize_model(AutoModelForCausalLM.from_config(copy.deepcopy(model.config)), QATConfig(rotate="hadamard"))
    expected = logits(model, tiny_input_ids)
    assert close(logits(quantize_model(model, QATConfig(rotate="hadamard")), tiny_input_ids), expected)


def test_without_its_online_rotation_the_rotated_model_differs(tiny_llama, tiny_input_ids):
    expected = logits(tiny_llama, tiny_input_ids)
    folded = rotate_model(copy.deepcopy(tiny_llama), "hadamard")  # weights only, no online R4
    assert not close(logits(folded, tiny_input_ids), expected, relative=1e-3)


@pytest.mark.slow
def test_embedded_smollm2_rotated_in_float_gives_its_logits():
    from utils.training.loading import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer()
    input_ids = tokenizer("The lighthouse keeper climbed the stairs at dusk.", return_tensors="pt").input_ids
    expected = logits(model, input_ids)
    rotated = logits(quantize_model(model, QATConfig(rotate="hadamard")), input_ids)
    assert close(rotated, expected, relative=1e-4)  # float32 through 30 layers


def test_rotation_rescues_four_bit_activations_with_outlier_channels(tiny_llama, tiny_input_ids):
    """One residual channel 20x larger than the rest (what real LLMs have): per-token 4-bit scales are set by
    them, and an orthogonal rotation spreads them out."""
    model = tiny_llama.double()
    model.model.embed_tokens.weight.data[:, :1] *= 20
    expected = logits(model, tiny_input_ids)

    def error(config):
        return (logits(quantize_model(copy.deepcopy(model), config), tiny_input_ids) - expected).abs().mean()

    for kind in ("hadamard", "random"):
        assert error(QATConfig(16, 4, 16, rotate=kind)) < 0.6 * error(QATConfig(16, 4, 16))


def test_post_rope_keys_are_quantized_in_the_rotated_basis(tiny_config):
    keys = torch.randn(2, 7, 2, tiny_config.head_dim, **F64)  # [batch, tokens, kv heads, head_dim]
    q = rotation("hadamard", tiny_config.head_dim, 4, KEY).matrix()

    def per_token(heads):  # one scale per token across all heads, the full grid
        return fake_quantize(heads.flatten(-2), 4, True, None, None, "full").unflatten(-1, heads.shape[-2:])

    quantizer = KVQuantizer(IntQuantizer(4, ste_clip=None, grid="full"), rotation="hadamard", rotate_seed=4,
                            head_dim=tiny_config.head_dim)
    quantized = quantizer(keys.flatten(-2)).unflatten(-1, keys.shape[-2:])
    assert torch.allclose(quantized, per_token(keys @ q) @ q.T, atol=1e-12)
    # In attention this is rotating queries and cached keys: q k^T = (q R3)(Q(k R3))^T
    queries = torch.randn_like(keys)
    assert torch.allclose(queries @ quantized.transpose(-1, -2),
                          (queries @ q) @ per_token(keys @ q).transpose(-1, -2), atol=1e-12)


def test_sixteen_bits_with_rotation_generates_the_same_tokens_with_a_cache(tiny_llama, tiny_input_ids):
    model = with_scaled_norms(tiny_llama.double())
    expected = model.generate(tiny_input_ids, max_new_tokens=6, do_sample=False)
    student = quantize_model(model, QATConfig(rotate="hadamard"))
    assert torch.equal(student.generate(tiny_input_ids, max_new_tokens=6, do_sample=False), expected)


def test_rotated_student_saves_and_reloads_here_and_with_remote_code(tiny_llama, tiny_input_ids, tmp_path):
    fp = logits(tiny_llama, tiny_input_ids)
    config = QATConfig(4, 4, 4, kv_placement="post_rope", rotate="hadamard", rotate_seed=2)
    student = quantize_model(tiny_llama, config)
    expected = logits(student, tiny_input_ids)
    save_quantized(student, tmp_path / "ckpt")
    for loaded in (load_student(tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()):
        assert QATConfig(**loaded.config.llm_qat) == config and not loaded.config.tie_word_embeddings
        assert loaded.model.layers[0].mlp.down_proj.input_rotation.seed == 2
        assert torch.equal(logits(loaded, tiny_input_ids), expected)
    as_float = load_student(tmp_path / "ckpt", quantized=False)  # e.g. as a teacher: online R4 kept, 16 bits
    assert QATConfig(**as_float.config.llm_qat).label() == "16-16-16+hadamard.seed2"
    assert close(logits(as_float, tiny_input_ids), fp)


def test_a_rotated_students_rotation_cannot_change(tiny_llama):
    student = quantize_model(tiny_llama, QATConfig(4, 8, 16, rotate="hadamard"))
    quantize_model(student, QATConfig(8, 8, 16, rotate="hadamard"))  # other bits: fine
    for other in (QATConfig(4, 8, 16), QATConfig(4, 8, 16, rotate="hadamard", rotate_seed=1)):
        with pytest.raises(ValueError, match="weights of this student are rotated"):
            quantize_model(student, other)


def test_bad_rotation_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="pass --kv_placement post_rope"):
        QATConfig(4, 4, 4, rotate="hadamard")
    with pytest.raises(ValueError, match="rotate='hadamrd' is not one of none, hadamard, random"):
        QATConfig(rotate="hadamrd")
    assert QATConfig(4, 4, 16, rotate="hadamard").label() == "4-4-16+hadamard"
    assert QATConfig(4, 4, 4, kv_placement="post_rope", rotate="random", rotate_seed=3).label() == "4-4-4k+random.seed3"


def test_model_types_without_a_plain_rmsnorm_are_refused(tiny_sizes, make_tiny_model):
    gemma = make_tiny_model(GemmaConfig(**tiny_sizes, head_dim=16))
    with pytest.raises(ValueError, match="not 'gemma'; use rotate='none'"):
        quantize_model(gemma, QATConfig(rotate="hadamard"))


def test_weightless_models_change_structure_only(tiny_llama):
    before = {name: p.clone() for name, p in tiny_llama.named_parameters()}
    setattr(tiny_llama, WEIGHTS_UNREAD, True)
    rotate_model(tiny_llama, "hadamard")
    assert "lm_head.weight" in dict(tiny_llama.named_parameters()) and not tiny_llama.config.tie_word_embeddings
    assert all(torch.equal(before[name], p) for name, p in tiny_llama.named_parameters() if name in before)


def test_gradients_reach_the_weights_through_the_online_rotation(tiny_llama, tiny_input_ids):
    student = quantize_model(tiny_llama, QATConfig(4, 4, 16, rotate="hadamard")).train()
    student(tiny_input_ids).logits.sum().backward()
    down = student.model.layers[0].mlp.down_proj
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0
