"""The repository's structure: layers depend downward only, the pipeline's stages in their order, light stages load
no model stack, and saved checkpoints carry code that runs alone.

Entry points (generate_data.py, merge_gen_data.py, train.py, scripts/) may import every stage. utils/ is one package
per pipeline stage, in this order: a stage imports only the stages before it (and `utils.safety`, which every stage
shares and which imports nothing of the repository):

    data -> training -> evaluation -> report

Model loading (utils/training/loading.py) belongs to training, not below data: the data stage never loads a model.
generate_data.py, an entry point, loads the teacher and hands it to synthesis; and the one thing the data needs from
loading, the embedded default teacher's name, is part of the teacher identity in utils/data/records.py, which loading
imports from there. So merging text files needs no torch, transformers or accelerate, and loading, which needs all
three, is imported only from training up (evaluation loads models for its baselines; the report stage's paper table
runs its models through command lines).

The modules vLLM's own environment runs (`make vllm`: it pins another transformers) import only vLLM and the standard
library.

The light modules (the records and the merge of the data stage, the report stage, and what they import) never import
torch, transformers or accelerate at module level: `merge_gen_data.py --help` starts at once, and tables are made
without the model stack.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import REMOTE_CODE_SOURCES, save_quantized
from models.quantize import QATConfig, quantize_model

REPO = Path(__file__).resolve().parents[1]
ABOVE_MODELS = {"utils", "scripts", "bench", "tests", "train", "generate_data", "merge_gen_data"}
REPO_PACKAGES = ABOVE_MODELS | {"models"}
STAGES = ("data", "training", "evaluation", "report")  # utils/'s packages, in pipeline order
SHARED = "safety"  # utils/safety.py: below every stage
LIGHT = ("utils.safety", "utils.data.records", "utils.data.merge",
         *(f"utils.report.{path.stem}" for path in sorted((REPO / "utils" / "report").glob("*.py"))))
MODEL_STACK = ("torch", "transformers", "accelerate")
VLLM_SIDE = ("utils/data/vllm_generate.py", "utils/evaluation/vllm_logprobs.py",  # run by vLLM's python
             "bench/vllm_throughput.py")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file: level 0 is absolute, >0 relative to the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_models_import_nothing_of_the_layers_above():
    for path in sorted((REPO / "models").glob("*.py")):
        for level, module in imports_of(path):
            assert level > 0 or module.partition(".")[0] not in ABOVE_MODELS, f"{path.name} imports {module}"


def utils_imports(path: Path) -> set[str]:
    """The first part below utils of every module of utils/ that `path` imports (`data`, `safety`, ...)."""
    found = set()
    for level, module in imports_of(path):
        assert level == 0, f"{path}: relative import of {module!r}; name utils/ modules in full"
        parts = module.split(".")
        if parts[0] == "utils":
            assert len(parts) > 1, f"{path} imports the bare utils package"
            found.add(parts[1])
    return found


def test_utils_is_the_stage_packages_and_the_shared_module():
    modules = {path.stem for path in (REPO / "utils").glob("*.py")} - {"__init__"}
    packages = {path.parent.name for path in (REPO / "utils").glob("*/__init__.py")}
    assert modules == {SHARED} and packages == set(STAGES)


def test_each_stage_imports_only_the_stages_before_it():
    assert not utils_imports(REPO / "utils" / f"{SHARED}.py"), "utils/safety.py imports the stages it serves"
    for position, stage in enumerate(STAGES):
        allowed = {SHARED, *STAGES[:position + 1]}
        for path in sorted((REPO / "utils" / stage).glob("*.py")):
            for imported in utils_imports(path):
                assert imported in allowed, f"utils/{stage}/{path.name} imports utils.{imported}, a later stage"


def test_modules_run_by_vllms_python_import_only_vllm_and_the_standard_library():
    # and vLLM's own torch (its tensors are what vllm_logprobs saves), and each other: none of the main environment's
    # stack
    allowed = {"vllm", "torch", "__future__"} | set(sys.stdlib_module_names)
    vllm_side = {name.removesuffix(".py").replace("/", ".") for name in VLLM_SIDE}
    for name in VLLM_SIDE:
        for level, module in imports_of(REPO / name):
            assert level == 0 and (module.partition(".")[0] in allowed or module in vllm_side), f"{name} imports {module}"


def test_light_modules_import_no_model_stack():
    """Each light module in a fresh interpreter, checked in sys.modules: also what it imports, transitively."""
    script = ("import importlib, json, sys\n"
              f"for name in {list(LIGHT)!r}:\n"
              "    importlib.import_module(name)\n"
              f"    heavy = sorted(m for m in {list(MODEL_STACK)!r} if m in sys.modules)\n"
              "    if heavy:\n"
              "        print(json.dumps([name, heavy]))\n"
              "        break\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "", f"importing {result.stdout.strip()} loads the model stack"


def test_merge_help_imports_no_model_stack():
    script = ("import json, runpy, sys\n"
              "sys.argv = ['merge_gen_data.py', '--help']\n"
              "try:\n"
              "    runpy.run_path('merge_gen_data.py', run_name='__main__')\n"
              "except SystemExit:\n"
              "    pass\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "utils.data.merge" in modules and "usage:" in result.stdout
    assert not [m for m in modules if m.partition(".")[0] in MODEL_STACK]


def test_remote_code_files_import_only_torch_transformers_the_standard_library_and_each_other():
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    siblings = {Path(name).stem for name in REMOTE_CODE_SOURCES}
    for name in REMOTE_CODE_SOURCES:
        for level, module in imports_of(REPO / "models" / name):
            if level:
                assert level == 1 and module in siblings, f"{name} imports .{module}"
            else:
                assert module.partition(".")[0] in allowed, f"{name} imports {module}"


# Run in a fresh interpreter (-I: no PYTHONPATH, no user site) outside the repository; any import of the
# repository's own packages fails, so the checkpoint has to load with what it carries.
LOAD_OUTSIDE = """
import importlib.abc, json, sys
class NoRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {repo_packages}:
            raise ImportError(f"the checkpoint imported the repository's {{name}}")
sys.meta_path.insert(0, NoRepo())
import pytest
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({checkpoint!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor({ids})).logits
k_proj = model.model.layers[0].self_attn.k_proj
print(json.dumps({{"class": type(k_proj).__name__, "bits": [k_proj.w_bits, k_proj.a_bits, k_proj.out_bits],
                  "logits": logits.flatten().tolist()}}))
"""


@pytest.mark.parametrize("config,bits", [(QATConfig(4, 8, 4), [4, 8, 4]),
                                         (QATConfig(4, 4, 4, kv_placement="post_rope", rotate="hadamard"), [4, 4, 16]),
                                         (QATConfig(scheme="NVFP4", kv_scheme="FP8"), [4, 4, 8])])
def test_saved_checkpoint_loads_quantized_in_a_fresh_interpreter_outside_the_repo(config, bits, tiny_llama,
                                                                                  tiny_input_ids, tmp_path):
    student = quantize_model(tiny_llama, config)
    save_quantized(student, tmp_path / "ckpt")
    script = LOAD_OUTSIDE.format(repo_packages=sorted(REPO_PACKAGES), checkpoint=str(tmp_path / "ckpt"),
                                 ids=tiny_input_ids.tolist())
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "QuantLinear" and loaded["bits"] == bits
    with torch.no_grad():
        expected = student(tiny_input_ids).logits.flatten()
    assert torch.equal(torch.tensor(loaded["logits"]), expected)
