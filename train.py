"""Quantization-aware training by distillation from the full-precision teacher (LLM-QAT, section 2.3).

    python train.py --w_bits 4 --a_bits 8 --kv_bits 4 --data_path gen_data/all.jsonl --output_dir output/qat

Every Hugging Face `TrainingArguments` option works (resume, logging, --fsdp, --deepspeed, ...); the defaults
below are the released LLaMA-7B recipe: 1 epoch, AdamW, lr 2e-5, cosine, no warmup, weight decay 0, batch 1 per
device, sequence length 2048, checkpoints every 2000 steps. The quantizer flags are the fields of
`models.quantize.QATConfig`; `--scheme NVFP4` (FP8, FP8_DYNAMIC, NVFP4, MXFP4, ...A16) replaces W and A by a
floating-point format, `--kv_scheme FP8` the KV bits. `scripts/run_train.sh W A KV` is the usual launcher; it runs
`--check_only` first.
`--teacher cached` distils from the teacher's top-K log-probabilities cached with the data (generate_data.py
--save-topk K, then merge_gen_data.py) instead of loading and running the teacher. `--init_from GPTQ_DIR` starts
the student from a GPTQ model of the teacher instead of the teacher's weights (utils/evaluation/baselines.py).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import get_type_hints

import torch
import transformers
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, PretrainedConfig, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from models.checkpoint import damaged_weight_file, saved_settings, write_remote_code
from models.quantize import QATConfig, quantize_model, quantized_modules
from models.quantizers import FULL_PRECISION
from utils.data.dataset import PadCollator, TokenSequenceDataset, check_packing
from utils.data.records import TeacherIdentity, model_display_name
from utils.evaluation.baselines import check_gptq_model, check_gptq_settings, start_from_gptq
from utils.safety import check_positions, ensure_writable_dir, user_errors
from utils.training.kd_trainer import CACHED_TEACHER, LOSSES, REDUCTIONS, TEACHERS, KDTrainer
from utils.training.loading import load_model, load_tokenizer, load_weightless_model, resolve_model_path

logger = logging.getLogger("train")
TRAIN_DEFAULT_BITS = dict(w_bits=4, a_bits=8, kv_bits=4)  # the paper's headline setting (QATConfig's own: 16)
SET_BY = dict(w_bits="scheme", a_bits="scheme", kv_bits="kv_scheme")  # the flags that choose a float format instead


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "teacher: a local model directory or hub name; omit for the embedded SmolLM2-135M"})
    init_from: str | None = field(default=None, metadata={
        "help": "a GPTQ model of the teacher (scripts/baseline.py gptq; run_train.sh INIT=gptq makes it): the student "
                "starts from its weights, and with --learn_ranges weights from its scales (beyond the paper; needs "
                "--recipe deploy)"})
    check_only: bool = field(default=False, metadata={"help": "check the flags against the model's config and exit, "
                                                              "reading no weights and no data"})


@dataclass
class DataArguments:
    data_path: str = field(default="gen_data/all.jsonl", metadata={"help": "merged .jsonl from merge_gen_data.py"})
    model_max_length: int = field(default=2048, metadata={"help": "truncate (or pack) sequences to this many tokens"})
    packing: bool = field(default=False, metadata={"help": "concatenate sequences into full blocks instead of truncating"})

    def __post_init__(self):
        if self.model_max_length < 1:
            raise ValueError(f"--model_max_length {self.model_max_length} must be at least 1 (paper: 2048)")


# The quantizer flags are QATConfig's own fields, with its defaults and help (`QATConfig.from_flags` reads them).
QuantArguments = make_dataclass("QuantArguments", [(f.name, get_type_hints(QATConfig)[f.name],
                                                    field(default=f.default, metadata=f.metadata))
                                                   for f in fields(QATConfig)])


@dataclass
class DistillationArguments:
    kd_reduction: str = field(default="batchmean", metadata={"help": f"KL normalisation: {' or '.join(REDUCTIONS)}"})
    loss: str = field(default="kd", metadata={"help": "kd: KL to the teacher's logits (the paper's method); ce: "
                                                      "next-token cross-entropy on the data, no teacher (its ablation)"})
    teacher: str = field(default="model", metadata={"help": "model: load and run the teacher; cached: its top-K "
                                                            "log-probs cached with the data (generate_data.py "
                                                            "--save-topk), no teacher loaded"})
    topk: int | None = field(default=None, metadata={
        "help": "with --teacher cached: distil from the teacher's TOPK most likely tokens of those cached (default: "
                "all of them), so that one synthesis with --save-topk 128 serves K = 8, 32 and 128"})
    tail_samples: int | None = field(default=None, metadata={
        "help": "with --teacher cached and data generated with --save-tail S: the first TAIL_SAMPLES of the S tokens "
                "sampled outside the top-K at each position (default: all of them; 0: none, the rest is one bucket)"})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r} is not supported; use {' or '.join(LOSSES)}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"--teacher {self.teacher!r} is not supported; use {' or '.join(TEACHERS)}")
        for flag, value in (("--topk", self.topk), ("--tail_samples", self.tail_samples)):
            if value is not None and self.teacher != CACHED_TEACHER:
                raise ValueError(f"{flag} {value} selects among the cached teacher's tokens; add --teacher "
                                 f"{CACHED_TEACHER}, or drop {flag}")
        if self.teacher == CACHED_TEACHER and self.loss == "ce":
            raise ValueError("--teacher cached distils from the teacher's cached log-probs, but --loss ce uses no "
                             "teacher; drop --teacher cached or use --loss kd")
        if self.kd_reduction not in REDUCTIONS:
            raise ValueError(f"--kd_reduction {self.kd_reduction!r} is not supported; use {' or '.join(REDUCTIONS)}")


@dataclass
class QATTrainingArguments(TrainingArguments):
    """TrainingArguments with the released LLaMA-7B recipe as defaults."""

    output_dir: str = field(default="output/qat")
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 1
    save_steps: float = 2000
    optim: str = "adamw_torch_fused"  # PyTorch's fused AdamW; `--optim adamw_apex_fused` if NVIDIA apex is built
    logging_steps: float = 10
    range_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of the clipping factors of --learn_ranges (default: --learning_rate)"})

    def __post_init__(self):
        # The Trainer takes --max_steps 0 as a step count (it runs one) and trains 0 epochs as asked: both would
        # save an untrained student as if trained.
        if self.max_steps == 0:
            raise ValueError("--max_steps 0 trains nothing; pass a positive number of steps, or -1 (the default) to "
                             "train --num_train_epochs")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs:g} trains nothing; pass a positive number "
                             "of epochs (paper: 1), or --max_steps N")
        super().__post_init__()


def unusable_checkpoint(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None. The Trainer writes trainer_state.json last (after weights,
    optimizer, scheduler and RNG states), so a checkpoint whose state file reads back was saved whole; its weight
    files are read back too, since a full disk or a cut copy can leave them short after the state was written."""
    try:
        json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE_NAME}: it was cut off while saving"
    damaged = damaged_weight_file(checkpoint)
    return f"{damaged.name} is truncated or damaged" if damaged else None


