"""Exports of a QAT student: packed integer weights that load back bit for bit, and folded float weights."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from models.checkpoint import save_quantized
from models.export import export, export_folded, export_packed
from models.packed import decompressed, integer_weight, load_packed
from models.quantize import QATConfig, QuantLinear, quantize_model, quantized_modules
from utils.training.loading import load_model

from conftest import load_script

VOCAB = 128


def tiny_llama(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


def save_student(directory: Path, w_bits: int, a_bits: int = 8, kv_bits: int = 4, options=None, **overrides) -> Path:
    """A student with `options` (QATConfig fields) from a tiny Llama with config `overrides`."""
    model = quantize_model(tiny_llama(**overrides), w_bits, a_bits, kv_bits, **(options or {}))
    with torch.no_grad():  # an all-zero output channel: its scale is 0, the case the quantizer special-cases
        model.model.layers[0].mlp.up_proj.weight[3] = 0
        for layer in quantized_modules(model).values():
            if layer.bias is not None:  # initialised to zero: make a lost bias visible
                layer.bias.normal_()
            clip = getattr(layer.weight_quantizer, "learned_clip", None)
            if clip is not None:  # initialised to 1, MinMax: make lost learned ranges visible
                clip.uniform_(0.6, 1.0)
    save_quantized(model, directory)
    return directory


def batch():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def safetensors_entries(directory: Path) -> dict[str, tuple[str, list[int]]]:
    entries = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                entries[key] = (tensor.get_dtype(), tensor.get_shape())
    return entries


def assert_same_logits(reference, candidate):
    x = batch()
    with torch.no_grad():
        expected, got = reference(x).logits, candidate(x).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("w_bits", [2, 3, 4, 8])
def test_integer_weight_reproduces_the_fake_quantized_weight(w_bits):
    layer = QuantLinear(torch.nn.Linear(48, 16, bias=False), QATConfig(w_bits=w_bits))
    with torch.no_grad():
        layer.weight[5] = 0
    codes, scales = integer_weight(layer)
    qmax = 2 ** (w_bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() == qmax
    assert torch.equal(codes.float() * scales, layer.quantized_weight())


@pytest.mark.parametrize("w_bits", [4, 8, 3])
def test_packed_export_loads_back_bit_for_bit(tmp_path, w_bits):
    checkpoint = save_student(tmp_path / "qat", w_bits, attention_bias=True)
    student = load_model(checkpoint)
    exported = load_packed(export_packed(checkpoint, tmp_path / "packed"))

    loaded_layers = quantized_modules(exported)
    for name, layer in quantized_modules(student).items():
        assert torch.equal(loaded_layers[name].weight, layer.quantized_weight()), name
        if layer.bias is not None:
            assert torch.equal(loaded_layers[name].bias, layer.bias), name
        assert (loaded_layers[name].a_bits, loaded_layers[name].out_bits) == (layer.a_bits, layer.out_bits)
    assert_same_logits(student, exported)


def test_packed_tensors_are_integers_of_the_right_width(tmp_path):
    entries = {}
    for w_bits in (4, 8):
        checkpoint = save_student(tmp_path / f"qat{w_bits}", w_bits)
        entries[w_bits] = safetensors_entries(export_packed(checkpoint, tmp_path / f"packed{w_bits}"))
    # W4: 8 codes per int32 word (two per byte); W8: one int8 per code. in_features of up_proj is 64.
    assert entries[4]["model.layers.0.mlp.up_proj.weight_packed"] == ("I32", [128, 64 // 8])
    assert entries[8]["model.layers.0.mlp.up_proj.weight"] == ("I8", [128, 64])
    for widths in entries.values():
        assert widths["model.layers.0.mlp.up_proj.weight_scale"] == ("F32", [128, 1])
        assert widths["model.embed_tokens.weight"][0] == "F32"  # float parts keep the checkpoint's dtype
        assert not any(key.endswith("proj.weight") and dtype.startswith("F") for key, (dtype, _) in widths.items())


def test_packed_config_records_activation_and_kv_schemes(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4, a_bits=6, kv_bits=4)
    config = json.loads((export_packed(checkpoint, tmp_path / "packed") / "config.json").read_text())
    packing = config["quantization_config"]
    assert packing["quant_method"] == "compressed-tensors" and packing["format"] == "pack-quantized"
    assert packing["ignore"] == ["lm_head"]
    by_target = {target: group for group in packing["config_groups"].values() for target in group["targets"]}
    for target, group in by_target.items():
        assert group["weights"] | {"num_bits": 4, "strategy": "channel", "symmetric": True} == group["weights"]
        assert group["input_activations"] | {"num_bits": 6, "strategy": "token", "dynamic": True} \
            == group["input_activations"]
        kv = group["output_activations"]
        assert (kv is not None) == ("k_proj" in target)
        if kv is not None:
            assert kv | {"num_bits": 4, "strategy": "token", "dynamic": True} == kv
    assert config["llm_qat"] == {"w_bits": 4, "a_bits": 6, "kv_bits": 4, "act_symmetric": True, "ste_clip": 2.0,
                                 "w_group_size": None, "kv_placement": "pre_rope", "recipe": "paper", "grid": "paper",
                                 "arithmetic": "float", "rotate": "none", "rotate_seed": 0, "scheme": None,
                                 "kv_scheme": None, "learn_ranges": "none"}
    assert "auto_map" not in config


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_reads_the_packed_weights_with_compressed_tensors(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    student = load_model(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(export_packed(checkpoint, tmp_path / "packed"),
                                                  quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.float32)
    for name, layer in quantized_modules(student).items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.quantized_weight()), name


@pytest.mark.parametrize("w_bits", [4, 8])
def test_folded_export_is_idempotent_and_gives_the_same_logits(tmp_path, w_bits):
    checkpoint = save_student(tmp_path / "qat", w_bits)
    student = load_model(checkpoint)
    folded_dir = export_folded(checkpoint, tmp_path / "folded")

    plain = load_model(folded_dir, quantized=False)  # what a tool that knows nothing of quantization sees
    assert not quantized_modules(plain)
    requantized = load_model(folded_dir)  # llm_qat in its config: the same student, its weights as stored
    assert requantized.config.llm_qat["w_bits"] == w_bits
    for name, layer in quantized_modules(requantized).items():
        assert torch.equal(plain.get_submodule(name).weight, quantized_modules(student)[name].quantized_weight())
        assert torch.equal(layer.quantized_weight(), layer.weight), name
    assert_same_logits(student, requantized)


@pytest.mark.parametrize("export_format", ["packed", "folded"])
@pytest.mark.parametrize("placement", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("recipe", ["paper", "deploy"])
def test_every_export_reloads_to_the_students_logits_exactly(tmp_path, recipe, placement, export_format):
    """A loaded export uses its stored codes and scales: re-deriving them is not idempotent on the deploy recipe's
    full grid (int4 -8s comes back as max / 7.5), which moved the logits by 1-16 %. Equal to the bit, float32."""
    checkpoint = save_student(tmp_path / "qat", 4, options=dict(recipe=recipe, kv_placement=placement))
    student = load_model(checkpoint)
    loaded = load_model(export(checkpoint, tmp_path / export_format, export_format))
    assert all(layer.weight_on_grid for layer in quantized_modules(loaded).values())
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("export_format", ["packed", "folded"])
@pytest.mark.parametrize("recipe", ["paper", "deploy"])
def test_learned_ranges_are_what_every_export_holds(tmp_path, recipe, export_format):
    """The learned clipping factors are in the exported codes and scales: the export reloads to the student's logits
    exactly, and plain transformers reads its weights as the student quantizes them."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    checkpoint = save_student(tmp_path / "qat", 4, options=dict(recipe=recipe, learn_ranges="weights",
                                                               w_group_size=16))
    student = load_model(checkpoint)
    exported = export(checkpoint, tmp_path / export_format, export_format)
    loaded = load_model(exported)
    assert not any(name.endswith("learned_clip") for name, _ in loaded.named_parameters())  # nothing left to learn
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)
    plain = (AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
             if export_format == "packed" else load_model(exported, quantized=False))
    for name, layer in quantized_modules(student).items():
        assert torch.equal(plain.get_submodule(name).weight, layer.quantized_weight()), name
    minmax = quantize_model(load_model(checkpoint, quantized=False), QATConfig(**{
        **student.config.llm_qat, "learn_ranges": "none"}))
    assert not torch.equal(minmax.model.layers[0].mlp.up_proj.quantized_weight(),
                           student.model.layers[0].mlp.up_proj.quantized_weight())


