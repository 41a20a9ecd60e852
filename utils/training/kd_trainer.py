"""Knowledge distillation for LLM-QAT (paper section 2.3): the student learns the teacher's logits.

The loss is KL(teacher || student) of the softmax distributions at every position, on logits only
(the paper found that adding attention or hidden-state losses did not help). The released code used
`kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")` over [batch, seq, vocab]:
a sum over positions and vocabulary divided by the batch size. That is the default here ("batchmean");
"token_mean" divides by the number of positions instead, which keeps the loss scale independent of length;
with gradient accumulation, by the positions of the whole accumulated batch, so that accumulating micro-batches
trains as one large batch does.
The paper's loss ablation (Table 4) trains on the data's own next tokens instead (`loss="ce"`): no teacher then.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback
from transformers.utils import CONFIG_NAME

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
            reduction: str = "batchmean", chunk_rows: int = 1024,
            num_positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over [batch, seq, vocab] logits; padding positions (mask 0) do not count.
    token_mean divides by `num_positions` when given (those of a whole accumulated batch), else by this batch's."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd reduction {reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}")
    if attention_mask is None:
        attention_mask = torch.ones(student_logits.shape[:-1], device=student_logits.device)
    if reduction == "batchmean":
        normalizer = student_logits.shape[0]
    else:
        normalizer = (attention_mask.sum() if num_positions is None else num_positions).clamp(min=1)
    weights = attention_mask.to(torch.float32) / normalizer
    return _ChunkedKLDivergence.apply(student_logits, teacher_logits.detach(), weights, chunk_rows)


class KDTrainer(Trainer):
    """A `Trainer` whose loss is distillation from a frozen full-precision teacher; all else is inherited
    (resume, logging, checkpoints, FSDP, DeepSpeed). The teacher is not an attribute the Trainer wraps,
    so it is kept out of the optimizer and of checkpoints; under FSDP2 and ZeRO-3 it is sharded like the student.
    With `loss="ce"` there is no teacher: the student learns the data's next tokens (the paper's "label" ablation)."""

    def __init__(self, *args, teacher: torch.nn.Module | None, kd_reduction: str = "batchmean", loss: str = "kd",
                 **kwargs):
        if loss not in LOSSES or (teacher is None) != (loss == "ce"):
            raise ValueError(f"loss {loss!r} with{'out' if teacher is None else ''} a teacher: use loss 'kd' with a "
                             "teacher or 'ce' without one")
        super().__init__(*args, **kwargs)
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
        # token_mean divides by the accumulated batch's positions (`get_batch_samples`): already scaled. Otherwise the
        # loss is a per-micro-batch mean, which the Trainer divides by the accumulation steps.
        self.loss_is_scaled_for_ga = loss == "kd" and kd_reduction == "token_mean"
        self.model_accepts_loss_kwargs = self.loss_is_scaled_for_ga  # what older transformers 5.x read instead
        self.add_callback(RemoteCodeCallback())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and for token_mean their number of KD positions (every real
        token has one; with --average_tokens_across_devices, summed over the processes, as the Trainer does)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.loss_is_scaled_for_ga or not batch_samples:
            return batch_samples, num_items_in_batch
        positions = sum(batch["attention_mask"].sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            positions = self.accelerator.gather(positions).sum()
        return batch_samples, positions

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
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # every process's positions: the gradient all-reduce averages over the processes, so each process's sum
            # counts world_size times (as in the Trainer's own loss)
            num_items_in_batch = num_items_in_batch / self.args.world_size
        loss = kd_loss(outputs.logits, teacher_logits, inputs.get("attention_mask"), self.kd_reduction,
                       num_positions=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """A save that fails (a full disk) is one line naming the place. What it leaves does not pass for a saved
        model: no config.json (scripts/paper_table.py takes a folder holding one as trained), and a checkpoint without
        trainer_state.json, which train.py moves aside when it resumes."""
        try:
            super().save_model(output_dir, _internal_call)
        except (OSError, SafetensorError) as err:
            where = Path(output_dir or self.args.output_dir)
            (where / CONFIG_NAME).unlink(missing_ok=True)
            reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
            raise OSError(f"could not save the model to {where} ({reason}); free space on that disk or pass an "
                          "--output_dir on one with room") from None


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
    """Shard the teacher as Accelerate shards the student (README "Paper scale on GPUs"): `fully_shard` per decoder
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