def last_complete_checkpoint(output_dir: Path, move_aside: bool = True) -> str | None:
    """The newest whole checkpoint of a run. One cut off while saving (a kill during the save) or with a damaged
    weight file is moved aside to incomplete-checkpoint-N, so it neither blocks resuming nor is mistaken for a
    checkpoint later. Only one process may move it (`move_aside`): the others skip it, so that all agree."""
    checkpoints = sorted((path for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                          if path.is_dir() and path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit()),
                         key=lambda path: int(path.name.rpartition("-")[2]), reverse=True)
    for checkpoint in checkpoints:
        problem = unusable_checkpoint(checkpoint)
        if problem is None:
            return str(checkpoint)
        if not move_aside:
            continue
        aside = output_dir / f"incomplete-{checkpoint.name}"
        suffix = 1
        while aside.exists():
            suffix += 1
            aside = output_dir / f"incomplete-{checkpoint.name}-{suffix}"
        checkpoint.rename(aside)
        logger.warning("%s cannot be resumed from (%s); moved it to %s and resuming from the checkpoint before it",
                       checkpoint, problem, aside)
    return None


def with_default_bits(flags: dict) -> dict:
    """The quantizer flags, with the paper's W4A8KV4 for the bits not given, except where --scheme / --kv_scheme sets
    the format (16 there: no integer quantizer)."""
    return {**flags, **{name: FULL_PRECISION if flags[SET_BY[name]] else bits
                        for name, bits in TRAIN_DEFAULT_BITS.items() if flags[name] is None}}


