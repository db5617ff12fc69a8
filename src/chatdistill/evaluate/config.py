"""`chatdistill eval` settings, their checks, and the --dtype names."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatdistill.errors import UserError
from chatdistill.models import DTYPES


@dataclass
class EvalConfig:
    """What `chatdistill eval` compares, on what, and how much work it does."""

    teacher: str
    students: list[str]
    data: str
    output: str
    baseline: str | None = None
    max_samples: int = 64
    """conversations taken from the start of --data"""
    max_new_tokens: int = 128
    """greedy answer length budget"""
    batch_size: int = 8
    """conversations per forward pass / generate call"""
    max_length: int = 1024
    """tokens per conversation when scoring (truncated beyond)"""
    metrics_jsonl: list[str] = field(default_factory=list)
    """extra trainer logs to plot; each model dir's metrics.jsonl is picked up by itself"""
    speed_prompts: int = 8
    """prompts timed at batch 1 (and the batch-8 probe uses 8)"""
    speed_new_tokens: int = 32
    """tokens decoded per speed probe (end-of-sequence ignored so every model decodes as many)"""
    memory: bool = True
    """measure peak memory in a fresh subprocess per model"""
    num_samples: int = 3
    """sample conversations shown side by side"""
    model_cards: bool = True
    """write a model card into each student directory (README.md unless one not written by
    chatdistill is there: then MODEL_CARD.md)"""
    device: str | None = None
    dtype: str | None = None
    draft: str | None = None
    """a draft model for the teacher: its speculative decoding speed is measured too"""
    draft_tokens: int = 6
    """most tokens the draft proposes per step (fewer where it is unsure)"""
    draft_int8: bool = False
    """run the draft's linear layers in int8 (CPU)"""
    draft_runtime: str = "torch"
    """where the draft runs: "torch", or "llama.cpp" for a GGUF draft (CPU)"""
    names: list[str] | None = None
    """names shown for teacher, students and baseline, in that order (default: their folder
    names)"""
    fidelity_on: str = "references"
    """tokens KL and top-1 agreement to the teacher are measured on: "references" (the test
    answers) or "teacher" (the teacher's own greedy answers to the test prompts: how closely a
    student follows the teacher where the teacher is sure of itself)"""


FIDELITY_ON = ("references", "teacher")


def check_counts(cfg: EvalConfig) -> None:
    """Refuse counts below one (and unknown choices) before anything is loaded."""
    if cfg.fidelity_on not in FIDELITY_ON:
        raise UserError(f"--fidelity-on {cfg.fidelity_on}: use one of {', '.join(FIDELITY_ON)}")
    for flag, value in (
        ("--max-samples", cfg.max_samples),
        ("--max-new-tokens", cfg.max_new_tokens),
        ("--batch-size", cfg.batch_size),
        ("speed_prompts", cfg.speed_prompts),
        ("speed_new_tokens", cfg.speed_new_tokens),
        ("--draft-tokens", cfg.draft_tokens),
    ):
        if value < 1:
            raise UserError(f"{flag}={value}: must be at least 1")


def check_inputs(cfg: EvalConfig) -> None:
    """Refuse a run with no student or a missing extra training log."""
    if not cfg.students:
        raise UserError("eval: pass at least one --student DIR to compare with the teacher")
    for p in cfg.metrics_jsonl:
        if not Path(p).is_file():
            raise UserError(f"--metrics-jsonl {p}: file not found")


def torch_dtype(name: str | None) -> torch.dtype | None:
    """--dtype name -> torch dtype (None: the engine's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
