"""Knowledge distillation for LLM-QAT (paper section 2.3): the student learns the teacher's logits.

The loss is KL(teacher || student) of the softmax distributions at every position, on logits only
(the paper found that adding attention or hidden-state losses did not help). The released code used
`kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")` over [batch, seq, vocab]:
a sum over positions and vocabulary divided by the batch size. That is the default here ("batchmean");
"token_mean" divides by the number of positions instead, which keeps the loss scale independent of length.
The paper's loss ablation (Table 4) trains on the data's own next tokens instead (`loss="ce"`): no teacher then.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from models.checkpoint import write_remote_code

REDUCTIONS = ("batchmean", "token_mean")
LOSSES = ("kd", "ce")  # KL to the teacher's logits (the paper's method); next-token cross-entropy (its ablation)


class _ChunkedKLDivergence(torch.autograd.Function):
    """KL(teacher || student) computed a block of positions at a time, with its gradient made in the same pass.

    A naive `kl_div(log_softmax(s.float()), softmax(t.float()))` keeps several float32 [batch, seq, vocab] tensors
    alive for the backward pass (about 5 x 4 bytes x 49k vocab per token). Here only one tensor of that shape
    survives, the gradient, in the logits' own dtype; float32 work is limited to one block of rows.
    d KL / d s = softmax(s) - softmax(t), per position.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, chunk_rows):
        vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, vocab)
        teacher = teacher_logits.reshape(-1, vocab)
        weights = weights.reshape(-1)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None  # no gradient wanted: evaluation
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            log_q = F.log_softmax(student[rows].float(), dim=-1)
            log_p = F.log_softmax(teacher[rows].float(), dim=-1)
            p = log_p.exp()
            w = weights[rows].float()
            total += ((p * (log_p - log_q)).sum(-1) * w).sum()
            if grad is not None:
                grad[rows] = ((log_q.exp() - p) * w.unsqueeze(-1)).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = student_logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None = None,
            reduction: str = "batchmean", chunk_rows: int = 1024) -> torch.Tensor:
    """KL(teacher || student) over [batch, seq, vocab] logits; padding positions (mask 0) do not count."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd reduction {reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}")
    if attention_mask is None:
        attention_mask = torch.ones(student_logits.shape[:-1], device=student_logits.device)
    normalizer = student_logits.shape[0] if reduction == "batchmean" else attention_mask.sum().clamp(min=1)
    weights = attention_mask.to(torch.float32) / normalizer
    return _ChunkedKLDivergence.apply(student_logits, teacher_logits.detach(), weights, chunk_rows)


class KDTrainer(Trainer):
    """A `Trainer` whose loss is distillation from a frozen full-precision teacher; all else is inherited
    (resume, logging, checkpoints, FSDP, DeepSpeed). The teacher is not an attribute the Trainer wraps,
    so it is kept out of the optimizer and of checkpoints; under FSDP2 and ZeRO-3 it is sharded like the student.
    With `loss="ce"` there is no teacher: the student learns the data's next tokens (the paper's "label" ablation)."""

    loss_is_scaled_for_ga = False  # kd_loss is a per-micro-batch mean: let the Trainer divide it for accumulation

    def __init__(self, *args, teacher: torch.nn.Module | None, kd_reduction: str = "batchmean", loss: str = "kd",
                 **kwargs):
        if loss not in LOSSES or (teacher is None) != (loss == "ce"):
            raise ValueError(f"loss {loss!r} with{'out' if teacher is None else ''} a teacher: use loss 'kd' with a "
                             "teacher or 'ce' without one")
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # older transformers 5.x: same meaning as the line above
        self.loss = loss
        if teacher is None:
            self.teacher = None
        elif _zero3_enabled():
            self.teacher = _zero3_inference_engine(teacher.eval().requires_grad_(False), self.args)
        elif self.accelerator.is_fsdp2:
            self.teacher = _fsdp2_sharded_teacher(teacher.eval().requires_grad_(False), self.accelerator)
        else:
            self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.kd_reduction = kd_reduction
        self.add_callback(RemoteCodeCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.loss == "ce":  # the model shifts the labels; padding (mask 0) is ignored
            mask = inputs.get("attention_mask")
            labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
            outputs = model(**inputs, labels=labels, use_cache=False)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits
        outputs = model(**inputs, use_cache=False)
        loss = kd_loss(outputs.logits, teacher_logits, inputs.get("attention_mask"), self.kd_reduction)
        return (loss, outputs) if return_outputs else loss


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    return is_deepspeed_zero3_enabled()


def _zero3_inference_engine(teacher, args):
    """Under ZeRO-3 `from_pretrained` partitions every model it loads, the teacher too; a forward-only DeepSpeed
    engine gathers its shards layer by layer. (Not exercised by this repo's CPU test suite.)"""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
              "bf16": {"enabled": bool(args.bf16)}, "fp16": {"enabled": bool(args.fp16)},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000}}
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine.module.eval()


def _fsdp2_sharded_teacher(teacher, accelerator):
    """Shard the teacher as Accelerate shards the student (issue "Paper scale on GPUs"): `fully_shard` per decoder
    layer (the fsdp_config's `transformer_layer_cls_to_wrap`, else `_no_split_modules`), the embedding and the head,
    then the root, with the student's MixedPrecisionPolicy and mesh. A full replica per GPU would not fit at paper
    scale."""
    from accelerate.utils import fsdp2_prepare_model

    teacher = fsdp2_prepare_model(accelerator, teacher)
    # Forward only: no backward comes to reuse gathered weights, so every unit (the root too) frees them at once.
    teacher.set_reshard_after_forward(True)
    return teacher


class RemoteCodeCallback(TrainerCallback):
    """Every checkpoint gets the loader files, so it reloads as the quantized student anywhere."""

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # FSDP sharded checkpoints have no config.json: they resume training but do not load as a model.
        if state.is_world_process_zero and (checkpoint / "config.json").is_file():
            write_remote_code(checkpoint)
