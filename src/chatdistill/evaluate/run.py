"""`chatdistill eval`: teacher, students and an optional baseline side by side on one test set.

For every model: quality against the references (held-out CE on assistant tokens, ROUGE-L, chrF,
answer accuracy), fidelity to the teacher (KL and top-1 agreement on the reference tokens, ROUGE-L
against the teacher's answer), the share of the teacher's quality kept, and cost (parameters,
weights on disk, peak memory while generating, prefill/decode speed, time to first token).
All generation goes through `chatdistill.inference.engine.Engine`, greedy.

The jobs live beside this file: `config` (settings), `loading` (models and tokenizers), `items`
(test conversations), `token_scoring`, `answering`, `probes` (speed, memory, size); this module
runs them in order and writes the reports.
"""

import gc
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from chatdistill.data import load_rows, render_example, render_prompt
from chatdistill.errors import UserError
from chatdistill.evaluate import report, scores
from chatdistill.evaluate.answering import answer_all, text_quality
from chatdistill.evaluate.card import write_model_card
from chatdistill.evaluate.config import EvalConfig, check_counts, check_inputs
from chatdistill.evaluate.items import TestItem, prepare_items, prompt_ids
from chatdistill.evaluate.loading import (
    check_model,
    check_tokenizers,
    check_vocab,
    load_engine,
    load_tokenizer,
)
from chatdistill.evaluate.probes import (
    MEMORY_METHODS,
    draft_probe,
    memory_probe,
    speed_probe,
    weights_size,
)
from chatdistill.evaluate.result import (
    Cost,
    DataSummary,
    EvalResult,
    Fidelity,
    Kept,
    ModelResult,
    Quality,
    Sample,
    Settings,
)
from chatdistill.evaluate.token_scoring import score
from chatdistill.models.students import count_parameters

LOWER_IS_BETTER = {"ce", "perplexity"}
QUALITY_KEYS = tuple(f.name for f in fields(Quality))


def model_names(paths: list[str]) -> list[str]:
    """Directory names, made unique with their parent's name (then an index) where they clash."""
    base = [Path(p).name or p for p in paths]
    names = [
        f"{Path(p).parent.name}/{n}" if base.count(n) > 1 else n
        for p, n in zip(paths, base, strict=True)
    ]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(f"{n}#{seen[n]}" if names.count(n) > 1 else n)
    return unique


def _free(engine) -> None:
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SPEED_KEYS = (
    "prefill_tokens_per_s",
    "decode_tokens_per_s_batch1",
    "decode_tokens_per_s_batch8",
    "time_to_first_token_s",
)


def shape_key(model: torch.nn.Module) -> str:
    """What a model's speed and memory depend on: its architecture config (names and version
    stamps left out), parameter count and dtype."""
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")
    }
    dtype = next(model.parameters()).dtype
    return json.dumps([config, count_parameters(model), str(dtype)], sort_keys=True, default=str)


def _evaluate_one(
    engine, items, cfg, teacher=None, vocab=None, teacher_answers=None, known_speed=None
) -> tuple[Quality, Fidelity | None, dict, list[str], int]:
    """Quality, fidelity and cost (parameters and speed) of one loaded model; fidelity needs the
    teacher's model and answers; `known_speed` (a same-shape model's `SPEED_KEYS`) replaces the
    speed probe. Returns them with its answers and the number of scored tokens."""
    examples = [it.example for it in items if it.example is not None]
    pad = engine.tokenizer.pad_token_id  # the loader always sets one
    on_refs = cfg.fidelity_on == "references"
    sums = score(engine.model, examples, cfg.batch_size, pad, teacher if on_refs else None, vocab)
    answers = answer_all(engine, [it.prompt for it in items], cfg)
    quality = Quality(
        ce=sums.ce, perplexity=scores.perplexity(sums.ce), **text_quality(answers, items)
    )
    fidelity = None
    if teacher is not None:
        fid = sums
        if not on_refs:
            own = teacher_answer_examples(engine.tokenizer, items, teacher_answers, cfg)
            fid = score(engine.model, own, cfg.batch_size, pad, teacher, vocab)
        fidelity = Fidelity(
            kl=fid.kl_mean,
            top1_agreement=fid.agreement,
            rouge_l_vs_teacher=scores.mean_rouge_l(answers, teacher_answers),
        )
    if known_speed is None:
        speed_ids = [prompt_ids(engine, it.prompt, cfg.speed_new_tokens) for it in items]
        known_speed = speed_probe(engine, speed_ids[: cfg.speed_prompts], cfg.speed_new_tokens)
    cost = {"parameters": count_parameters(engine.model), **known_speed}
    return quality, fidelity, cost, answers, sums.tokens


