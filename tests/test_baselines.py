"""The llm-compressor baselines (scripts/baseline.py, utils/evaluation/baselines.py): GPTQ's float model and its
compressed-tensors export for vLLM, SmoothQuant, and which W-A-KV rows a GPTQ model is evaluated at. The runs need
`make baselines` (.venv-baselines) and skip with that reason without it; serving the export also needs `make vllm`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from conftest import load_script, save_tiny_teacher, vllm_sized_llama
from models.quantize import QATConfig, quantize_model, quantized_modules
from utils.evaluation.baselines import applied_quantization, check_baseline_args, check_group_size, gptq_scales
from utils.evaluation.serving import VLLM_PYTHON, cpu_flags, own_log_probs, served_log_probs, vllm_kernel_missing
from utils.safety import CommandError
from utils.evaluation.baselines import start_from_gptq
from utils.training.loading import load_model

REPO = Path(__file__).resolve().parents[1]
BASELINE_PYTHON = REPO / ".venv-baselines" / "bin" / "python"

needs_baselines = pytest.mark.skipif(
    not BASELINE_PYTHON.is_file() or subprocess.run([str(BASELINE_PYTHON), "-c", "import llmcompressor"],
                                                    capture_output=True).returncode != 0,
    reason="llm-compressor is not installed (make baselines)")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="vLLM is not installed (make vllm)")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "data.jsonl"
    generator = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, 1000, (16,), generator=generator).tolist()})
                            + "\n" for _ in range(8)))
    return path


def make_baseline(teacher, calibration, out, method, *extra):
    command = [str(BASELINE_PYTHON), "scripts/baseline.py", method, "--model", str(teacher), "--calibration",
               str(calibration), "--output", str(out), *extra]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return out


def test_a_gptq_model_is_evaluated_at_its_own_weights_and_settings_it_cannot_take_are_refused(tiny_llama):
    per_channel, grouped = ({"method": "gptq", "w_bits": 4, "w_group_size": size} for size in (None, 32))
    assert applied_quantization(grouped, QATConfig(4, 8, 4, w_group_size=32)) == QATConfig(16, 8, 4)
    assert applied_quantization(per_channel, QATConfig(4, 8, 4)) == QATConfig(16, 8, 4)
    with pytest.raises(ValueError, match="has 4-bit weights in groups of 32, not 4-bit weights per channel; use "
                                         "it at W = 4 --w-group-size 32, or run scripts/baseline.py gptq --w-bits 4$"):
        applied_quantization(grouped, QATConfig(4, 8, 4))
    with pytest.raises(ValueError, match="not 4-bit weights in groups of 128; use it at W = 4, or"):
        applied_quantization(per_channel, QATConfig(4, 8, 4, w_group_size=128))
    with pytest.raises(ValueError, match="are GPTQ's; smoothquant takes neither"):
        check_baseline_args("smoothquant", None, 0.5, a_bits=8)
    with pytest.raises(ValueError, match="--a-bits=12 is not supported"):
        check_baseline_args("gptq", 8, 0.5, a_bits=12)
    check_group_size(tiny_llama, 32)
    with pytest.raises(ValueError, match=r"--w-group-size 48 does not divide .* \(64, 128\); use a divisor of 64"):
        check_group_size(tiny_llama, 48)


@needs_baselines
def test_gptq_weights_lie_on_a_4_bit_grid_and_evaluate_with_the_rows_activation_quantizers(tiny_teacher, calibration,
                                                                                           tmp_path):
    make_baseline(tiny_teacher, calibration, tmp_path / "gptq", "gptq", "--w-bits", "4")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["llm_qat_baseline"]["method"] == "gptq" and "quantization_config" not in config
    gptq, teacher = (LlamaForCausalLM.from_pretrained(path) for path in (tmp_path / "gptq", tiny_teacher))
    for name, module in gptq.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            levels = [row.unique().numel() for row in module.weight]
            assert max(levels) <= 16, name  # 4 bits: at most 16 values per output channel
            assert not torch.equal(module.weight, teacher.get_submodule(name).weight)
    evaluate = load_script("evaluate")
    result = evaluate.main([str(tmp_path / "gptq"), "4", "8", "4", "--tasks", "none", "--teacher", str(tiny_teacher),
                            "--heldout", str(calibration), "--max-length", "16",
                            "--output", str(tmp_path / "gptq.json")])
    assert result["method"] == "gptq" and result["label"] == "4-8-4"
    assert (result["quantization"]["w_bits"], result["quantization"]["a_bits"]) == (16, 8)  # weights are GPTQ's
    with pytest.raises(CommandError, match="use it at W = 4"):
        evaluate.main([str(tmp_path / "gptq"), "8", "8", "8", "--tasks", "none", "--output", str(tmp_path / "x.json")])


@pytest.fixture(scope="module")
def gptq_starts(tiny_teacher, calibration, tmp_path_factory):
    """4-bit GPTQ models of the tiny teacher, by weight group size (None: per channel)."""
    root = tmp_path_factory.mktemp("gptq-starts")
    return {size: make_baseline(tiny_teacher, calibration, root / f"g{size}", "gptq", "--w-bits", "4",
                                *(("--w-group-size", str(size)) if size else ())) for size in (None, 32)}


@needs_baselines
@pytest.mark.parametrize("group_size", [None, 32])
def test_a_gptq_start_with_learned_ranges_is_gptqs_quantized_model(gptq_starts, group_size):
    """The clipping factors start at GPTQ's scale / MinMax scale: the student's codes are GPTQ's to the bit (the
    integers its stored weights are of its scales) and its weights GPTQ's to an ulp of the scale. The MinMax quantizer
    alone re-derives other scales from the same weights (max|code| s / 7.5 instead of s)."""
    gptq = gptq_starts[group_size]
    config = QATConfig(4, 16, 16, recipe="deploy", w_group_size=group_size, learn_ranges="weights")
    student = start_from_gptq(quantize_model(load_model(gptq, quantized=False), config), gptq, config)
    minmax = quantize_model(load_model(gptq, quantized=False), QATConfig(4, 16, 16, recipe="deploy",
                                                                          w_group_size=group_size))
    gptq_weights, scales = load_model(gptq, quantized=False), gptq_scales(gptq)
    moved = 0
    for name, layer in quantized_modules(student).items():
        weight, scale = gptq_weights.get_submodule(name).weight, scales[name]
        expanded = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        codes, steps = layer.weight_codes()
        assert torch.equal(codes, torch.round(weight / expanded)) and codes.min() >= -8 and codes.max() <= 7, name
        torch.testing.assert_close(steps.reshape(scale.shape), scale, rtol=2 ** -23, atol=0)
        torch.testing.assert_close(layer.quantized_weight(), weight, rtol=2 ** -22, atol=0)
        moved += not torch.equal(quantized_modules(minmax)[name].quantized_weight(), weight)
    assert moved == len(quantized_modules(student))


@needs_baselines
def test_train_starts_from_the_gptq_model_and_distils_from_the_float_teacher(gptq_starts, tiny_teacher, calibration,
                                                                             tmp_path, monkeypatch):
    """train.py --init_from: the teacher is the float model, the student GPTQ's weights with GPTQ's scales (at
    learning rate 0 the saved student is GPTQ's model), saved as a QAT student that says where it started."""
    import train

    loads = []

    def load(path, dtype, training_args):
        loads.append(str(path))
        return load_model(path, dtype, quantized=False)

    monkeypatch.setattr(train, "load_float_model", load)
    gptq = gptq_starts[None]
    train.main(["--model_name_or_path", str(tiny_teacher), "--init_from", str(gptq), "--data_path", str(calibration),
                "--output_dir", str(tmp_path / "out"), "--model_max_length", "16", "--w_bits", "4", "--a_bits", "8",
                "--kv_bits", "4", "--recipe", "deploy", "--learn_ranges", "weights", "--learning_rate", "0",
                "--max_steps", "1", "--use_cpu", "--save_strategy", "no"])
    assert loads == [str(tiny_teacher), str(gptq)]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())  # a QAT student, not GPTQ's fixed weights
    assert "llm_qat_baseline" not in saved and saved["llm_qat_start"]["method"] == "gptq"
    student, gptq_weights = load_model(tmp_path / "out"), load_model(gptq, quantized=False)
    for name, layer in quantized_modules(student).items():
        torch.testing.assert_close(layer.quantized_weight(), gptq_weights.get_submodule(name).weight, rtol=2 ** -22,
                                   atol=0)


