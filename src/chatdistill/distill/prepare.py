"""Everything `train` needs before the first step: `prepare(cfg, accelerator)` loads and checks
the tokenizer, data, teacher (live or cached), student, optimizer and schedule into a `Setup`.

The student is wrapped in `StudentLoss`, a module whose forward computes the loss sums, so that
accelerate's wrappers (DDP, FSDP, DeepSpeed) see the whole computation in their forward pass.
"""

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from chatdistill.config import DistillConfig, LossConfig
from chatdistill.data import (
    Dataset,
    build_dataset,
    has_reference,
    load_rows,
    loss_positions,
    require_references,
    split_rows,
)
from chatdistill.distill.autocast import FrozenHeadCast, use_fp32_attention
from chatdistill.distill.cache import CachedTeacher
from chatdistill.distill.losses import chunk_size_for, chunked_loss
from chatdistill.distill.positions import hidden_at_loss_positions
from chatdistill.distill.teacher import LiveTeacher, TeacherSource
from chatdistill.errors import UserError
from chatdistill.models import (
    ModelSource,
    check_vocab,
    count_parameters,
    cut_student,
    even_layers,
    hidden_and_head,
    load_model,
    load_tokenizer,
    resolve,
    student_from_config,
)


class StudentLoss(torch.nn.Module):
    """forward(batch, teacher targets, weights) -> (loss, ce_sum, kd_sum) on loss-carrying
    positions only; loss = weights[0]·ce_sum + weights[1]·kd_sum carries the gradient.

    `fused` takes each loss chunk's gradient in the forward pass (see losses.chunked_loss); it is
    turned off where the head's parameters are sharded (FSDP, DeepSpeed)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, loss: LossConfig, fused: bool):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.loss_cfg = loss
        self.fused = fused
        self.head_cast = FrozenHeadCast()

    def forward(self, input_ids, attention_mask, labels, teacher_fn=None, weights=(1.0, 1.0)):
        base, head = hidden_and_head(self.model)
        lc = self.loss_cfg
        project = self.head_cast(head, input_ids.device.type)
        return chunked_loss(
            hidden_at_loss_positions(base, input_ids, attention_mask, labels),
            lambda x: project(x)[:, : self.vocab_size],
            labels[:, 1:][loss_positions(labels)],
            teacher_fn,
            lc.kind,
            weights=weights,
            head_params=list(head.parameters()) if self.fused else None,
            beta=lc.beta,
            skew=lc.skew,
            temperature=lc.temperature,
            chunk_size=chunk_size_for(self.vocab_size, lc.chunk_size),
        )


@dataclass
class Setup:
    cfg: DistillConfig
    accelerator: Accelerator
    tokenizer: object
    pad_id: int
    vocab_size: int
    train_data: Dataset | None
    val_data: Dataset | None
    teacher: TeacherSource | None
    val_teacher: TeacherSource | None
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ce_weight: float
    prompt_rows: list
    sources: dict[str, ModelSource]
    """the recipe's teacher and student as resolved once (the saved recipe records them)"""

    @property
    def student(self) -> torch.nn.Module:
        """The bare student model (unwrapped from DDP/FSDP)."""
        return self.accelerator.unwrap_model(self.loss_module).model


def lr_lambda(cfg: DistillConfig):
    """Linear warmup to the peak, cosine decay to min_lr_ratio of it at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _check_mode(cfg: DistillConfig) -> None:
    if cfg.is_sft:
        if cfg.on_policy.fraction > 0:
            raise UserError(
                "--on-policy-fraction needs a teacher to score the student's samples; "
                "choose a divergence with --loss (e.g. jsd) and pass --teacher"
            )
        return
    if cfg.teacher is None and cfg.teacher_cache is None:
        raise UserError(f"loss {cfg.loss.kind!r} needs --teacher or --teacher-cache, or --loss sft")
    if cfg.teacher_cache and cfg.on_policy.fraction > 0:
        raise UserError(
            "--on-policy-fraction needs a live teacher to score the student's samples; "
            "pass --teacher instead of --teacher-cache"
        )


def _data(cfg: DistillConfig, tokenizer) -> tuple[Dataset | None, Dataset | None, list]:
    """(train, validation, prompt rows). Prompt-only rows are kept for on-policy steps only."""
    if cfg.data.train is None:
        raise UserError("no training data: pass --data FILE (JSONL or Parquet chat rows)")
    rows = load_rows(cfg.data.train)
    with_ref = [r for r in rows if has_reference(r["messages"])]
    fraction = cfg.on_policy.fraction
    if fraction == 0:
        require_references(rows, cfg.data.train, "SFT" if cfg.is_sft else "off-policy distillation")
    elif fraction < 1 and not with_ref:
        raise UserError(
            f"{cfg.data.train}: no row has an answer for the off-policy steps; "
            "use --on-policy-fraction 1 for prompt-only data"
        )
    if cfg.data.validation:
        val_rows = load_rows(cfg.data.validation)
        require_references(val_rows, cfg.data.validation, "validation")
    elif with_ref:
        with_ref, val_rows = split_rows(with_ref, cfg.data.val_fraction, cfg.train.seed)
    else:
        val_rows = []
    n = cfg.data.max_length
    train = build_dataset(with_ref, tokenizer, n, str(cfg.data.train)) if with_ref else None
    source = str(cfg.data.validation or cfg.data.train)
    val = build_dataset(val_rows, tokenizer, n, source) if val_rows else None
    # On-policy prompts: prompt-only rows and the training rows, never the validation rows.
    prompts = [r for r in rows if not has_reference(r["messages"])] + with_ref
    return train, val, prompts if fraction > 0 else []


def _student(
    cfg: DistillConfig,
    student: ModelSource | None,
    teacher: ModelSource | None,
    teacher_model,
    vocab: int,
    tokenizer,
) -> torch.nn.Module:
    if student:
        model = load_model(student, "student")
        check_vocab(tokenizer, load_tokenizer(student, "student"), teacher_model, model)
        return model
    if cfg.student_config:
        return student_from_config(cfg.student_config, vocab)
    if cfg.student_layers is not None or cfg.student_num_layers is not None:
        if teacher_model is None:
            teacher_model = load_model(teacher, "teacher") if teacher else None
        if teacher_model is None:
            raise UserError("cutting a student from the teacher needs --teacher (its weights)")
        layers = cfg.student_layers
        if layers is None:
            n = teacher_model.config.num_hidden_layers
            layers = even_layers(n, cfg.student_num_layers)
        return cut_student(teacher_model, layers)
    raise UserError(
        "no student: pass --student DIR, --student-layers/--student-num-layers (cut from the "
        "teacher) or --student-config config.json"
    )


def teacher_source(cfg: DistillConfig) -> ModelSource:
    """The recipe's teacher (with its adapter, if any), resolved: a GGUF file converts once."""
    return resolve(cfg.teacher, "teacher", adapter=cfg.teacher_adapter)


