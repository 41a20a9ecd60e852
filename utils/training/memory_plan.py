"""Per-GPU memory of LLM-QAT training (quantized student + frozen teacher + KD loss) from a model config alone.

The arithmetic behind `scripts/plan_memory.py`. Parameters are counted on a meta-device model (nothing is
allocated); every other term is a formula of the config's shapes and the training settings. The setting is
the one `scripts/run_train.sh` launches on GPUs: FSDP full_shard wrapped per decoder layer, bf16 mixed
precision over float32 master weights, AdamW, gradient checkpointing per decoder layer, the bf16 teacher
sharded the same way, flash (SDPA) attention, and the chunked KL loss of `utils/training/kd_trainer.py`. The student is
the paper's: every decoder linear layer fake-quantizes its weight and input, k/v projections their output. With the
cached teacher (train.py --teacher cached) there are no teacher weights and no teacher logits, only the batch's
cached top-K rows.

The total adds every component at its own peak, so it errs on the safe side: in a real step the gradients
fill up while the checkpointed activations drain away.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.rotations import head_dim
from utils.training.kd_trainer import CACHED_TEACHER, TEACHERS

GIB = 2**30
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # configs/<name>/config.json
SHIPPED_MODELS = ("llama-7b", "llama-13b", "llama-30b")  # LLaMA-1 shapes, the paper's models
PRECISION_BYTES = {"bf16": 2, "fp32": 4}
FP32_BYTES = 4
CACHED_ROW_BYTES = 8 + 4  # per cached top-K entry in a batch: an int64 id and a float32 log-probability
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, float32, sharded like the weights
KD_CHUNK_ROWS = 1024  # kd_loss's chunk_rows: float32 work is limited to this many positions at a time
# float32 [rows, vocab] tensors alive at once inside a chunk: log q, log p (cached teacher: masked log q), p, and
# 2 temporaries
KD_CHUNK_FP32_TENSORS = 5
IN_FLIGHT_LAYERS = 2  # FSDP gathers the next decoder layer while the current one computes
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 0.05  # the caching allocator's reserved-but-unused share, on top of everything else
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")


def load_config(model: str) -> PretrainedConfig:
    """A shipped name (llama-7b, ...), a model directory holding config.json, or a config.json path."""
    path = SHIPPED_CONFIGS / model / "config.json" if model in SHIPPED_MODELS else Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model}: no such config.json; give a model directory, a config.json path, "
                                f"or one of {', '.join(SHIPPED_MODELS)}")
    config = AutoConfig.from_pretrained(path)
    # A shape the file leaves out would be the config class's default (LlamaConfig's: a 6.74B model), planned as if
    # it were this model's. (A config without intermediate_size at all is no LLaMA-family one: model_shape says so.)
    written = json.loads(path.read_text())
    missing = [name for name in SHAPE_FIELDS if name not in written and config.attribute_map.get(name) not in written]
    if missing and hasattr(config, "intermediate_size"):
        raise ValueError(f"{path} lacks {', '.join(missing)}; give the model's full config.json, which has its shape")
    return config


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, from a config; parameter counts from a meta-device model."""

    name: str
    parameters: int  # unique parameters (tied embeddings count once)
    layer_parameters: int  # one decoder layer: the FSDP wrap unit
    layer_linear_weights: int  # the fake-quantized linear weights of one decoder layer
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    query_dim: int  # heads x head_dim
    kv_dim: int  # key-value heads x head_dim

    @property
    def root_parameters(self) -> int:
        """Embeddings, final norm and lm_head: FSDP's root unit, outside the decoder layers."""
        return self.parameters - self.num_layers * self.layer_parameters


def model_shape(config: PretrainedConfig, name: str | None = None) -> ModelShape:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not getattr(config, "intermediate_size", None):
        raise ValueError(f"model type {config.model_type!r} is not a LLaMA-family decoder (layers with q/k/v/o and "
                         "gate/up/down projections); give a LLaMA, Mistral or Qwen2-style config")
    layer = layers[0]
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(
        name=name or getattr(config, "name_or_path", "") or config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        layer_parameters=sum(p.numel() for p in layer.parameters()),
        layer_linear_weights=sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)),
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        num_heads=config.num_attention_heads, query_dim=config.num_attention_heads * head_dim(config),
        kv_dim=num_kv_heads * head_dim(config))