@pytest.mark.parametrize("export_format", ["packed", "folded"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 16)])
@pytest.mark.parametrize("learn_ranges", ["none", "weights"])
def test_vllm_recipe_exports_reload_to_the_students_logits_exactly(tmp_path, bits, export_format, learn_ranges):
    """The vLLM arithmetic (integer products from the stored scales; bfloat16 int4 scales and weights) survives an
    export, learned ranges included: equal to the bit, float32."""
    checkpoint = save_student(tmp_path / "qat", bits[0], bits[1], 16,
                              options=dict(recipe="vllm", learn_ranges=learn_ranges))
    if learn_ranges != "none" and bits == (8, 8) and export_format == "folded":
        with pytest.raises(ValueError, match=r"a folded export keeps no scales .*; use --format packed"):
            export(checkpoint, tmp_path / export_format, export_format)
        return
    student = load_model(checkpoint)
    loaded = load_model(export(checkpoint, tmp_path / export_format, export_format))
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


def test_an_export_is_not_exported_again_nor_requantized_on_another_grid(tmp_path):
    checkpoint = save_student(tmp_path / "qat", 4, options=dict(recipe="deploy"))
    packed = export_packed(checkpoint, tmp_path / "packed")
    with pytest.raises(ValueError, match="is a packed export already; export the QAT checkpoint it was exported from"):
        export_folded(packed, tmp_path / "folded")
    with pytest.raises(ValueError, match="weights are a packed export's, on the grid of w_bits=4, w_group_size=None, "
                                         "grid=full; keep those settings"):
        quantize_model(load_model(packed), QATConfig(8, 8, 4, recipe="deploy"))
    assert quantize_model(load_model(packed), QATConfig(4, 16, 16, recipe="deploy"))  # other A / KV bits: fine


