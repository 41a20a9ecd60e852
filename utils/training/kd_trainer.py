"""Knowledge distillation for LLM-QAT (paper section 2.3): the student learns the teacher's logits.

The loss is KL(teacher || student) of the softmax distributions at every position, on logits only
(the paper found that adding attention or hidden-state losses did not help). The released code used
`kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")` over [batch, seq, vocab]:
a sum over positions and vocabulary divided by the batch size. That is the default here ("batchmean");
"token_mean" divides by the number of positions instead, which keeps the loss scale independent of length;
with gradient accumulation, by the positions of the whole accumulated batch, so that accumulating micro-batches
trains as one large batch does.
The paper's loss ablation (Table 4) trains on the data's own next tokens instead (`loss="ce"`): no teacher then.

Without a resident teacher (`teacher="cached"`, train.py --teacher cached) the KL is taken over K + 1 bins: the
teacher's K most likely tokens, cached with the data (utils/data/teacher_topk.py), and one bucket for the rest of
the vocabulary, whose teacher probability is what the K leave over (`cached_kd_loss`). With tail samples cached too,
the rest is no longer one bucket: the samples give an unbiased estimate of the full KL and of its gradient.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback
from transformers.utils import CONFIG_NAME

from models.checkpoint import write_remote_code
from models.quantize import LEARNED_CLIP
from utils.data.dataset import TEACHER_TAIL_KEYS, TEACHER_TOPK_KEYS

REDUCTIONS = ("batchmean", "token_mean")
LOSSES = ("kd", "ce")  # KL to the teacher's logits (the paper's method); next-token cross-entropy (its ablation)
CACHED_TEACHER = "cached"  # KDTrainer's teacher when its top-K come with each batch (TEACHER_TOPK_KEYS)
TEACHERS = ("model", CACHED_TEACHER)  # train.py --teacher: load and run the teacher model, or read its cached top-K


class _ChunkedKLDivergence(torch.autograd.Function):
    """KL(teacher || student) computed a block of positions at a time, with its gradient made in the same pass.

    A naive `kl_div(log_softmax(s.float()), softmax(t.float()))` keeps several float32 [batch, seq, vocab] tensors
    alive for the backward pass (about 5 x 4 bytes x 49k vocab per token). Here only one tensor of that shape
    survives, the gradient, in the logits' own dtype; float32 work is limited to one block of rows.

    The teacher side is `target(log_q, rows)`: given the student's float32 log-probabilities of the flattened
    positions `rows`, each row's KL and the distribution p over the vocabulary for which d KL / d s = softmax(s) - p
    (the teacher's softmax for full logits, `_teacher_logits_target`; see `_cached_topk_target` for the top-K).
    """

    @staticmethod
    def forward(ctx, student_logits, target, weights, chunk_rows):
        vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, vocab)
        weights = weights.reshape(-1)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None  # no gradient wanted: evaluation
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            log_q = F.log_softmax(student[rows].float(), dim=-1)
            kl, p = target(log_q, rows)
            w = weights[rows].float()
            total += (kl * w).sum()
            if grad is not None:
                grad[rows] = ((log_q.exp() - p) * w.unsqueeze(-1)).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = student_logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None, None, None


def _teacher_logits_target(teacher_logits: torch.Tensor):
    """The chunked KL's target for full teacher logits: the teacher's softmax."""
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])

    def target(log_q, rows):
        log_p = F.log_softmax(teacher[rows].float(), dim=-1)
        p = log_p.exp()
        return (p * (log_p - log_q)).sum(-1), p

    return target


def _cached_topk_target(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_ids: torch.Tensor | None = None,
                        tail_logprobs: torch.Tensor | None = None):
    """The chunked KL's target for the teacher's cached top-K: K + 1 bins, the K tokens and the rest of the
    vocabulary. P_i = exp(logprob_i), P_rest = max(0, 1 - sum P_i); Q_rest is the student's probability outside the
    K ids.
    d KL / d s_j = q_j - P_i for j = id_i, and q_j - q_j P_rest / Q_rest for the rest: the target spreads P_rest over
    the rest in the student's own proportions, so the student's shape inside the rest is never taught.
    With S tail samples t_1..t_S drawn from the teacher's distribution inside the rest, the target puts P_rest / S on
    each sample instead (its expectation is the teacher's own p_j there) and the rest's KL is estimated as
    P_rest * mean_s (log p(t_s) - log q(t_s)): both unbiased for full-vocabulary KD (Anshumann et al. 2025).
    A row without a distribution (logprobs -inf) gives finite values that its weight 0 removes."""
    ids = topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    logprobs = topk_logprobs.detach().reshape(-1, topk_logprobs.shape[-1]).float()
    if tail_ids is not None:
        tail_ids = tail_ids.reshape(-1, tail_ids.shape[-1]).long()
        tail_logprobs = tail_logprobs.detach().reshape(-1, tail_logprobs.shape[-1]).float()

    def target(log_q, rows):
        row_ids, log_p = ids[rows], logprobs[rows]
        p = log_p.exp()
        log_q_rest = log_q.scatter(-1, row_ids, float("-inf")).logsumexp(-1)
        # K ids covering the whole vocabulary leave no rest bucket: 1 - sum P is then float rounding, not mass.
        p_rest = torch.where(log_q_rest > float("-inf"), (1 - p.sum(-1)).clamp(min=0), 0)
        has_rest = p_rest > 0
        top_kl = torch.where(p > 0, p * (log_p - log_q.gather(-1, row_ids)), 0).sum(-1)
        if tail_ids is not None:
            samples, sample_log_p = tail_ids[rows], tail_logprobs[rows]
            drawn = sample_log_p > float("-inf")
            sample_kl = torch.where(drawn, sample_log_p - log_q.gather(-1, samples), 0).mean(-1)
            p_full = torch.zeros_like(log_q).scatter_add_(-1, samples, (p_rest.unsqueeze(-1) / samples.shape[-1])
                                                          .expand(samples.shape).contiguous())
            return top_kl + p_rest * sample_kl, p_full.scatter_(-1, row_ids, p)
        log_rest_ratio = torch.where(has_rest, p_rest.log() - log_q_rest, float("-inf"))  # log(P_rest / Q_rest)
        rest_kl = torch.where(has_rest, p_rest * log_rest_ratio, 0)
        # In log space: log q_j - log Q_rest <= 0, so no overflow however little mass the student leaves outside.
        p_full = (log_q + log_rest_ratio.unsqueeze(-1)).exp_().scatter_(-1, row_ids, p)
        return top_kl + rest_kl, p_full

    return target


def _position_weights(positions: torch.Tensor, reduction: str, num_positions: torch.Tensor | None) -> torch.Tensor:
    """Each position's weight in the loss: 1 for a position that counts (`positions`), divided by the batch size
    (batchmean), or for token_mean by `num_positions` when given (those of a whole accumulated batch), else this
    batch's."""
    if reduction == "batchmean":
        normalizer = positions.shape[0]
    else:
        normalizer = (positions.sum() if num_positions is None else num_positions).clamp(min=1)
    return positions.to(torch.float32) / normalizer


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd reduction {reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None = None,
            reduction: str = "batchmean", chunk_rows: int = 1024,
            num_positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over [batch, seq, vocab] logits; padding positions (mask 0) do not count.
    token_mean divides by `num_positions` when given (those of a whole accumulated batch), else by this batch's."""
    _check_reduction(reduction)
    if attention_mask is None:
        attention_mask = torch.ones(student_logits.shape[:-1], device=student_logits.device)
    weights = _position_weights(attention_mask, reduction, num_positions)
    return _ChunkedKLDivergence.apply(student_logits, _teacher_logits_target(teacher_logits), weights, chunk_rows)


def cached_positions(topk_logprobs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq] True where the cached teacher has a distribution (not a sequence's last token, not padding)."""
    has_row = topk_logprobs[..., 0] > float("-inf")
    return has_row if attention_mask is None else has_row & attention_mask.bool()


def cached_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, reduction: str = "batchmean", chunk_rows: int = 1024,
                   num_positions: torch.Tensor | None = None, tail_ids: torch.Tensor | None = None,
                   tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over K + 1 bins (`_cached_topk_target`) from the teacher's cached top-K ids and
    log-probabilities [batch, seq, K], or its estimate from the tail samples [batch, seq, S] when given. Positions
    without a cached distribution (a sequence's last) and padding (mask 0) do not count; token_mean divides by the
    positions that do, or by `num_positions` as `kd_loss` does."""
    _check_reduction(reduction)
    if (tail_ids is None) != (tail_logprobs is None):
        raise ValueError("pass the tail samples' ids and log-probabilities together")
    weights = _position_weights(cached_positions(topk_logprobs, attention_mask), reduction, num_positions)
    return _ChunkedKLDivergence.apply(student_logits,
                                      _cached_topk_target(topk_ids, topk_logprobs, tail_ids, tail_logprobs), weights,
                                      chunk_rows)


class KDTrainer(Trainer):
    """A `Trainer` whose loss is distillation from a frozen full-precision teacher; all else is inherited
    (resume, logging, checkpoints, FSDP, DeepSpeed). The teacher is not an attribute the Trainer wraps,
    so it is kept out of the optimizer and of checkpoints; under FSDP2 and ZeRO-3 it is sharded like the student.
    With `loss="ce"` there is no teacher: the student learns the data's next tokens (the paper's "label" ablation).
    With `teacher="cached"` no teacher model runs: every batch brings the teacher's top-K log-probabilities cached
    with the data (`TokenSequenceDataset(teacher_topk=True)`, keys TEACHER_TOPK_KEYS, and TEACHER_TAIL_KEYS when it
    has tail samples), and the loss is `cached_kd_loss`.
    A student with learned ranges (`learn_ranges`) trains its clipping factors at `range_learning_rate` (default: the
    learning rate)."""

    def __init__(self, *args, teacher: torch.nn.Module | str | None, kd_reduction: str = "batchmean",
                 loss: str = "kd", range_learning_rate: float | None = None, **kwargs):
        if isinstance(teacher, str) and teacher != CACHED_TEACHER:
            raise ValueError(f"teacher {teacher!r} is unknown; pass the teacher model, {CACHED_TEACHER!r} (its top-K "
                             "cached with the data) or None with loss 'ce'")
        if loss not in LOSSES or (teacher is None) != (loss == "ce"):
            raise ValueError(f"loss {loss!r} with{'out' if teacher is None else ''} a teacher: use loss 'kd' with a "
                             "teacher or 'ce' without one")
        self.teacher_is_cached = isinstance(teacher, str)  # before the Trainer's init, which may read the columns
        super().__init__(*args, **kwargs)
        self.loss = loss
        self.range_learning_rate = self.args.learning_rate if range_learning_rate is None else range_learning_rate
        if teacher is None or self.teacher_is_cached:
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

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the learned clipping factors in a group of their own: their learning rate (the
        weights' would barely move them in a run), and no weight decay (it would pull them toward clipping all)."""
        optimizer = super().create_optimizer(model)
        learned = [parameter for name, parameter in (model or self.model).named_parameters()
                   if name.endswith(LEARNED_CLIP) and parameter.requires_grad]
        if learned and not any(group.get(LEARNED_CLIP) for group in optimizer.param_groups):
            moved = {id(parameter) for parameter in learned}
            for group in optimizer.param_groups:
                group["params"] = [parameter for parameter in group["params"] if id(parameter) not in moved]
            optimizer.add_param_group({"params": learned, "lr": self.range_learning_rate, "weight_decay": 0.0,
                                       LEARNED_CLIP: True})
        return optimizer

    def _set_signature_columns_if_needed(self):
        """The Trainer keeps only the batch keys that are arguments of the model's forward; the cached teacher's rows
        are not, and compute_loss needs them."""
        super()._set_signature_columns_if_needed()
        if self.teacher_is_cached:
            self._signature_columns += [key for key in (*TEACHER_TOPK_KEYS, *TEACHER_TAIL_KEYS)
                                        if key not in self._signature_columns]

    @staticmethod
    def _cached_rows(batch) -> tuple[torch.Tensor, ...]:
        """The cached teacher's top-K ids and log-probabilities [batch, seq, K] of a batch, then its tail samples'
        [batch, seq, S] (None, None without)."""
        missing = [key for key in TEACHER_TOPK_KEYS if key not in batch]
        if missing:
            raise ValueError(f"the batch has no {missing[0]}, which the cached teacher reads; build the dataset with "
                             "TokenSequenceDataset(teacher_topk=True), as train.py --teacher cached does")
        return tuple(batch.get(key) for key in (*TEACHER_TOPK_KEYS, *TEACHER_TAIL_KEYS))

    def _kd_positions(self, batch) -> torch.Tensor:
        """The positions KD counts: every real token with a teacher model; with the cached teacher, those whose row
        has a distribution (a sequence's last token has none)."""
        if self.teacher_is_cached:
            return cached_positions(self._cached_rows(batch)[1], batch["attention_mask"])
        return batch["attention_mask"]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and for token_mean their number of KD positions
        (`_kd_positions`; with --average_tokens_across_devices, summed over the processes, as the Trainer does)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.loss_is_scaled_for_ga or not batch_samples:
            return batch_samples, num_items_in_batch
        positions = sum(self._kd_positions(batch).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            positions = self.accelerator.gather(positions).sum()
        return batch_samples, positions

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached_rows = self._cached_rows(inputs) if self.teacher_is_cached else None
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", *TEACHER_TOPK_KEYS, *TEACHER_TAIL_KEYS)}
        if self.loss == "ce":  # the model shifts the labels; padding (mask 0) is ignored
            mask = inputs.get("attention_mask")
            labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
            outputs = model(**inputs, labels=labels, use_cache=False)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        if cached_rows is None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs, use_cache=False).logits
        outputs = model(**inputs, use_cache=False)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # every process's positions: the gradient all-reduce averages over the processes, so each process's sum
            # counts world_size times (as in the Trainer's own loss)
            num_items_in_batch = num_items_in_batch / self.args.world_size
        mask = inputs.get("attention_mask")
        if cached_rows is not None:
            topk_ids, topk_logprobs, tail_ids, tail_logprobs = cached_rows
            loss = cached_kd_loss(outputs.logits, topk_ids, topk_logprobs, mask, self.kd_reduction,
                                  num_positions=num_items_in_batch, tail_ids=tail_ids, tail_logprobs=tail_logprobs)
        else:
            loss = kd_loss(outputs.logits, teacher_logits, mask, self.kd_reduction, num_positions=num_items_in_batch)
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
