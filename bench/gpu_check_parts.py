"""The four measurements of the GPU check; bench/gpu_check.py runs each in its own process and makes the table.

    python bench/gpu_check_parts.py PART SETTINGS_JSON     # prints the part's result as one JSON line, last

PART: memory, step_time, rotation or gpu_vs_cpu. SETTINGS_JSON: gpu_check.py's options (device, tiny, layers,
seq_len, steps, warmup). The training parts build a LLaMA-7B-shaped teacher and student (configs/llama-7b, or with
`tiny` a 2-layer hidden-64 LLaMA) with random weights directly on the device; gpu_vs_cpu loads the embedded
SmolLM2-135M.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from models import QATConfig, quantize_model
from models.rotations import DOWN_PROJ_INPUT, OnlineRotation, rotation
from train import QATTrainingArguments
from utils.data.dataset import PadCollator
from utils.training.kd_trainer import KDTrainer, kd_loss
from utils.training.loading import load_model
from utils.training.memory_plan import GIB, TrainingSetup, load_config, model_shape, plan_memory

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "fsdp_config.json"
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
QAT = QATConfig(w_bits=4, a_bits=8, kv_bits=4)
NOT_QUANTIZED = QATConfig()  # 16-16-16: the same student modules, every fake quantizer an identity
CROSS_CHECK_TOKENS = 256  # gpu_vs_cpu's sequence: long enough to exercise attention, quick on the CPU
LEARNING_RATE = 2e-5  # the paper's
TIMING_REPEATS, TIMING_WARMUP = 10, 2


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device != "cuda":
        return f"CPU ({os.cpu_count()} cores)"
    return f"{torch.cuda.get_device_name()} ({device_memory(device) / GIB:.1f} GiB, CUDA {torch.version.cuda})"


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def median_seconds(run, device: str) -> float:
    for _ in range(TIMING_WARMUP):
        run()
    times = []
    for _ in range(TIMING_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shipped_config(settings: Namespace) -> LlamaConfig:
    return LlamaConfig(**TINY_LLAMA) if settings.tiny else load_config("llama-7b")


def with_layers(config: LlamaConfig, layers: int) -> LlamaConfig:
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    return config


def training_setup(settings: Namespace) -> TrainingSetup:
    """The planner's words for what `train_steps` runs on one device."""
    return TrainingSetup(gpus=1, gpu_memory_gib=device_memory(settings.device) / GIB, seq_len=settings.seq_len,
                         batch_size=1, precision="bf16" if settings.device == "cuda" else "fp32",
                         gradient_checkpointing=True)


def fsdp_units_in_flight(shape, setup: TrainingSetup) -> float:
    """The planner's bytes for FSDP's gathered units, which it counts from 2 GPUs on: the GPU runs here are sharded
    on one (as run_train.sh shards on every GPU count)."""
    return plan_memory(shape, replace(setup, gpus=2)).bytes_of("gathered units in flight")


def check_layers(settings: Namespace, config: LlamaConfig) -> int:
    """--layers, else the most decoder layers of this width whose plan fits the device (all when they fit).
    The plan is linear in the layer count, so one meta-device model gives every count."""
    if settings.layers:
        return settings.layers
    shape, setup = model_shape(config), training_setup(settings)
    in_flight = fsdp_units_in_flight(shape, setup) if settings.device == "cuda" else 0
    for layers in range(config.num_hidden_layers, 0, -1):
        fewer = replace(shape, num_layers=layers, parameters=shape.root_parameters + layers * shape.layer_parameters)
        if plan_memory(fewer, setup).total + in_flight <= setup.gpu_memory_gib * GIB:
            return layers
    raise RuntimeError(f"the plan fits not even one decoder layer in {setup.gpu_memory_gib:.0f} GiB")


def act_as_torchrun_with_one_process() -> None:
    """What `torchrun --nproc-per-node 1` sets: Accelerate takes its multi-GPU path only then, and FSDP with it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


class StepMeter(TrainerCallback):
    """Seconds per optimizer step (forward, backward, clipping, optimizer), and the memory of the steps after the
    warm-up ones (CUDA: peak allocated and reserved, and the device memory in use at each step's end, CUDA context
    included; CPU: peak RSS over the RSS before the models were built, warm-up included)."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.seconds = device, warmup, []
        self.rss_before_models = current_rss()
        self.device_in_use = 0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        if self.device == "cuda" and state.global_step == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.start)
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.device_in_use = max(self.device_in_use, total - free)

    def memory(self) -> dict:
        if self.device != "cuda":
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            return {"peak_allocated": peak_rss - self.rss_before_models}
        return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
                "device_in_use": self.device_in_use}


def train_steps(settings: Namespace, qat: QATConfig, config: LlamaConfig, layers: int) -> dict:
    """`warmup + steps` KDTrainer steps of a random LLaMA-shaped student against its teacher, as run_train.sh trains
    on GPUs: bf16 mixed precision, gradient checkpointing, FSDP2 with scripts/fsdp_config.json (one process), batch 1;
    on CPU float32 without FSDP (Accelerate shards on accelerators only)."""
    cuda = settings.device == "cuda"
    if cuda:
        act_as_torchrun_with_one_process()
    meter = StepMeter(settings.device, settings.warmup)
    config = with_layers(config, layers)
    torch.manual_seed(0)
    with torch.device(settings.device):  # random weights made where they are used: nothing to read or to copy over
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    teacher.load_state_dict(student.state_dict())  # the student starts as the teacher, as in train.py
    quantize_model(student, qat)
    tokens = torch.randint(3, config.vocab_size, (settings.warmup + settings.steps, settings.seq_len))
    sharding = dict(fsdp="full_shard auto_wrap", fsdp_config=str(FSDP_CONFIG)) if cuda else {}
    with tempfile.TemporaryDirectory() as output_dir:
        args = QATTrainingArguments(output_dir=output_dir, max_steps=len(tokens), gradient_checkpointing=True,
                                    bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to="none",
                                    disable_tqdm=True, **sharding)
        trainer = KDTrainer(model=student, teacher=teacher, args=args, callbacks=[meter],
                            train_dataset=[{"input_ids": row.tolist()} for row in tokens],
                            data_collator=PadCollator(config.pad_token_id))
        trainer.train()
    return {"device": device_name(settings.device), "model": "tiny LLaMA" if settings.tiny else "LLaMA-7B",
            "layers": layers, "all_layers": shipped_config(settings).num_hidden_layers,
            "fsdp": isinstance(trainer.model, FSDPModule) and isinstance(trainer.teacher, FSDPModule),
            "step_seconds": meter.seconds[settings.warmup:], **meter.memory()}


