"""The distillation loss and the KD trainer."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from models import quantize_model
from utils.data.dataset import TEACHER_TOPK_KEYS, PadCollator
from utils.data.sampler import sample_tail
from utils.training.kd_trainer import KDTrainer, cached_kd_loss, kd_loss


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


def naive_cached_kl(student, ids, logprobs, mask, reduction):
    """KL over K + 1 bins written out in float64: both distributions coarse-grained to the K cached tokens and one
    bin for the rest of the vocabulary; positions without a distribution (-inf) and padding left out."""
    q = F.softmax(student.double(), -1)
    q_top = q.gather(-1, ids)
    p_top = logprobs.double().exp()
    p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)], -1)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    per_position = torch.where(p > 0, p * (p.log() - q.log()), 0).sum(-1)
    counted = (mask.bool() & (logprobs[..., 0] > float("-inf"))).double()
    return (per_position * counted).sum() / (student.shape[0] if reduction == "batchmean" else counted.sum())


def teacher_topk(teacher_logits, k):
    """The teacher's K most likely ids and their float32 log-probabilities, as the generator caches them."""
    logprobs, ids = F.log_softmax(teacher_logits.float(), -1).topk(k, dim=-1)
    return ids, logprobs


def cached_example():
    """Student logits [3, 7, 50], the teacher's top-5, and a mask: position (0, 6) is a sequence's last (no
    distribution), row 1 is padded from position 5 on (with finite rows there: the mask alone must leave them out)."""
    torch.manual_seed(0)
    student = 3 * torch.randn(3, 7, 50, dtype=torch.float64)
    ids, logprobs = teacher_topk(3 * torch.randn(3, 7, 50), 5)
    ids[0, 6], logprobs[0, 6] = 0, float("-inf")
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return student, ids, logprobs, mask


@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_rows", [4, 1024])  # 21 rows: 6 chunks, the last one partial; one chunk
def test_cached_kl_equals_the_naive_k_plus_one_bin_kl(reduction, dtype, chunk_rows):
    student, ids, logprobs, mask = cached_example()
    student = student.to(dtype).requires_grad_()
    ours = cached_kd_loss(student, ids, logprobs, mask, reduction, chunk_rows=chunk_rows)
    (grad_ours,) = torch.autograd.grad(ours, student)
    reference = naive_cached_kl(student, ids, logprobs, mask, reduction)
    (grad_ref,) = torch.autograd.grad(reference, student)
    assert reference > 0
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_ours.double(), grad_ref.to(torch.float64), rtol=1e-4, atol=1e-7)
    assert grad_ours[1, 5:].abs().max() == 0 and grad_ours[0, 6].abs().max() == 0


def test_positions_without_a_cached_distribution_or_with_padding_do_not_count():
    student, ids, logprobs, mask = cached_example()
    moved = student.clone()
    moved[1, 5:] += 10 * torch.randn(2, 50, dtype=torch.float64)
    moved[0, 6] += 10 * torch.randn(50, dtype=torch.float64)
    for reduction in ("batchmean", "token_mean"):
        assert cached_kd_loss(moved, ids, logprobs, mask, reduction) == cached_kd_loss(student, ids, logprobs, mask,
                                                                                       reduction)
    # token_mean divides by the 21 - 2 - 1 positions that count, not by the mask's 19
    per_position = cached_kd_loss(student, ids, logprobs, mask, "batchmean") * 3
    assert cached_kd_loss(student, ids, logprobs, mask, "token_mean") == pytest.approx(per_position.item() / 18)
    with torch.no_grad():  # evaluation: no gradient is built
        assert cached_kd_loss(student, ids, logprobs, mask) > 0
    with pytest.raises(ValueError, match="batchmean"):
        cached_kd_loss(student, ids, logprobs, mask, reduction="mean")


@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
def test_cached_kl_over_the_whole_vocabulary_is_the_full_kl(reduction):
    """With K = the vocabulary there is no rest of it: the cached loss is kd_loss from the teacher's logits."""
    torch.manual_seed(1)
    student = (3 * torch.randn(2, 9, 40)).requires_grad_()
    teacher = 3 * torch.randn(2, 9, 40)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids, logprobs = teacher_topk(teacher, 40)
    cached = cached_kd_loss(student, ids, logprobs, mask, reduction, chunk_rows=5)
    full = kd_loss(student, teacher, mask, reduction, chunk_rows=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(cached, student)[0], torch.autograd.grad(full, student)[0],
                               rtol=1e-4, atol=1e-7)


