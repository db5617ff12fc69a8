"""Greedy answers to the test prompts, and their text quality against the references."""

from chatdistill.evaluate import scores
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.items import TestItem, prompt_ids
from chatdistill.inference.engine import SamplingParams


def answer_all(engine, prompts: list[list[dict]], cfg: EvalConfig) -> list[str]:
    """Greedy answers to every prompt."""
    ids = [prompt_ids(engine, p, cfg.max_new_tokens) for p in prompts]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return [c.text.strip() for c in engine.generate(ids, params, batch_size=cfg.batch_size)]


def text_quality(answers: list[str], items: list[TestItem]) -> dict:
    """ROUGE-L and chrF against references, accuracy against `answer` fields (None if absent)."""
    refs = [(a, it.reference) for a, it in zip(answers, items, strict=True) if it.reference]
    keyed = [(a, it.answer) for a, it in zip(answers, items, strict=True) if it.answer is not None]
    preds, golds = [a for a, _ in refs], [r for _, r in refs]
    return {
        "rouge_l": scores.mean_rouge_l(preds, golds) if refs else None,
        "chrf": scores.chrf(preds, golds) if refs else None,
        "accuracy": scores.answer_accuracy(*zip(*keyed, strict=True)) if keyed else None,
    }