def prepare(cfg: DistillConfig, accelerator: Accelerator) -> Setup:
    """Load and check everything; return the prepared Setup (errors are UserErrors)."""
    _check_mode(cfg)
    # Resolved once: a GGUF teacher is hashed (and converted, the first time) once per run.
    teacher_src = teacher_source(cfg) if cfg.teacher else None
    student_src = resolve(cfg.student, "student") if cfg.student else None
    tok_src = cfg.tokenizer or teacher_src or student_src
    if tok_src is None:
        raise UserError("no tokenizer: pass --tokenizer DIR (or a --teacher / --student)")
    what = "tokenizer" if cfg.tokenizer else "teacher" if cfg.teacher else "student"
    tokenizer = load_tokenizer(tok_src, what)
    train_data, val_data, prompt_rows = _data(cfg, tokenizer)
    teacher_model = None
    if cfg.teacher and not cfg.is_sft and not cfg.teacher_cache:
        teacher_model = load_model(teacher_src, "teacher")
        check_vocab(tokenizer, load_tokenizer(teacher_src, "teacher"), teacher_model)
    vocab = len(tokenizer)
    student = _student(cfg, student_src, teacher_src, teacher_model, vocab, tokenizer)
    if student.get_output_embeddings().weight.shape[0] < vocab:
        raise UserError(f"student output layer is smaller than the tokenizer vocab ({vocab})")
    teacher = val_teacher = None
    if teacher_model is not None:
        precision = cfg.train.teacher_precision
        if precision == "auto":
            precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
        dtype = torch.bfloat16 if precision == "bf16" else None
        teacher_model = teacher_model.to(accelerator.device, dtype=dtype)
        teacher = val_teacher = LiveTeacher(teacher_model, vocab)
    elif cfg.teacher_cache:
        teacher = CachedTeacher.open(
            cfg.teacher_cache,
            tokenizer,
            train_data,
            temperature=cfg.loss.temperature,
            max_length=cfg.data.max_length,
            teacher=teacher_src,
            data=cfg.data.train,
        )
        # The cache holds the whole data file, so a split of it can be scored from the cache too.
        val_teacher = teacher if val_data is not None and teacher.covers(val_data) else None
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16":
        use_fp32_attention(student)  # the CPU's bf16 attention backward is the slower one
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    loss_module = StudentLoss(student, vocab, cfg.loss, fused=not sharded)
    # The fused AdamW kernel (CPU and CUDA) updates all parameters in one pass.
    if cfg.train.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # The schedule counts optimizer steps: accelerate's prepared scheduler would advance once per
    # process, so it stays unprepared; checkpoints store its state as JSON (see checkpoint.py).
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if accelerator.is_main_process:
        t_params = count_parameters(teacher_model) if teacher_model is not None else None
        s_params = count_parameters(student)
        ratio = f" ({s_params / t_params:.1%} of the teacher)" if t_params else ""
        n_train = len(train_data.examples) if train_data else 0
        dropped = train_data.dropped if train_data else 0
        n_val = len(val_data.examples) if val_data else 0
        cut = train_data.open_ended if train_data else 0
        cut_note = f"; {cut} answers cut at a length budget teach no ending" if cut else ""
        print(
            f"student: {s_params:,} parameters{ratio}; train {n_train} conversations "
            f"({dropped} dropped by truncation{cut_note}), {len(prompt_rows)} prompts, "
            f"validation {n_val}"
        )
    return Setup(
        cfg=cfg,
        accelerator=accelerator,
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab,
        train_data=train_data,
        val_data=val_data,
        teacher=teacher,
        val_teacher=val_teacher,
        loss_module=loss_module,
        optimizer=optimizer,
        scheduler=scheduler,
        ce_weight=1.0 if cfg.is_sft else cfg.loss.ce_weight,
        prompt_rows=prompt_rows,
        sources={r: s for r, s in (("teacher", teacher_src), ("student", student_src)) if s},
    )