@dataclass(frozen=True)
class TrainingSetup:
    gpus: int = 8
    gpu_memory_gib: float = 80.0
    seq_len: int = 2048
    batch_size: int = 1  # per device
    precision: str = "bf16"  # compute dtype: "bf16" (mixed precision) or "fp32"
    gradient_checkpointing: bool = True
    offload: bool = False  # FSDP CPU offload of the student's weights, gradients and optimizer
    teacher: str = "model"  # one of TEACHERS; "cached": no teacher model, its top-K log-probs come with the data
    topk: int = 32  # K of the cached teacher's rows (generate_data.py --save-topk)

    @property
    def cached_teacher(self) -> bool:
        return self.teacher == CACHED_TEACHER

    @property
    def fsdp(self) -> bool:
        return self.gpus > 1 or self.offload  # run_train.sh uses FSDP on more than one GPU


@dataclass(frozen=True)
class Component:
    name: str
    bytes: float
    how: str


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    setup: TrainingSetup
    components: tuple[Component, ...]

    @property
    def subtotal(self) -> float:
        """What the training step itself allocates (compare with a measurement)."""
        return sum(c.bytes for c in self.components)

    @property
    def margin(self) -> float:
        return CUDA_CONTEXT_BYTES + FRAGMENTATION * self.subtotal

    @property
    def total(self) -> float:
        return self.subtotal + self.margin

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.gpu_memory_gib * GIB

    def bytes_of(self, component: str) -> float:
        return next(c.bytes for c in self.components if c.name == component)