@needs_baselines
def test_run_train_makes_the_gptq_start_beside_the_data_once_and_trains_from_it(tiny_teacher, calibration, tmp_path):
    data = tmp_path / "gen" / "all.jsonl"
    data.parent.mkdir()
    data.write_text(calibration.read_text())
    env = {**os.environ, "MODEL": str(tiny_teacher), "DATA": str(data), "INIT": "gptq", "CPU_MAX_LENGTH": "16",
           "PYTHON": sys.executable}

    def run_train(output, recipe):
        return subprocess.run(["bash", "scripts/run_train.sh", "4", "16", "16", "--max_steps", "1"], cwd=REPO,
                              env={**env, "RECIPE": recipe, "OUTPUT_DIR": str(output)}, capture_output=True, text=True)

    refused = run_train(tmp_path / "paper", "paper")
    assert refused.returncode == 2 and refused.stderr.strip().endswith("add --recipe deploy")
    assert not (tmp_path / "gen" / "gptq-w4").exists()  # refused before the GPTQ model is made
    result = run_train(tmp_path / "deploy", "deploy")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "making the GPTQ start" in result.stdout
    assert json.loads((tmp_path / "gen" / "gptq-w4" / "config.json").read_text())["llm_qat_baseline"]["w_bits"] == 4
    assert "starting from the GPTQ model" in result.stderr and (tmp_path / "deploy" / "config.json").is_file()
    again = run_train(tmp_path / "again", "deploy")
    assert again.returncode == 0 and "making the GPTQ start" not in again.stdout  # made once, then reused