def checkpoint_to_resume(training_args: TrainingArguments, qat_config: QATConfig) -> str | None:
    """--resume_from_checkpoint, else the last whole checkpoint of --output_dir (rerunning a killed command
    continues it); refused when it was trained with other quantizer settings."""
    resume = training_args.resume_from_checkpoint
    problem = unusable_checkpoint(Path(resume)) if resume is not None else None
    if problem:
        raise ValueError(f"--resume_from_checkpoint {resume} is not a whole checkpoint ({problem}); pass an "
                         "earlier checkpoint, or omit the flag to resume from the last whole one")
    if resume is None and os.path.isdir(training_args.output_dir):
        # The first process moves unusable checkpoints aside; the others look after it has, and only skip them.
        with training_args.main_process_first(local=False, desc="choosing the checkpoint to resume"):
            resume = last_complete_checkpoint(Path(training_args.output_dir),
                                              move_aside=training_args.process_index == 0)
    saved = saved_settings(resume) if resume else None
    if saved and saved != qat_config:  # the saved model's config would lie about its weights
        raise ValueError(f"{resume} was trained with {asdict(saved)}, not {asdict(qat_config)}; pass another "
                         "--output_dir (or the same settings) to start or resume that run")
    return resume


def check_against_model(config: PretrainedConfig, qat_config: QATConfig, model_max_length: int) -> None:
    """What the model's config alone refuses, before any data or weights are read: sequences past its positions, and
    quantizer settings its layers cannot take (a group size that does not divide a layer's width, KV bits without
    k/v projections), found by quantizing the model's structure on the meta device."""
    check_positions(model_max_length, "--model_max_length", config)
    if is_deepspeed_zero3_enabled():  # from_config would partition even a meta model: quantize_model checks later
        return
    with torch.device("meta"):
        quantize_model(AutoModelForCausalLM.from_config(copy.deepcopy(config)), qat_config)  # it records its settings


def reads_weights(training_args: TrainingArguments) -> bool:
    """False on every process but the first under FSDP2 with `cpu_ram_efficient_loading` (README "Paper scale on
    GPUs"): Accelerate's `fsdp2_prepare_model` then fills each process's shards by broadcast from process 0's full
    state dict, so one copy of each model is read instead of one per process. (transformers 5's own switch for this,
    `is_fsdp_enabled()`, still reads the weights on every process, and is only on once the Accelerator exists.)"""
    plugin = training_args.fsdp_plugin_args or {}
    efficient = plugin.get("fsdp_version") == 2 and plugin.get("cpu_ram_efficient_loading")
    return not efficient or training_args.process_index == 0