def teacher_answer_examples(tokenizer, items: list[TestItem], answers: list[str], cfg) -> list:
    """The test prompts with the teacher's greedy answers as the assistant turn, for scoring
    fidelity on them (empty answers and conversations over max_length left out)."""
    out = []
    for it, answer in zip(items, answers, strict=True):
        if answer.strip():
            messages = [*it.prompt, {"role": "assistant", "content": answer}]
            ex = render_example(tokenizer, messages, cfg.max_length)
            if ex is not None:
                out.append(ex)
    return out


def _kept(student: Quality, teacher: Quality, baseline: Quality | None) -> Kept:
    out = {}
    for k in QUALITY_KEYS:
        s, t = getattr(student, k), getattr(teacher, k)
        if s is None or t is None:
            out[k] = None
        elif baseline is not None:
            b = getattr(baseline, k)
            out[k] = None if b is None else scores.gap_closed(s, t, b)
        else:
            out[k] = scores.percent_kept(s, t, higher_is_better=k not in LOWER_IS_BETTER)
    return Kept(**out)


def _measure_memory(models: list[ModelResult], items: list[TestItem], cfg: EvalConfig) -> str:
    """Fill in each model's peak memory while answering the first batch of prompts (once per
    shape: a model with `same_shape_as` gets that model's); return how it was measured (see
    MEMORY_METHODS)."""
    probes = []
    measured_models = [m for m in models if m.cost.same_shape_as is None]
    for m in measured_models:
        tok = load_tokenizer(m.path)
        ids = [render_prompt(tok, it.prompt) for it in items[: cfg.batch_size]]
        probes.append((m.path, ids))
    # One fresh process per model; they share nothing, so run as many at once as there are
    # cores (their start-up, mostly importing torch, is most of the time).
    with ThreadPoolExecutor(max_workers=max(1, min(len(probes), os.cpu_count() or 1))) as pool:
        measured = list(pool.map(lambda probe: memory_probe(*probe, cfg), probes))
    peaks = {m.name: peak for m, (peak, _) in zip(measured_models, measured, strict=True)}
    for m in models:
        m.cost.peak_memory_mb = peaks[m.cost.same_shape_as or m.name]
    return MEMORY_METHODS[measured[-1][1]]


def _training_logs(models: list[ModelResult], extra: list[str]) -> dict[str, str]:
    """Each model directory's trainer log where there is one, plus the extra logs asked for."""
    logs = {m.name: str(Path(m.path) / "metrics.jsonl") for m in models}
    logs = {n: p for n, p in logs.items() if Path(p).is_file()}
    logs.update({Path(p).parent.name or p: str(p) for p in extra})
    return logs