def test_an_export_of_a_training_run_can_be_replaced_with_force(tmp_path):
    run = save_student(tmp_path / "run", 4)  # a training run's output directory holds its trainer state
    (run / "trainer_state.json").write_text("{}")
    export(run, tmp_path / "out", "packed")
    assert not (tmp_path / "out" / "trainer_state.json").exists()
    export(run, tmp_path / "out", "packed", force=True)  # was refused: the export looked like a training run
    assert_same_logits(load_model(run), load_model(tmp_path / "out"))


def test_a_float_checkpoint_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    for export_to in (export_packed, export_folded):
        with pytest.raises(ValueError, match="not a QAT checkpoint"):
            export_to(tmp_path / "float", tmp_path / "out")


def test_exporting_over_the_checkpoint_is_refused_and_leaves_it_intact(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    before = (checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export(checkpoint, checkpoint, "packed")
    assert (checkpoint / "model.safetensors").read_bytes() == before


def test_load_model_reads_a_packed_export_as_the_student(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    packed = export_packed(checkpoint, tmp_path / "packed")
    assert_same_logits(load_model(checkpoint), load_model(packed))


def test_packed_refuses_unquantized_weights(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=16, a_bits=8, kv_bits=8)
    with pytest.raises(ValueError, match="packed format needs w_bits in 2..8"):
        export_packed(checkpoint, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


# ---- floating-point schemes: compressed-tensors' FP8, NVFP4 and MXFP4 formats ----

FLOAT_STUDENTS = [dict(scheme="NVFP4A16"), dict(scheme="MXFP4", kv_scheme="FP8"), dict(scheme="MXFP4A16"),
                  dict(scheme="FP8", kv_scheme="FP8_TENSOR"), dict(scheme="FP8_DYNAMIC", kv_scheme="FP8"),
                  dict(w_bits=4, kv_scheme="FP8", kv_placement="post_rope")]
FLOAT_IDS = ["NVFP4A16", "MXFP4-kvfp8", "MXFP4A16", "FP8-kvfp8tensor", "FP8_DYNAMIC-kvfp8", "4-16-fp8k"]


def save_float_student(directory: Path, options: dict) -> Path:
    options = dict(options)
    return save_student(directory, options.pop("w_bits", 16), 16, 16, options=options)


def stored_layer_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {key.removeprefix(f"{name}."): handle.get_tensor(key) for key in handle.keys()
                if key.startswith(f"{name}.")}


@pytest.mark.parametrize("options", FLOAT_STUDENTS, ids=FLOAT_IDS)
def test_float_exports_decompress_to_the_students_weights_bit_for_bit(tmp_path, options):
    """compressed-tensors' own tensors, by its own decompressors (NVFP4's in float32: its default rounds to bf16)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    checkpoint = save_float_student(tmp_path / "qat", options)
    packed = export_packed(checkpoint, tmp_path / "packed")
    packing = QuantizationConfig.model_validate(json.loads((packed / "config.json").read_text())["quantization_config"])
    scheme = next(iter(packing.config_groups.values()))
    for name, layer in quantized_modules(load_model(checkpoint)).items():
        stored = stored_layer_tensors(packed, name)
        expected = layer.quantized_weight()
        assert torch.equal(decompressed(stored, scheme), expected), name
        library = BaseCompressor.get_value_from_registry(scheme.format).decompress(stored, scheme)["weight"]
        assert torch.equal(library, expected.to(library.dtype)), name  # FP4: bfloat16, exactly expected rounded
    nvfp4 = ("nvfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                                      "weight_global_scale": torch.float32})
    mxfp4 = ("mxfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.uint8})
    fp8 = ("float-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32})
    integer = ("pack-quantized", {"weight_packed": torch.int32, "weight_scale": torch.float32, "weight_shape": torch.int64})
    storage, dtypes = {"NVFP4A16": nvfp4, "MXFP4": mxfp4, "MXFP4A16": mxfp4, "FP8": fp8, "FP8_DYNAMIC": fp8,
                       None: integer}[options.get("scheme")]
    assert packing.format == storage
    stored = stored_layer_tensors(packed, "model.layers.0.mlp.up_proj")
    assert {key: tensor.dtype for key, tensor in stored.items()} == dtypes
    if "weight_global_scale" in stored:  # compressed-tensors stores g = 448 * 6 / max|W| and divides by it
        weight = load_model(checkpoint).model.layers[0].mlp.up_proj.weight
        assert torch.equal(stored["weight_global_scale"], (448 * 6 / weight.abs().max()).reshape(1))


def test_float_export_config_describes_activations_and_kv_as_the_student_runs_them(tmp_path):
    checkpoint = save_float_student(tmp_path / "qat", dict(scheme="FP8", kv_scheme="FP8"))
    packing = json.loads((export_packed(checkpoint, tmp_path / "packed") / "config.json").read_text())
    groups = {target: group for group in packing["quantization_config"]["config_groups"].values()
              for target in group["targets"]}
    for target, group in groups.items():
        assert group["weights"] | {"num_bits": 8, "type": "float", "strategy": "tensor"} == group["weights"]
        # the FP8 preset's input scale is static (calibrated); the student's is computed at every forward
        assert group["input_activations"] | {"type": "float", "strategy": "tensor", "dynamic": True} \
            == group["input_activations"]
        kv = group["output_activations"]
        assert (kv is not None) == ("k_proj" in target)
        assert kv is None or kv | {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True} == kv
    assert packing["llm_qat"]["scheme"] == "FP8" and packing["llm_qat"]["kv_scheme"] == "FP8"


@pytest.mark.parametrize("options", FLOAT_STUDENTS, ids=FLOAT_IDS)
def test_float_exports_reload_as_the_student_from_their_stored_weights(tmp_path, options):
    checkpoint = save_float_student(tmp_path / "qat", options)
    student = load_model(checkpoint)
    loaded = load_model(export_packed(checkpoint, tmp_path / "packed"))
    assert QATConfig(**loaded.config.llm_qat) == QATConfig(**student.config.llm_qat)
    calls = []
    for layer in quantized_modules(loaded).values():  # never re-derived: the weight quantizer does not run
        assert layer.weight_on_grid
        layer.weight_quantizer.register_forward_hook(lambda *args: calls.append(1))
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)
    assert not calls


def test_a_float_export_is_not_requantized_in_another_weight_format(tmp_path):
    packed = export_packed(save_float_student(tmp_path / "qat", dict(scheme="MXFP4A16")), tmp_path / "packed")
    with pytest.raises(ValueError, match="weights are a packed export's, on the grid of scheme=MXFP4A16; keep"):
        quantize_model(load_model(packed), QATConfig(scheme="NVFP4A16"))
    assert quantize_model(load_model(packed), QATConfig(scheme="MXFP4", kv_scheme="FP8"))  # same weights: fine


@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC"])
def test_fp8_exports_run_as_trained_in_plain_transformers(tmp_path, scheme):
    """compressed-tensors' forward: FP8 weights, dynamic FP8 activations and k/v outputs, all float32."""
    checkpoint = save_float_student(tmp_path / "qat", dict(scheme=scheme, kv_scheme="FP8"))
    with torch.no_grad():
        expected = load_model(checkpoint)(batch()).logits
    got = plain_transformers_logits(export_packed(checkpoint, tmp_path / "packed"))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("scheme", ["NVFP4A16", "MXFP4"])
def test_plain_transformers_runs_fp4_exports_with_the_students_weights_in_bfloat16(tmp_path, scheme):
    """compressed-tensors 0.20 unpacks FP4 in bfloat16 whatever the model's dtype (a float32 forward fails on it):
    its weights are the student's rounded to bfloat16 (MXFP4's exactly the student's)."""
    from transformers import AutoModelForCausalLM

    checkpoint = save_float_student(tmp_path / "qat", dict(scheme=scheme))
    model = AutoModelForCausalLM.from_pretrained(export_packed(checkpoint, tmp_path / "packed"), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(batch()).logits).all()  # the first forward decompresses
    for name, layer in quantized_modules(load_model(checkpoint)).items():
        assert torch.equal(model.get_submodule(name).weight, layer.quantized_weight().to(torch.bfloat16)), name


def test_nvfp4_activations_are_refused_packed_in_one_line_and_export_folded(tmp_path, capsys):
    checkpoint = save_float_student(tmp_path / "qat", dict(scheme="NVFP4", kv_scheme="FP8"))
    with pytest.raises(ValueError, match=r"global scale that compressed-tensors and vLLM take from calibration.*"
                                         r"--format folded, or train weights only \(--scheme NVFP4A16\)"):
        export(checkpoint, tmp_path / "out", "packed")
    with pytest.raises(SystemExit) as refused:
        load_script("export").main([str(checkpoint), str(tmp_path / "out")])
    assert refused.value.code == 2 and "--scheme NVFP4A16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    folded = export(checkpoint, tmp_path / "folded", "folded")
    x = batch()
    with torch.no_grad():
        assert torch.equal(load_model(folded)(x).logits, load_model(checkpoint)(x).logits)


def test_cli_prints_sizes_and_ratio(tmp_path, capsys):
    cli = load_script("export")
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    cli.main([str(checkpoint), str(tmp_path / "packed"), "--format", "packed"])
    printed = capsys.readouterr().out
    size_in, size_out = cli.weight_bytes(checkpoint), cli.weight_bytes(tmp_path / "packed")
    assert size_out < size_in
    assert f"{size_in / size_out:.2f}x" in printed and "MB" in printed
    with pytest.raises(SystemExit) as refused:
        cli.main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert refused.value.code == 2


@pytest.mark.slow
def test_w4_packed_default_model_is_at_most_035_of_bf16_linears(tmp_path):
    model = quantize_model(load_model(), 4, 8, 4)
    linear_elements = sum(layer.weight.numel() for layer in quantized_modules(model).values())
    save_quantized(model.to(torch.bfloat16), tmp_path / "qat")  # bf16: half the bytes to write and read back
    del model
    entries = safetensors_entries(export_packed(tmp_path / "qat", tmp_path / "packed"))
    itemsize = {"I32": 4, "I64": 8, "F32": 4, "I8": 1}
    packed_bytes = sum(itemsize[dtype] * torch.Size(shape).numel() for key, (dtype, shape) in entries.items()
                       if key.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_shape"))
    assert packed_bytes <= 0.35 * 2 * linear_elements


# ---- bad targets and damaged files: refused before any work, nothing overwritten ----

def test_a_non_empty_output_needs_force_and_force_replaces_it(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    other = tmp_path / "other_model"
    tiny_llama().save_pretrained(other)
    before = {path.name: path.read_bytes() for path in other.iterdir()}
    with pytest.raises(ValueError, match="is not empty; pass --force"):
        export(checkpoint, other, "packed")
    assert {path.name: path.read_bytes() for path in other.iterdir()} == before
    export(checkpoint, other, "packed", force=True)
    assert_same_logits(load_model(checkpoint), load_model(other))
    assert not list(tmp_path.glob(".other_model-*"))  # the staging directory is gone


def test_a_training_run_or_its_checkpoint_is_never_an_export_target(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    run = tmp_path / "run"
    save_student(run / "checkpoint-3", w_bits=4)
    before = (run / "checkpoint-3" / "model.safetensors").read_bytes()
    for target in (run / "checkpoint-3", run):
        with pytest.raises(ValueError, match="training run or one of its checkpoints"):
            export(checkpoint, target, "folded", force=True)
    assert (run / "checkpoint-3" / "model.safetensors").read_bytes() == before


def test_truncated_weights_are_one_line_naming_the_file(tmp_path):
    checkpoint = save_student(tmp_path / "qat", w_bits=4)
    packed = export_packed(checkpoint, tmp_path / "packed")
    for directory in (checkpoint, packed):
        weights = directory / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        with pytest.raises(OSError, match=r"model\.safetensors cannot be read .*truncated or damaged") as error:
            load_model(directory)
        assert str(weights) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(OSError, match="truncated or damaged"):
        export_folded(checkpoint, tmp_path / "folded")
    cli = load_script("export")
    with pytest.raises(SystemExit, match=r"export.py: error: .*model\.safetensors cannot be read") as refused:
        cli.main([str(checkpoint), str(tmp_path / "out")])
    assert refused.value.code == 2


@pytest.mark.parametrize("w_bits", [4, 8])
def test_group_wise_post_rope_student_exports_packed_and_loads_back_exactly(tmp_path, w_bits):
    checkpoint = save_student(tmp_path / "qat", w_bits, options=dict(w_group_size=32, kv_placement="post_rope"))
    packed = export_packed(checkpoint, tmp_path / "packed")
    scheme = json.loads((packed / "config.json").read_text())["quantization_config"]
    groups = list(scheme["config_groups"].values())
    assert all(group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32 for group in groups)
    assert all(group["output_activations"] is None for group in groups)  # post_rope: the KV quantizer is the cache's
    assert scheme["kv_cache_scheme"] | {"num_bits": 4, "strategy": "token"} == scheme["kv_cache_scheme"]
    student, loaded = load_model(checkpoint), load_model(packed)
    for name, layer in quantized_modules(student).items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.quantized_weight()), name
    assert QATConfig(**loaded.config.llm_qat) == QATConfig(w_bits, 8, 4, w_group_size=32, kv_placement="post_rope")
    assert_same_logits(student, loaded)


def plain_transformers_logits(packed: Path) -> torch.Tensor:
    """The export as plain transformers + compressed-tensors run it: no remote code, its own quantized forward
    (weights decompressed, dynamic per-token input activations, k/v output activations)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
    with torch.no_grad():
        return model(batch()).logits


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("options", [dict(), dict(act_symmetric=False, w_group_size=32)])
def test_deploy_recipe_export_runs_as_trained_in_plain_transformers(tmp_path, w_bits, options):
    checkpoint = save_student(tmp_path / "qat", w_bits, options=dict(recipe="deploy", **options))
    with torch.no_grad():
        expected = load_model(checkpoint)(batch()).logits
    got = plain_transformers_logits(export_packed(checkpoint, tmp_path / "packed"))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_paper_recipe_export_runs_differently_in_plain_transformers(tmp_path):
    """Why the deploy recipe exists (README "Recipes"): compressed-tensors runs its own grid, not the paper's."""
    checkpoint = save_student(tmp_path / "qat", 4)
    with torch.no_grad():
        expected = load_model(checkpoint)(batch()).logits
    got = plain_transformers_logits(export_packed(checkpoint, tmp_path / "packed"))
    assert (got - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("export_format", ["packed", "folded"])
def test_rotated_student_exports_and_loads_back_with_its_online_rotations(tmp_path, export_format):
    options = dict(kv_placement="post_rope", rotate="hadamard", rotate_seed=1)
    checkpoint = save_student(tmp_path / "qat", 4, 4, 4, options=options)
    exported = export(checkpoint, tmp_path / export_format, export_format)
    student, loaded = load_model(checkpoint), load_model(exported)
    assert QATConfig(**json.loads((exported / "config.json").read_text())["llm_qat"]) == QATConfig(4, 4, 4, **options)
    assert loaded.model.layers[1].mlp.down_proj.input_rotation is not None
    assert_same_logits(student, loaded)