def measure_memory(settings: Namespace) -> dict:
    """(a) The W4A8KV4 run's memory against utils.training.memory_plan's plan for the same setting."""
    config = shipped_config(settings)
    layers = check_layers(settings, config)
    run = train_steps(settings, QAT, config, layers)
    setup = training_setup(settings)
    all_layers = plan_memory(model_shape(config), setup)
    in_flight = fsdp_units_in_flight(all_layers.shape, setup) if run["fsdp"] else 0  # the same for any layer count
    plan = plan_memory(model_shape(with_layers(config, layers)), setup)
    return {**run, "plan_subtotal": plan.subtotal, "plan_in_flight": in_flight, "plan_total": plan.total + in_flight,
            "plan_all_layers_total": all_layers.total + in_flight, "device_memory": device_memory(settings.device)}


def measure_step_time(settings: Namespace) -> dict:
    """(b) The same run without fake quantizers (16-16-16); gpu_check.py sets it beside (a)'s step time."""
    config = shipped_config(settings)
    return train_steps(settings, NOT_QUANTIZED, config, check_layers(settings, config))


def measure_rotation(settings: Namespace) -> dict:
    """(c) R4, down_proj's online Hadamard rotation, alone against down_proj's matmul: forward, one sequence's
    bf16 input [tokens, intermediate_size]."""
    config = shipped_config(settings)
    width, device = config.intermediate_size, settings.device
    x = torch.randn(settings.seq_len, width, dtype=torch.bfloat16, device=device)
    weight = torch.randn(config.hidden_size, width, dtype=torch.bfloat16, device=device) / width ** 0.5
    r4 = OnlineRotation("hadamard", width, 0, DOWN_PROJ_INPUT)
    with torch.no_grad():
        rotation_seconds = median_seconds(lambda: r4(x), device)
        matmul_seconds = median_seconds(lambda: F.linear(x, weight), device)
    m = rotation("hadamard", width, 0, DOWN_PROJ_INPUT).m  # what r4 applies: H_m (x) H_(width/m), or dense
    factors = "dense (random orthogonal)" if m is None else f"H_{m} x H_{width // m}"
    return {"device": device_name(device), "width": width, "hidden": config.hidden_size, "tokens": settings.seq_len,
            "factors": factors, "repeats": TIMING_REPEATS, "rotation_seconds": rotation_seconds,
            "matmul_seconds": matmul_seconds}


def qat_step(model, device: str, tokens: int) -> dict:
    """One W4A8KV4 QAT step from `model` in float32 on `device`, as KDTrainer takes it (teacher forward, chunked KL,
    backward, fused AdamW at the paper's learning rate): the loss, the logits after the step, and the step."""
    teacher = copy.deepcopy(model).to(device).requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), QAT).train()
    start = {name: parameter.detach().clone() for name, parameter in student.named_parameters()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, fused=True)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        teacher_logits = teacher(ids, use_cache=False).logits
    loss = kd_loss(student(ids, use_cache=False).logits, teacher_logits)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        logits = student(ids, use_cache=False).logits
    return {"loss": loss.item(), "logits": logits.cpu(),
            "step": {name: (parameter.detach() - start[name]).cpu() for name, parameter in student.named_parameters()}}


def norm_of(tensors) -> float:
    return sum(t.double().square().sum() for t in tensors).sqrt().item()


def measure_gpu_vs_cpu(settings: Namespace) -> dict:
    """(d) The same QAT step on the device and on the CPU: relative differences of the loss, of the logits after
    the step, and of the weights after it (W_device - W_cpu, over the step's own size; both start equal)."""
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 against float32
    tokens = min(settings.seq_len, CROSS_CHECK_TOKENS)
    model = load_model(dtype=torch.float32, quantized=False)  # the embedded SmolLM2-135M: both steps start from it
    on_device, on_cpu = qat_step(model, settings.device, tokens), qat_step(model, "cpu", tokens)
    step_difference = norm_of(on_device["step"][name] - step for name, step in on_cpu["step"].items())
    return {"device": device_name(settings.device), "tokens": tokens,
            "loss_device": on_device["loss"], "loss_cpu": on_cpu["loss"],
            "loss_relative": abs(on_device["loss"] - on_cpu["loss"]) / abs(on_cpu["loss"]),
            "logits_relative": norm_of([on_device["logits"] - on_cpu["logits"]]) / norm_of([on_cpu["logits"]]),
            "weights_relative": step_difference / norm_of(on_cpu["step"].values())}


PARTS = {"memory": measure_memory, "step_time": measure_step_time, "rotation": measure_rotation,
         "gpu_vs_cpu": measure_gpu_vs_cpu}

if __name__ == "__main__":
    part, settings = sys.argv[1], Namespace(**json.loads(sys.argv[2]))
    print(json.dumps(PARTS[part](settings)), flush=True)