def _recipe(student_dir: str) -> dict:
    """The trainer's resolved recipe saved beside the student, if there is one."""
    p = Path(student_dir) / "chatdistill_config.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def evaluate(cfg: EvalConfig, say: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate teacher, students and baseline; write results.json, summary.md, report.html and
    the students' model cards into cfg.output; return the results. `say` gets progress lines."""
    roles = [("teacher", cfg.teacher, "--teacher")]
    roles += [("student", s, "--student") for s in cfg.students]
    roles += [("baseline", cfg.baseline, "--baseline")] if cfg.baseline else []
    check_counts(cfg)
    sources = {path: check_model(path, flag) for _, path, flag in roles}
    check_inputs(cfg)
    rows = load_rows(cfg.data)[: cfg.max_samples]
    say = say or (lambda _msg: None)
    drafts = [(cfg.draft, "--draft")] if cfg.draft else []
    check_tokenizers(cfg.teacher, [(path, flag) for _, path, flag in roles[1:]] + drafts)

    teacher = load_engine(sources[cfg.teacher], cfg.device, cfg.dtype)
    items = prepare_items(
        rows, teacher.tokenizer, min(cfg.max_length, teacher.context_length), cfg.data
    )
    names = cfg.names or model_names([p for _, p, _ in roles])
    if len(names) != len(roles) or len(set(names)) != len(names):
        raise UserError(f"names {names}: give {len(roles)} distinct names, one per model")
    models: list[ModelResult] = []
    answers: dict[str, list[str]] = {}
    shapes: dict[str, ModelResult] = {}  # shape_key -> the model whose speed was measured
    for (role, path, _), name in zip(roles, names, strict=True):
        say(f"evaluating {role} {name} ...")
        engine = teacher if role == "teacher" else load_engine(sources[path], cfg.device, cfg.dtype)
        key = shape_key(engine.model)
        same = shapes.get(key)
        known = {k: getattr(same.cost, k) for k in SPEED_KEYS} if same else None
        if role == "teacher":
            quality, fidelity, cost, ans, scored_tokens = _evaluate_one(teacher, items, cfg)
        else:
            vocab = check_vocab(teacher.tokenizer, engine.tokenizer, teacher.model, engine.model)
            quality, fidelity, cost, ans, _ = _evaluate_one(
                engine, items, cfg, teacher.model, vocab, answers[names[0]], known
            )
            _free(engine)
        src = sources[path]
        own = src.adapter or path
        cost = Cost(
            **cost,
            size_on_disk_bytes=weights_size(own, src.base),
            same_shape_as=same.name if same else None,
        )
        source = src.record()
        models.append(ModelResult(name, role, str(path), quality, fidelity, cost, source=source))
        shapes.setdefault(key, models[-1])
        answers[name] = ans
    speculative = None
    if cfg.draft:
        say(f"timing the teacher with --draft {cfg.draft} ...")
        speed_items = items[: cfg.speed_prompts]
        speed_ids = [prompt_ids(teacher, it.prompt, cfg.speed_new_tokens) for it in speed_items]
        speculative = draft_probe(
            teacher,
            cfg.draft,
            cfg.draft_tokens,
            speed_ids,
            cfg.speed_new_tokens,
            cfg.draft_int8,
            cfg.draft_runtime,
        )
        alone = models[0].cost.decode_tokens_per_s_batch1
        spec = speculative["decode_tokens_per_s_batch1"]
        speculative["teacher_decode_tokens_per_s_batch1"] = alone
        speculative["speedup"] = spec / alone if spec and alone else None
    device = str(next(teacher.model.parameters()).device)
    _free(teacher)

    method = "not measured (--no-memory)"
    if cfg.memory:
        say(f"measuring peak memory of {', '.join(m.name for m in models)} ...")
        method = _measure_memory(models, items, cfg)

    baseline = next((m.quality for m in models if m.role == "baseline"), None)
    for m in models:
        if m.role == "student":
            m.kept = _kept(m.quality, models[0].quality, baseline)

    samples = [
        Sample(it.prompt, it.reference, {n: a[i] for n, a in answers.items()})
        for i, it in enumerate(items[: cfg.num_samples])
    ]
    results = EvalResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=DataSummary(
            path=str(cfg.data),
            conversations=len(items),
            scored_tokens=scored_tokens,
            with_reference=sum(it.reference is not None for it in items),
            with_answer=sum(it.answer is not None for it in items),
        ),
        settings=Settings(**{**asdict(cfg), "device": device, "memory_method": method}),
        kept_mode="gap_closed" if cfg.baseline else "ratio",
        models=models,
        samples=samples,
        training_logs=_training_logs(models, cfg.metrics_jsonl),
        speculative=speculative,
    )
    report.write_reports(results, cfg.output)
    if cfg.model_cards:
        for m in models:
            if m.role == "student":
                card = write_model_card(m.path, results, _recipe(m.path))
                if card.name != "README.md":
                    say(f"{m.name}: its README.md is not chatdistill's; model card in {card}")
    return results