def decompressed(export: Path):
    """The export's weights as compressed-tensors decompresses them (codes * scales), in a plain float model."""
    unpacked = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(export, quantization_config=unpacked, dtype=torch.float32)


# GPTQ on the vLLM-sized Llama, as vLLM's CPU build serves it: int4 weight-only (W4A16, in bfloat16 only, the scales
# rounded to bfloat16 at load) and int8 W8A8 (dynamic per-token int8 activations, the paper grid's, in float32).
EXPORTS = {"w4g32": (("--w-bits", "4", "--w-group-size", "32"), "pack-quantized", 16, "bfloat16"),
           "w8a8": (("--w-bits", "8", "--a-bits", "8"), "int-quantized", 8, "float32")}


@pytest.fixture(scope="module", params=EXPORTS)
def gptq_export(request, tmp_path_factory, calibration):
    """(the GPTQ baseline directory, its scripts/baseline.py flags, export format, activation bits, vLLM dtype)."""
    directory = tmp_path_factory.mktemp(request.param)
    model, tokenizer = vllm_sized_llama()
    model.save_pretrained(directory / "float")
    tokenizer.save_pretrained(directory / "float")
    flags = EXPORTS[request.param][0]
    return make_baseline(directory / "float", calibration, directory / "gptq", "gptq", *flags), *EXPORTS[request.param]