def teacher_tail(teacher_logits, top_ids, samples, seed):
    """`samples` tokens per position drawn from the teacher's distribution outside `top_ids`, with their float32
    log-probabilities, as the generator draws them (utils/data/sampler.py)."""
    log_p = F.log_softmax(teacher_logits.float(), -1)
    uniforms = torch.rand(*top_ids.shape[:-1], samples, generator=torch.Generator().manual_seed(seed))
    flat = log_p.reshape(-1, log_p.shape[-1])
    ids = sample_tail(flat, top_ids.reshape(-1, top_ids.shape[-1]), uniforms.reshape(-1, samples))
    return ids.reshape(uniforms.shape), flat.gather(-1, ids).reshape(uniforms.shape)


def test_tail_samples_estimate_the_full_kl_and_its_gradient_without_bias():
    """Averaged over many draws, the top-K + tail estimate is full-vocabulary KD; the top-K + one bucket is not."""
    torch.manual_seed(2)
    draws, positions, vocab, k = 4000, 6, 30, 4
    teacher = 2 * torch.randn(1, positions, vocab)
    student = (2 * torch.randn(1, positions, vocab, dtype=torch.float64)).requires_grad_()
    ids, logprobs = teacher_topk(teacher, k)
    tail_ids, tail_logprobs = teacher_tail(teacher.expand(draws, -1, -1), ids.expand(draws, -1, -1), 8, seed=0)
    # one batch row per draw: batchmean averages the draws' estimates, and the gradients add up in `student`
    estimate = cached_kd_loss(student.expand(draws, -1, -1), ids.expand(draws, -1, -1),
                              logprobs.expand(draws, -1, -1), tail_ids=tail_ids, tail_logprobs=tail_logprobs)
    full = kd_loss(student, teacher.double())
    bucket = cached_kd_loss(student, ids, logprobs)
    grads = [torch.autograd.grad(loss, student)[0] for loss in (estimate, full, bucket)]
    assert abs(estimate - full) < abs(bucket - full) / 20
    torch.testing.assert_close(estimate, full, rtol=5e-3, atol=0)
    assert (grads[0] - grads[1]).abs().max() < (grads[2] - grads[1]).abs().max() / 10
    single = cached_kd_loss(student, ids, logprobs, tail_ids=tail_ids[:1], tail_logprobs=tail_logprobs[:1])
    assert single != estimate  # one draw is an estimate, not the value


def test_with_one_token_outside_the_top_k_the_tail_estimate_is_exact():
    torch.manual_seed(3)
    teacher = 3 * torch.randn(2, 5, 12)
    student = (3 * torch.randn(2, 5, 12, dtype=torch.float64)).requires_grad_()
    ids, logprobs = teacher_topk(teacher, 11)
    tail_ids, tail_logprobs = teacher_tail(teacher, ids, 3, seed=0)  # every sample is the one token left
    cached = cached_kd_loss(student, ids, logprobs, tail_ids=tail_ids, tail_logprobs=tail_logprobs)
    full = kd_loss(student, teacher.double())
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(cached, student)[0], torch.autograd.grad(full, student)[0],
                               rtol=1e-4, atol=1e-7)


def test_tail_rows_without_a_distribution_or_with_padding_do_not_count():
    student, ids, logprobs, mask = cached_example()
    student.requires_grad_()
    tail_ids = torch.randint(0, 50, (3, 7, 4), generator=torch.Generator().manual_seed(0))
    tail_logprobs = -5 * torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(1))
    tail_ids[0, 6], tail_logprobs[0, 6] = 0, float("-inf")  # the store's row after a sequence's last token
    loss = cached_kd_loss(student, ids, logprobs, mask, "token_mean", tail_ids=tail_ids, tail_logprobs=tail_logprobs)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[1, 5:].abs().max() == 0 and grad[0, 6].abs().max() == 0
    with pytest.raises(ValueError, match="pass the tail samples' ids and log-probabilities together"):
        cached_kd_loss(student, ids, logprobs, mask, tail_ids=tail_ids)


