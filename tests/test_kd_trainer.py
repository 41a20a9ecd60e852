"""The distillation loss and the KD trainer."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from models import quantize_model
from utils.data.dataset import PadCollator
from utils.training.kd_trainer import KDTrainer, kd_loss


def naive_kl(student, teacher, mask, reduction):
    """The released code's loss, written out: kl_div(log_softmax(student), softmax(teacher)) over every position."""
    per_token = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="none").sum(-1) * mask
    return per_token.sum() / (student.shape[0] if reduction == "batchmean" else mask.sum())


@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_kl_equals_naive_value_and_gradient(reduction, dtype):
    torch.manual_seed(0)
    student = (3 * torch.randn(3, 7, 50, dtype=dtype)).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 50, dtype=dtype)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row: its positions must not count
    ours = kd_loss(student, teacher, mask, reduction, chunk_rows=4)  # 21 rows in 6 chunks, the last one partial
    (grad_ours,) = torch.autograd.grad(ours, student)
    reference = naive_kl(student, teacher, mask.to(dtype), reduction)
    (grad_ref,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours.to(dtype), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad_ours[1, 5:].abs().max() == 0


def test_kl_is_zero_for_identical_logits_and_rejects_unknown_reduction():
    logits = torch.randn(2, 4, 10)
    assert kd_loss(logits, logits).abs() < 1e-6
    with torch.no_grad():  # evaluation: no gradient is built
        assert kd_loss(logits, torch.randn(2, 4, 10)) > 0
    with pytest.raises(ValueError, match="batchmean"):
        kd_loss(logits, logits, reduction="mean")


def test_qat_steps_lower_the_kd_loss_and_update_only_the_student(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    teacher = LlamaForCausalLM(config).eval()
    student = quantize_model(copy.deepcopy(teacher), 4, 8, 4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = [{"input_ids": torch.randint(0, 96, (16,)).tolist()} for _ in range(4)]
    collate = PadCollator(pad_token_id=0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=10,
                             learning_rate=3e-4, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             logging_steps=1, use_cpu=True)
    trainer = KDTrainer(model=student, teacher=teacher, args=args, train_dataset=batch, data_collator=collate)

    def loss_on_batch():
        with torch.no_grad():
            return trainer.compute_loss(student, collate(batch)).item()

    before = loss_on_batch()
    trainer.train()
    after = loss_on_batch()
    assert before > 0 and after < 0.7 * before
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any("q_proj" in k for k in changed)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for group in trainer.optimizer.param_groups for p in group["params"]
                   for q in teacher.parameters())


def test_token_mean_with_gradient_accumulation_trains_as_one_batch(tmp_path):
    """Two micro-batches of one sequence each make the same step as one batch of both: the mean is over every
    position of the accumulated batch, not a mean of per-micro-batch means (5 and 11 positions here)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).double().eval()
    start = LlamaForCausalLM(config).double()
    data = [{"input_ids": torch.randint(1, 64, (length,)).tolist()} for length in (5, 11)]

    def one_step(batch_size, accumulation):
        student = copy.deepcopy(start)
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                                 lr_scheduler_type="constant", max_grad_norm=0, save_strategy="no", report_to=[],
                                 logging_steps=1, use_cpu=True)
        trainer = KDTrainer(model=student, teacher=teacher, kd_reduction="token_mean", args=args, train_dataset=data,
                            data_collator=PadCollator(pad_token_id=0))
        trainer.train()
        (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return loss, torch.cat([(p - q).flatten() for p, q in zip(student.parameters(), start.parameters())])

    loss_one_batch, step_one_batch = one_step(2, 1)
    loss_accumulated, step_accumulated = one_step(1, 2)
    # The KL is computed in float32 (kd_loss), whatever the model's dtype: agreement to float32 rounding.
    assert loss_accumulated == pytest.approx(loss_one_batch, rel=1e-5)
    torch.testing.assert_close(step_accumulated, step_one_batch, rtol=1e-4, atol=1e-9)