@needs_baselines
@pytest.mark.slow
def test_gptq_export_is_llm_compressors_scheme_and_holds_the_float_models_weights(gptq_export, calibration):
    """compressed/ decompressed is the float model's weights bit for bit. --a-bits changes only the export's scheme:
    GPTQ calibrates with every quantizer off, so the weights are those of the weight-only run."""
    gptq, flags, format_, a_bits, _ = gptq_export
    settings = json.loads((gptq / "config.json").read_text())["llm_qat_baseline"]
    assert (settings["compressed"], settings["a_bits"]) == ("compressed", a_bits)
    packing = json.loads((gptq / "compressed" / "config.json").read_text())["quantization_config"]
    (scheme,) = packing["config_groups"].values()
    assert (packing["format"], packing["ignore"]) == (format_, ["lm_head"])
    dynamic_per_token = {"num_bits": a_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    activations = scheme["input_activations"]
    assert activations is None if a_bits == 16 else dynamic_per_token.items() <= activations.items()
    float_weights = load_model(gptq, quantized=False).state_dict()
    assert all(torch.equal(tensor, float_weights[name])
               for name, tensor in decompressed(gptq / "compressed").state_dict().items())
    if a_bits != 16:
        weight_only = make_baseline(gptq.parent / "float", calibration, gptq.parent / "weight-only", "gptq", *flags[:2])
        assert all(torch.equal(tensor, float_weights[name])
                   for name, tensor in load_model(weight_only, quantized=False).state_dict().items())


@needs_baselines
@needs_vllm
@pytest.mark.slow
def test_vllm_serves_the_gptq_export_as_the_float_gptq_model(gptq_export):
    """vLLM's log p of the export against the float GPTQ model (float32) with the export's activation quantizer, in
    nats per token. W4A16 in bfloat16: measured mean 4.1e-3, max 1.8e-2, what serving the float model in bfloat16
    costs. W8A8 in float32: mean 7.7e-4, max 1.2e-2: vLLM's int8 activation quantizer is the paper grid's bit for bit,
    but it sums the int8 products exactly where the float model sums dequantized floats, which flips the odd code on
    a rounding tie, and a flip travels on (tests/test_serving.py); without the A8 quantizer: mean 8.0e-3."""
    gptq, _, _, a_bits, dtype = gptq_export
    missing = vllm_kernel_missing(QATConfig(4 if a_bits == 16 else 8, a_bits, 16), cpu_flags())
    if missing:
        pytest.skip(f"this CPU cannot show it: {missing}")
    sequences = torch.randint(10, 40000, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    served = served_log_probs(gptq / "compressed", sequences, dtype)["log_probs"]
    reference = quantize_model(load_model(gptq, quantized=False), QATConfig(16, a_bits, 16))
    own, _ = own_log_probs(reference, sequences)
    difference = torch.cat([(torch.tensor(row) - mine).abs() for row, mine in zip(served, own)])
    print(f"\n{gptq.parent.name}, {dtype}: mean {difference.mean():.2e}, max {difference.max():.2e} nats per token")
    mean, largest = (1e-2, 5e-2) if dtype == "bfloat16" else (3e-3, 5e-2)
    assert difference.mean() < mean and difference.max() < largest


@needs_baselines
def test_smoothquant_keeps_the_float_function_and_moves_scale_into_the_norms(tiny_teacher, calibration, tmp_path):
    make_baseline(tiny_teacher, calibration, tmp_path / "sq", "smoothquant", "--smoothing-strength", "0.8")
    smoothed, teacher = (LlamaForCausalLM.from_pretrained(path).double() for path in (tmp_path / "sq", tiny_teacher))
    assert not torch.equal(smoothed.model.layers[0].input_layernorm.weight,
                           teacher.model.layers[0].input_layernorm.weight)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, teacher(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(subprocess.CalledProcessError):  # an existing output is never overwritten
        make_baseline(tiny_teacher, calibration, tmp_path / "sq", "smoothquant")


def test_baseline_without_llm_compressor_names_the_fix(tiny_teacher, calibration, tmp_path, monkeypatch):
    import builtins

    from utils.evaluation import baselines
    real_import = builtins.__import__

    def no_llmcompressor(name, *args, **kwargs):
        if name.startswith("llmcompressor"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llmcompressor)
    with pytest.raises(ImportError, match="make baselines"):
        baselines.run_baseline("gptq", str(tiny_teacher), calibration, tmp_path / "out", w_bits=4)
    assert not (tmp_path / "out").exists()
