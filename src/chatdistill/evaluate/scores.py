"""Pure scoring functions, no model runs: token scores on logits, text scores on answers, ratios.

Scales: cross-entropy and KL are in nats per token; ROUGE-L, chrF, accuracy and top-1 agreement
are percentages (0-100) so they read alike in one table.
"""

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from chatdistill.data import loss_positions

# ---------------------------------------------------------------------------------------------
# Token-level scores on logits
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenSums:
    """Running sums over scored tokens, so batches combine into token-weighted means."""

    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0

    def add(self, other: "TokenSums") -> None:
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens

    @property
    def ce(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def kl_mean(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")

    @property
    def agreement(self) -> float:
        return 100.0 * self.agree / self.tokens if self.tokens else float("nan")


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits predict a scored label, and those labels.

    labels (B, T), `data.IGNORE` where not scored (HF convention: aligned with input_ids; the
    logits at position t predict the token at t+1). Returns (mask (B, T) bool over logits,
    targets (N,)).
    """
    scored = loss_positions(labels)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = scored
    return mask, labels[:, 1:][scored]


def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk: int = 512,
) -> TokenSums:
    """`position_scores` on the scored positions of (B, T, V) logits and (B, T) labels."""
    mask, targets = scored_positions(labels)
    teacher = teacher_logits[mask] if teacher_logits is not None else None
    return position_scores(logits[mask], targets, teacher, vocab_size, chunk)


def position_scores(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk: int = 512,
) -> TokenSums:
    """Cross-entropy on scored tokens and, given teacher logits, KL(teacher||student) and top-1
    agreement on the same positions.

    logits (N, V_s) at the N scored positions, targets (N,), teacher_logits (N, V_t). Both
    distributions are restricted to the first `vocab_size` columns (the shared vocabulary; extra
    columns are padding that no tokenizer id reaches) and renormalised there. Work is done in
    float32, `chunk` positions at a time, so (N, V) float32 never sits in memory whole.
    """
    v = vocab_size or logits.shape[-1]
    student = logits[:, :v]
    teacher = teacher_logits[:, :v] if teacher_logits is not None else None
    sums = TokenSums(tokens=int(targets.numel()))
    for i in range(0, targets.numel(), chunk):
        s_logp = F.log_softmax(student[i : i + chunk].float(), dim=-1)
        sums.nll += float(F.nll_loss(s_logp, targets[i : i + chunk], reduction="sum"))
        if teacher is not None:
            t_logp = F.log_softmax(teacher[i : i + chunk].float(), dim=-1)
            sums.kl += float(F.kl_div(s_logp, t_logp, log_target=True, reduction="sum"))
            sums.agree += float((s_logp.argmax(-1) == t_logp.argmax(-1)).sum())
    return sums


def perplexity(ce: float) -> float:
    """exp(CE) of a token-weighted mean cross-entropy in nats; inf if it overflows."""
    try:
        return math.exp(ce)
    except OverflowError:
        return float("inf")


# ---------------------------------------------------------------------------------------------
# Text scores on generated answers
# ---------------------------------------------------------------------------------------------

# Scripts written without spaces: each character is a token, as in multilingual ROUGE variants.
_CHAR_SCRIPTS = (
    "\u0e00-\u0e7f"  # Thai
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\uac00-\ud7af"  # Hangul syllables
)
_TOKEN_RE = re.compile(rf"[{_CHAR_SCRIPTS}]|[^\W_{_CHAR_SCRIPTS}]+")


class UnicodeTokenizer:
    """ROUGE tokenizer that keeps every script: rouge_score's default drops non-ASCII text, which
    would score any two answers in Greek or Chinese as equal. Lower-cases, NFKC-normalises, splits
    on word characters, and gives characters of space-less scripts one token each."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens) of one pair, 0-100."""
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L over pairs, 0-100."""
    if not predictions:
        return float("nan")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(
        predictions
    )


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (character n-gram F-score, sacrebleu defaults), 0-100."""
    if not predictions:
        return float("nan")
    return CHRF().corpus_score(list(predictions), [list(references)]).score


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u00a1\u00bf\u3001\u3002\uff0c\uff01\uff1f]")


def normalise_answer(text: str) -> str:
    """Normalise for answer matching: NFKC, case-fold, drop punctuation, collapse whitespace."""
    text = _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())


def answer_correct(prediction: str, answer: str) -> bool:
    """True when the normalised answer occurs in the normalised prediction on token boundaries
    ("12" matches "it is 12." but not "120"). An empty answer never matches."""
    ans, pred = normalise_answer(answer), normalise_answer(prediction)
    return bool(ans) and f" {ans} " in f" {pred} "


def answer_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Percentage of predictions that contain their answer (see `answer_correct`)."""
    if not predictions:
        return float("nan")
    hits = sum(answer_correct(p, a) for p, a in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(predictions)


# ---------------------------------------------------------------------------------------------
# How much of the teacher a student keeps
# ---------------------------------------------------------------------------------------------


def percent_kept(student: float, teacher: float, higher_is_better: bool = True) -> float | None:
    """Student as a percentage of the teacher: 100*student/teacher for higher-is-better metrics,
    100*teacher/student for lower-is-better ones (CE, perplexity). None when undefined."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return 100.0 * num / den


def gap_closed(student: float, teacher: float, baseline: float) -> float | None:
    """Percentage of the baseline-to-teacher gap the student closes: 100*(s-b)/(t-b). Works for
    either metric direction; 0 = no better than the baseline, 100 = as good as the teacher."""
    vals = (student, teacher, baseline)
    if teacher == baseline or not all(math.isfinite(x) for x in vals):
        return None
    return 100.0 * (student - baseline) / (teacher - baseline)
