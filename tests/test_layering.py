"""The repository's structure: layers depend downward only, and saved checkpoints carry code that runs alone."""
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
                                         (QATConfig(4, 4, 4, kv_placement="post_rope", rotate="hadamard"), [4, 4, 16])])
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