def layer_activation_bytes_per_token(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes one quantized decoder layer saves for backward per token (checked against autograd's saved
    tensors by tests/test_memory_plan.py)."""
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.query_dim, shape.kv_dim
    # Two RMSNorms, 12 bytes per value in both precisions: in bf16 each saves a float32 upcast (4) and its bf16
    # result (2); in fp32 both save their result (4 + 4) and the second its input (4). Plus a float32 rsqrt each.
    norms = 12 * h + 2 * FP32_BYTES
    quantized_inputs = (1 + compute_bytes) * (3 * h + q + 2 * h + i)  # q,k,v / o / gate,up / down: mask + copy
    kv_output_masks = 2 * kv  # the straight-through clip mask of the quantized k and v outputs
    attention = compute_bytes * (2 * q + 2 * kv) + FP32_BYTES * shape.num_heads  # q, k, v, output, logsumexp
    mlp = 3 * compute_bytes * i  # gate output, SiLU output, up output
    return norms + quantized_inputs + kv_output_masks + attention + mlp


def head_activation_bytes_per_token(shape: ModelShape, compute_bytes: int) -> int:
    """The final RMSNorm (float32 input, normalized output) and lm_head's input, outside any checkpoint."""
    return (FP32_BYTES + 2 * compute_bytes) * shape.hidden_size + FP32_BYTES


def plan_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryPlan:
    c = PRECISION_BYTES[setup.precision]
    n, gpus = shape.parameters, setup.gpus
    tokens = setup.batch_size * setup.seq_len
    shard = f"1/{gpus} shard" if gpus > 1 else "unsharded"
    on_gpu = 0 if setup.offload else 1
    where = "offloaded to CPU" if setup.offload else shard

    layer_weight_copies = (1 + c) * shape.layer_linear_weights  # quantized weights + their clip masks, saved
    layer_working_set = tokens * layer_activation_bytes_per_token(shape, c) + layer_weight_copies
    head = tokens * head_activation_bytes_per_token(shape, c)
    if setup.gradient_checkpointing:
        kept = tokens * shape.num_layers * shape.hidden_size * c + head
        kept_how = "one hidden state per layer boundary + final norm/lm_head input"
        recomputed, recomputed_how = layer_working_set, "one decoder layer re-run in backward"
    else:
        kept = shape.num_layers * (tokens * shape.hidden_size * c + layer_working_set) + head
        kept_how = "every decoder layer's saved tensors (no gradient checkpointing)"
        recomputed, recomputed_how = 0, "none: no gradient checkpointing"

    if setup.fsdp:  # the root unit stays gathered from forward to backward; decoder layers are gathered in turn
        in_flight = c * ((IN_FLIGHT_LAYERS * shape.layer_parameters + shape.root_parameters)
                         + (shape.layer_parameters + shape.root_parameters))
        in_flight_how = f"{setup.precision} params of root + {IN_FLIGHT_LAYERS} layers, unsharded grads of root + 1"
    else:
        in_flight, in_flight_how = 0, "none: no FSDP on one GPU"

    chunk_work = min(KD_CHUNK_ROWS, tokens) * shape.vocab_size * KD_CHUNK_FP32_TENSORS * FP32_BYTES
    if setup.cached_teacher:
        logits_and_loss = tokens * shape.vocab_size * 2 * c + tokens * setup.topk * CACHED_ROW_BYTES + chunk_work
        logits_how = (f"student logits + KL gradient ({setup.precision}), cached top-{setup.topk} rows (int64 ids + "
                      "fp32 log-probs)")
        teacher_weights, teacher_how = 0, "none: cached top-K log-probs"
    else:
        logits_and_loss = tokens * shape.vocab_size * 3 * c + chunk_work
        logits_how = f"student + teacher logits + KL gradient ({setup.precision})"
        teacher_weights, teacher_how = c * n / gpus, f"{setup.precision}, {shard}"
    components = (
        Component("student weights", on_gpu * FP32_BYTES * n / gpus, f"fp32 master weights, {where}"),
        Component("student gradients", on_gpu * FP32_BYTES * n / gpus, f"fp32, {where}"),
        Component("AdamW state", on_gpu * ADAMW_STATES * FP32_BYTES * n / gpus, f"2 x fp32, {where}"),
        Component("teacher weights", teacher_weights, teacher_how),
        Component("gathered units in flight", in_flight, in_flight_how),
        Component("activations kept for backward", kept, kept_how),
        Component("recomputed layer activations", recomputed, recomputed_how),
        Component("logits and KD loss", logits_and_loss,
                  f"{logits_how}, fp32 work on {min(KD_CHUNK_ROWS, tokens)}-row chunks"),
    )
    return MemoryPlan(shape, setup, components)


@dataclass(frozen=True)
class Suggestion:
    setting: str  # the TrainingSetup field changed
    plan: MemoryPlan  # the plan with that one change

    @property
    def value(self):
        return getattr(self.plan.setup, self.setting)

    @property
    def change(self) -> str:
        """The change in train.py's words and this planner's."""
        host = (2 * FP32_BYTES + ADAMW_STATES * FP32_BYTES) * self.plan.shape.parameters / GIB
        return {
            "gpus": f"at least {self.value} GPUs (--gpus)",
            "offload": f'CPU offload (train.py --fsdp "full_shard offload auto_wrap"; --offload), {host:.0f} GiB '
                       "of host memory in all",
            "gradient_checkpointing": "gradient checkpointing (--gradient_checkpointing)",
            "teacher": f"no resident teacher: its top-{self.plan.setup.topk} log-probs cached with the data "
                       f"(generate_data.py --save-topk {self.plan.setup.topk}, train.py --teacher cached; --teacher "
                       "cached)",
            "seq_len": f"sequence length {self.value} (train.py --model_max_length; --seq-len)",
            "batch_size": f"micro-batch {self.value} (--per_device_train_batch_size, with "
                          "--gradient_accumulation_steps to keep the batch; --batch-size)",
        }[self.setting]


def suggestions(plan: MemoryPlan) -> list[Suggestion]:
    """One change at a time that brings the plan under the GPU memory: the smallest number of GPUs, the
    longest sequence, the largest micro-batch that fit; offload, checkpointing and the cached teacher even when not
    enough alone."""
    setup = plan.setup

    def first_fitting(setting, values):
        plans = (plan_memory(plan.shape, replace(setup, **{setting: value})) for value in values)
        return [Suggestion(setting, p) for p in plans if p.fits][:1]

    return (first_fitting("gpus", range(setup.gpus + 1, 4097))
            + ([] if setup.offload else [Suggestion("offload", plan_memory(plan.shape, replace(setup, offload=True)))])
            + ([] if setup.gradient_checkpointing else
               [Suggestion("gradient_checkpointing",
                           plan_memory(plan.shape, replace(setup, gradient_checkpointing=True)))])
            + ([] if setup.cached_teacher else
               [Suggestion("teacher", plan_memory(plan.shape, replace(setup, teacher="cached")))])
            + first_fitting("seq_len", range((setup.seq_len - 1) // 128 * 128, 0, -128))
            + first_fitting("batch_size", range(setup.batch_size - 1, 0, -1)))


def describe(setup: TrainingSetup) -> str:
    return (f"{setup.gpus} GPU(s) x {setup.gpu_memory_gib:g} GiB, batch {setup.batch_size} x {setup.seq_len} "
            f"tokens, {setup.precision}, " + ("gradient checkpointing" if setup.gradient_checkpointing
                                               else "no gradient checkpointing")
            + (", CPU offload" if setup.offload else "")
            + (f", cached teacher top-{setup.topk}" if setup.cached_teacher else ""))


def format_plans(plans: list[MemoryPlan]) -> str:
    """A markdown table with one column per model, the verdicts, and for each plan that does not fit, the
    changes that would make it fit."""
    def gib(value):
        return f"{value / GIB:.1f}"

    lines = [describe(plans[0].setup), "",
             "| GiB per GPU | " + " | ".join(p.shape.name for p in plans) + " | how |",
             "|---|" + "---:|" * len(plans) + "---|",
             "| parameters | " + " | ".join(f"{p.shape.parameters / 1e9:.2f}B" for p in plans) + " | |"]
    for row, component in enumerate(plans[0].components):
        lines.append(f"| {component.name} | " + " | ".join(gib(p.components[row].bytes) for p in plans)
                     + f" | {component.how} |")
    lines.append("| CUDA context + fragmentation | " + " | ".join(gib(p.margin) for p in plans)
                 + f" | {CUDA_CONTEXT_BYTES / GIB:g} GiB + {FRAGMENTATION:.0%} of the above |")
    lines.append("| **total** | " + " | ".join(f"**{gib(p.total)}**" for p in plans)
                 + f" | of {plans[0].setup.gpu_memory_gib:g} GiB |")
    lines.append("| verdict | " + " | ".join("fits" if p.fits else "**does not fit**" for p in plans) + " | |")
    for plan in (p for p in plans if not p.fits):
        changes = suggestions(plan)
        lines += ["", f"{plan.shape.name} does not fit; change one of:"]
        lines += [f"- {s.change}: {gib(s.plan.total)} GiB per GPU" + ("" if s.plan.fits else ", still too much")
                  for s in changes]
        if not any(s.plan.fits for s in changes):
            lines.append("- no single change fits: combine them")
    return "\n".join(lines)


def plan_to_dict(plan: MemoryPlan) -> dict:
    return {
        "model": plan.shape.name, "parameters": plan.shape.parameters,
        "setup": asdict(plan.setup),
        "components_gib": {c.name: c.bytes / GIB for c in plan.components},
        "margin_gib": plan.margin / GIB, "total_gib": plan.total / GIB, "fits": plan.fits,
        "suggestions": [] if plan.fits else [
            {"setting": s.setting, "value": s.value, "total_gib": s.plan.total / GIB, "fits": s.plan.fits,
             "change": s.change} for s in suggestions(plan)],
    }


def plans_to_json(plans: list[MemoryPlan]) -> str:
    return json.dumps([plan_to_dict(p) for p in plans], indent=2)