def tiny_teacher_and_student():
    """A random 2-layer Llama (vocabulary 96) and its W4A8KV4 student."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    teacher = LlamaForCausalLM(config).eval()
    return teacher, quantize_model(copy.deepcopy(teacher), 4, 8, 4)


def test_qat_steps_lower_the_kd_loss_and_update_only_the_student(tmp_path):
    teacher, student = tiny_teacher_and_student()
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


def cached_rows(teacher, input_ids, k):
    """An example's cached teacher rows, as TokenSequenceDataset(teacher_topk=True) gives them: the last position
    has no distribution."""
    with torch.no_grad():
        ids, logprobs = teacher_topk(teacher(torch.tensor([input_ids])).logits[0], k)
    ids[-1], logprobs[-1] = 0, float("-inf")
    return dict(zip(TEACHER_TOPK_KEYS, (ids.int().numpy(), logprobs.numpy())))


@pytest.mark.parametrize("cached", [False, True])
def test_token_mean_with_gradient_accumulation_trains_as_one_batch(tmp_path, cached):
    """Two micro-batches of one sequence each make the same step as one batch of both: the mean is over every
    KD position of the accumulated batch, not a mean of per-micro-batch means (5 and 11 positions here; 4 and 10
    with the cached teacher, whose last rows have no distribution)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).double().eval()
    start = LlamaForCausalLM(config).double()
    data = [{"input_ids": torch.randint(1, 64, (length,)).tolist()} for length in (5, 11)]
    if cached:
        data = [{**example, **cached_rows(teacher, example["input_ids"], 6)} for example in data]

    def one_step(batch_size, accumulation):
        student = copy.deepcopy(start)
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                                 lr_scheduler_type="constant", max_grad_norm=0, save_strategy="no", report_to=[],
                                 logging_steps=1, use_cpu=True)
        trainer = KDTrainer(model=student, teacher="cached" if cached else teacher, kd_reduction="token_mean",
                            args=args, train_dataset=data, data_collator=PadCollator(pad_token_id=0))
        trainer.train()
        (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return loss, torch.cat([(p - q).flatten() for p, q in zip(student.parameters(), start.parameters())])

    loss_one_batch, step_one_batch = one_step(2, 1)
    loss_accumulated, step_accumulated = one_step(1, 2)
    # The KL is computed in float32 (kd_loss), whatever the model's dtype: agreement to float32 rounding.
    assert loss_accumulated == pytest.approx(loss_one_batch, rel=1e-5)
    torch.testing.assert_close(step_accumulated, step_one_batch, rtol=1e-4, atol=1e-9)
    # ... and the token mean of the batch's own KD positions (the trainer counts the same ones as the loss)
    batch = PadCollator(pad_token_id=0)(data)
    with torch.no_grad():
        logits = start(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = (cached_kd_loss(logits, *(batch[key] for key in TEACHER_TOPK_KEYS), batch["attention_mask"],
                                   "token_mean") if cached else
                    kd_loss(logits, teacher(**batch).logits, batch["attention_mask"], "token_mean"))
    assert loss_one_batch == pytest.approx(expected.item(), rel=1e-5)


def test_cached_teacher_trains_from_the_batchs_top_k_rows(tmp_path):
    """A real train() with teacher="cached": the top-K keys, which are no arguments of the model's forward, reach
    the loss (the Trainer would drop them), the student learns, and no teacher model is needed."""
    teacher, student = tiny_teacher_and_student()
    before_training = {k: v.clone() for k, v in student.state_dict().items()}
    data = [{"input_ids": ids} for ids in torch.randint(0, 96, (4, 16)).tolist()]
    cached = [{**example, **cached_rows(teacher, example["input_ids"], 8)} for example in data]
    collate = PadCollator(pad_token_id=0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=10,
                             learning_rate=3e-4, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             logging_steps=1, use_cpu=True)
    trainer = KDTrainer(model=student, teacher="cached", args=args, train_dataset=cached, data_collator=collate)
    del teacher

    def loss_on_batch():
        with torch.no_grad():
            return trainer.compute_loss(student, collate(cached)).item()

    before = loss_on_batch()
    trainer.train()
    assert before > 0 and loss_on_batch() < 0.7 * before
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and losses[0] == pytest.approx(before, rel=1e-4)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_training[k])]
    assert any("q_proj" in k for k in changed)

    without_rows = KDTrainer(model=student, teacher="cached", args=args, train_dataset=data, data_collator=collate)
    with pytest.raises(ValueError, match=r"^the batch has no teacher_topk_ids, which the cached teacher reads; "
                                         r"build the dataset with TokenSequenceDataset\(teacher_topk=True\)"):
        without_rows.train()
    with pytest.raises(ValueError, match="teacher 'cache' is unknown"):
        KDTrainer(model=student, teacher="cache", args=args)
    with pytest.raises(ValueError, match="use loss 'kd' with a teacher or 'ce' without one"):
        KDTrainer(model=student, teacher="cached", loss="ce", args=args)