def load_float_model(model_path: str, dtype: torch.dtype, training_args: TrainingArguments):
    if reads_weights(training_args):
        return load_model(model_path, dtype=dtype, quantized=False)
    return load_weightless_model(model_path, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, QuantArguments, DistillationArguments,
                               QATTrainingArguments))
    parser.set_defaults(**dict.fromkeys(TRAIN_DEFAULT_BITS))  # None: not given (see with_default_bits)
    model_args, data_args, quant_args, kd_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # bad settings fail here, before any model is loaded
    qat_config = QATConfig.from_flags(**with_default_bits(asdict(quant_args)))
    if training_args.range_learning_rate is not None and qat_config.learn_ranges == "none":
        raise ValueError(f"--range_learning_rate {training_args.range_learning_rate:g} trains learned ranges; add "
                         "--learn_ranges weights, or drop --range_learning_rate")
    if model_args.init_from:
        check_gptq_settings(qat_config)
    cached_teacher = kd_args.teacher == CACHED_TEACHER
    check_packing(data_args.packing, cached_teacher)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()

    ensure_writable_dir(training_args.output_dir, "--output_dir")
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    model_config = AutoConfig.from_pretrained(model_path)
    check_against_model(model_config, qat_config, data_args.model_max_length)
    if model_args.check_only:
        return
    teacher_name = model_display_name(model_args.model_name_or_path)
    if model_args.init_from:
        check_gptq_model(model_args.init_from, qat_config, teacher_name)
    resume = checkpoint_to_resume(training_args, qat_config)
    vocab_size = model_config.vocab_size
    teacher_id = TeacherIdentity.of(teacher_name, tokenizer, vocab_size)
    dataset = TokenSequenceDataset(data_args.data_path, data_args.model_max_length, tokenizer, data_args.packing,
                                   teacher=teacher_id, vocab_size=vocab_size, teacher_topk=cached_teacher,
                                   topk=kd_args.topk, tail=kd_args.tail_samples)
    # A QAT checkpoint given as the model loads its float (latent) weights: they are the teacher and the start.
    # Two loads rather than a deepcopy: under DeepSpeed ZeRO-3 each load is partitioned as it happens.
    if kd_args.loss == "ce":
        teacher, teacher_note = None, "next-token loss, no teacher"
    elif cached_teacher:
        teacher = CACHED_TEACHER
        store = dataset.teacher_topk
        tail = f" + {dataset.tail} tail samples (of {store.tail})" if dataset.tail else ""
        teacher_note = f"teacher: cached top-{dataset.topk} (of {store.k}){tail} from {store.directory}"
    else:
        teacher = load_float_model(model_path, torch.bfloat16 if training_args.bf16 else torch.float32,
                                   training_args)
        teacher_note = f"teacher frozen in {teacher.dtype}"
    student = quantize_model(load_float_model(model_args.init_from or model_path, torch.float32, training_args),
                             qat_config)
    if model_args.init_from:  # processes that read no weights get process 0's, clipping factors included
        start_from_gptq(student, model_args.init_from, qat_config, weights_loaded=reads_weights(training_args))
    start = f", starting from the GPTQ model {model_args.init_from}" if model_args.init_from else ""
    logger.info("Student %s: %d quantized linear layers%s; %s", qat_config.label(), len(quantized_modules(student)),
                start, teacher_note)

    trainer = KDTrainer(model=student, teacher=teacher, kd_reduction=kd_args.kd_reduction, loss=kd_args.loss,
                        range_learning_rate=training_args.range_learning_rate, args=training_args,
                        train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id),
                        processing_class=tokenizer)

    logger.info("Training on %d process(es), %s", training_args.world_size, trainer.accelerator.distributed_type)
    if training_args.fsdp and trainer.accelerator.distributed_type != DistributedType.FSDP:
        logger.warning("--fsdp was given, but Accelerate enables FSDP on GPUs only: this run is not sharded")
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)

    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_remote_code(training_args.output_dir)
        logger.info("Saved the %s student to %s (reload: utils.training.loading.load_model, or "
                    "from_pretrained(..., trust_remote_code=True))", qat_config.label(), training_args.output_dir)


if __name__ == "__main__":
    with user_errors("train.py"):
        main()
