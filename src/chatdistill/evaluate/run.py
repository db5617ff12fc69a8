"""`chatdistill eval`: teacher, students and an optional baseline side by side on one test set.

For every model: quality against the references (held-out CE on assistant tokens, ROUGE-L, chrF,
answer accuracy), fidelity to the teacher (KL and top-1 agreement on the reference tokens, ROUGE-L
against the teacher's answer), the share of the teacher's quality kept, and cost (parameters,
weights on disk, peak memory while generating, prefill/decode speed, time to first token).
All generation goes through `chatdistill.inference.engine.Engine`, greedy.
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from chatdistill.data import (
    Example,
    collate,
    load_rows,
    render_example,
    render_prompt,
    split_prompt_reference,
)
from chatdistill.errors import UserError
from chatdistill.evaluate import scores as metrics

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".onnx.data"
)  # fmt: skip
LOWER_IS_BETTER = {"ce", "perplexity"}
QUALITY_KEYS = ("ce", "perplexity", "rouge_l", "chrf", "accuracy")


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
    """write README.md into each student directory"""
    device: str | None = None
    dtype: str | None = None
    draft: str | None = None
    """a draft model for the teacher: its speculative decoding speed is measured too"""
    draft_tokens: int = 4
    """tokens the draft proposes per step"""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """--dtype name -> torch dtype (None: the engine's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_model_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag} {path}: no such model directory; pass a saved model dir")
    if not (p / "config.json").is_file():
        raise UserError(
            f"{flag} {path}: no config.json there; pass a directory from save_pretrained"
        )


@dataclass
class TestItem:
    """One test conversation: its scoring example (None if no assistant turn fits), the prompt to
    answer (messages before the last assistant turn), the reference answer and `answer` field."""

    example: Example | None
    prompt: list[dict]
    reference: str | None
    answer: str | None


def prepare_items(rows: list[dict], tokenizer, max_length: int, source: str) -> list[TestItem]:
    """Render rows into test items; refuse data with no assistant turn to score."""
    items = []
    for row in rows:
        prompt, reference = split_prompt_reference(row["messages"])
        ex = render_example(tokenizer, row["messages"], max_length)
        answer = row.get("answer")
        items.append(TestItem(ex, prompt, reference, None if answer is None else str(answer)))
    if not any(it.example is not None for it in items):
        raise UserError(
            f"{source}: no conversation has an assistant turn to score (within max_length="
            f"{max_length}); eval needs reference answers: rows ending with an assistant turn, "
            "or prompt/completion rows"
        )
    return items


def weights_size(path: str | Path) -> int:
    """Bytes of weight files (safetensors, bin, ...) directly in a model directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def _names(paths: list[str]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Scoring and answering
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def score(
    model, examples: list[Example], batch_size: int, pad_id: int, teacher=None, vocab_size=None
) -> metrics.TokenSums:
    """Token-weighted CE of `model` on the examples' assistant tokens; with `teacher`, also
    KL(teacher||model) and top-1 agreement on the same tokens. Batches are length-sorted so
    padding stays small."""
    sums = metrics.TokenSums()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[b : b + batch_size]], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        t_logits = None
        if teacher is not None:
            t_dev = next(teacher.parameters()).device
            t_logits = teacher(input_ids=ids.to(t_dev), attention_mask=mask.to(t_dev)).logits
            t_logits = t_logits.to(device)
        sums.add(metrics.token_scores(logits, batch["labels"].to(device), t_logits, vocab_size))
    return sums


def _prompt_ids(engine, messages: list[dict], budget: int) -> list[int]:
    """Chat-template ids, keeping the most recent tokens when the context would overflow."""
    ids = render_prompt(engine.tokenizer, messages)
    room = max(1, engine.context_length - budget)
    return ids[-room:]


def answer_all(engine, prompts: list[list[dict]], cfg: EvalConfig) -> list[str]:
    """Greedy answers to every prompt."""
    from chatdistill.inference.engine import SamplingParams

    ids = [_prompt_ids(engine, p, cfg.max_new_tokens) for p in prompts]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return [c.text.strip() for c in engine.generate(ids, params, batch_size=cfg.batch_size)]


def text_quality(answers: list[str], items: list[TestItem]) -> dict:
    """ROUGE-L and chrF against references, accuracy against `answer` fields (None if absent)."""
    refs = [(a, it.reference) for a, it in zip(answers, items, strict=True) if it.reference]
    keyed = [(a, it.answer) for a, it in zip(answers, items, strict=True) if it.answer is not None]
    preds, golds = [a for a, _ in refs], [r for _, r in refs]
    return {
        "rouge_l": metrics.mean_rouge_l(preds, golds) if refs else None,
        "chrf": metrics.chrf(preds, golds) if refs else None,
        "accuracy": metrics.answer_accuracy(*zip(*keyed, strict=True)) if keyed else None,
    }


# ---------------------------------------------------------------------------------------------
# Speed and memory probes
# ---------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speed_probe(engine, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> dict:
    """Prefill tokens/s and time to first token (batch 1), decode tokens/s at batch 1 and 8.

    End-of-sequence is switched off for the probe so every model decodes `new_tokens` tokens and
    the rates compare like for like. Decode rate = tokens after the first / time after the first.
    The probe runs `repeats` times and keeps each figure's best: other load on the machine only
    ever slows a pass down, and one slow spell would otherwise decide a model's figure.
    """
    from chatdistill.inference.engine import SamplingParams

    device = next(engine.model.parameters()).device
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        engine.generate([prompts[0]], SamplingParams(max_new_tokens=2), batch_size=1)  # warm-up
        passes = [_speed_pass(engine, prompts, new_tokens, device) for _ in range(repeats)]
    finally:
        engine.eos_token_ids = saved
    best = {}
    for key in passes[0]:
        values = [p[key] for p in passes if p[key] is not None]
        pick = min if key == "time_to_first_token_s" else max
        best[key] = pick(values) if values else None
    return best


def _speed_pass(engine, prompts: list[list[int]], new_tokens: int, device) -> dict:
    from chatdistill.inference.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    ttft, prefill_tok, decode_tok, decode_s = [], 0, 0, 0.0
    for p in prompts:
        (c,) = engine.generate([p], params, batch_size=1)
        ttft.append(c.time_to_first_token_s)
        prefill_tok += len(c.prompt_ids)
        decode_tok += max(0, len(c.token_ids) - 1)
        decode_s += c.elapsed_s - c.time_to_first_token_s
    batch8 = (prompts * 8)[:8]

    def timed(p: SamplingParams) -> tuple[float, list]:
        _sync(device)
        start = time.perf_counter()
        out = engine.generate(batch8, p, batch_size=8)
        _sync(device)
        return time.perf_counter() - start, out

    # The batch decodes for its wall time minus its prefills, timed alone (one token each).
    b8_prefill, _ = timed(SamplingParams(max_new_tokens=1, temperature=0.0))
    wall, done = timed(params)
    b8_tok = sum(max(0, len(c.token_ids) - 1) for c in done)
    return {
        "prefill_tokens_per_s": prefill_tok / sum(ttft) if sum(ttft) > 0 else None,
        "decode_tokens_per_s_batch1": decode_tok / decode_s if decode_s > 0 else None,
        "decode_tokens_per_s_batch8": b8_tok / (wall - b8_prefill) if wall > b8_prefill else None,
        "time_to_first_token_s": statistics.median(ttft),
    }


def draft_probe(
    engine, draft: str, draft_tokens: int, prompts: list[list[int]], new_tokens: int
) -> dict:
    """The engine's speed with a speculative `draft` attached (`speed_probe` figures), the draft's
    acceptance rate, and how many greedy answers to `prompts` (batch 1, where speculation runs)
    stay identical to the engine's alone. The draft is detached afterwards."""
    from chatdistill.inference.engine import SamplingParams
    from chatdistill.inference.speculative import load_draft

    greedy = SamplingParams(max_new_tokens=new_tokens)
    alone = engine.generate(prompts, greedy, batch_size=1)
    attached = load_draft(engine, draft, draft_tokens)
    try:
        drafted = engine.generate(prompts, greedy, batch_size=1)
        speed = speed_probe(engine, prompts, new_tokens)
    finally:
        engine.draft = None
    return {
        "draft": draft,
        "draft_tokens": draft_tokens,
        **speed,
        "acceptance_rate": attached.acceptance_rate,
        "identical_greedy_answers": sum(
            a.token_ids == b.token_ids for a, b in zip(alone, drafted, strict=True)
        ),
        "answers_compared": len(prompts),
    }


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(spec_path: str) -> None:
    """Run in a fresh interpreter: load one model, generate, print peak memory as JSON."""
    import resource

    from chatdistill.inference.engine import Engine, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    before_kb = _status_kb("VmRSS") or 0
    engine = Engine.load(spec["path"], device=spec["device"], dtype=torch_dtype(spec["dtype"]))
    prompts, batch_size = spec["prompts"], spec["batch_size"]
    params = SamplingParams(max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    # Warm-up first: lazily loaded kernels and libraries are not the model's memory.
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), batch_size=1)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        engine.generate(prompts, params, batch_size=batch_size)
        peak, method = torch.cuda.max_memory_allocated() / 2**20, "cuda-max-allocated"
    elif (rss_kb := _status_kb("VmRSS")) is not None and _reset_peak_rss():
        engine.generate(prompts, params, batch_size=batch_size)
        tensors = {id(t): t for t in [*engine.model.parameters(), *engine.model.buffers()]}
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        peak = weights / 2**20 + ((_status_kb("VmHWM") or rss_kb) - rss_kb) / 1024
        method = "rss-hwm"
    else:
        engine.generate(prompts, params, batch_size=batch_size)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, method = (peak_kb - before_kb) / 1024, "ru-maxrss"
    print(json.dumps({"peak_memory_mb": peak, "method": method}))


MEMORY_METHODS = {
    "cuda-max-allocated": "torch.cuda.max_memory_allocated while generating at --batch-size "
    "(weights, KV cache, activations), after a warm-up, in a fresh process per model",
    "rss-hwm": "weight bytes plus the growth of the resident-set high-water mark while generating "
    "at --batch-size (KV cache, activations), after a warm-up, in a fresh process per model",
    "ru-maxrss": "peak RSS of a fresh process per model minus its RSS before loading (includes "
    "the loading peak and libraries: an upper bound)",
}


def memory_probe(path: str, prompts: list[list[int]], cfg: EvalConfig) -> tuple[float, str]:
    """Peak memory (MB) of one model generating greedy answers to `prompts` at --batch-size,
    measured in a fresh subprocess so models measured earlier do not count."""
    spec = {
        "path": path,
        "prompts": prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    code = (
        "import sys; from chatdistill.evaluate.run import _memory_child; _memory_child(sys.argv[1])"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, f.name], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {path} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_memory_mb"], out["method"]


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def _free(engine) -> None:
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pad_id(tokenizer) -> int:
    """The id scoring pads batches with: the tokenizer's pad, else its end of sequence, else 0."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _evaluate_one(engine, items, cfg, teacher=None, vocab=None, teacher_answers=None) -> tuple:
    """Quality, fidelity and cost of one loaded model; returns (entry fields, answers)."""
    from chatdistill.models import count_parameters

    examples = [it.example for it in items if it.example is not None]
    sums = score(engine.model, examples, cfg.batch_size, pad_id(engine.tokenizer), teacher, vocab)
    answers = answer_all(engine, [it.prompt for it in items], cfg)
    quality = {
        "ce": sums.ce,
        "perplexity": metrics.perplexity(sums.ce),
        **text_quality(answers, items),
    }
    fidelity = None
    if teacher is not None:
        fidelity = {
            "kl": sums.kl_mean,
            "top1_agreement": sums.agreement,
            "rouge_l_vs_teacher": metrics.mean_rouge_l(answers, teacher_answers),
        }
    speed_ids = [_prompt_ids(engine, it.prompt, cfg.speed_new_tokens) for it in items]
    cost = {
        "parameters": count_parameters(engine.model),
        **speed_probe(engine, speed_ids[: cfg.speed_prompts], cfg.speed_new_tokens),
    }
    return {"quality": quality, "fidelity": fidelity}, cost, answers, sums.tokens


def _kept(entry: dict, teacher: dict, baseline: dict | None) -> dict:
    out = {}
    for k in QUALITY_KEYS:
        s, t = entry["quality"][k], teacher["quality"][k]
        if s is None or t is None:
            out[k] = None
        elif baseline is not None:
            b = baseline["quality"][k]
            out[k] = None if b is None else metrics.gap_closed(s, t, b)
        else:
            out[k] = metrics.percent_kept(s, t, higher_is_better=k not in LOWER_IS_BETTER)
    return out


def _recipe(student_dir: str) -> dict:
    """The trainer's resolved recipe saved beside the student, if there is one."""
    import yaml

    p = Path(student_dir) / "chatdistill_config.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def evaluate(cfg: EvalConfig, say: Callable[[str], None] | None = None) -> dict:
    """Evaluate teacher, students and baseline; write results.json, summary.md, report.html and
    the students' model cards into cfg.output; return the results dict. `say` gets progress
    lines."""
    from chatdistill.evaluate import report
    from chatdistill.inference.engine import Engine
    from chatdistill.models import check_vocab, load_tokenizer

    roles = [("teacher", cfg.teacher, "--teacher")]
    roles += [("student", s, "--student") for s in cfg.students]
    roles += [("baseline", cfg.baseline, "--baseline")] if cfg.baseline else []
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
    for _, path, flag in roles:
        _check_model_dir(path, flag)
    if not cfg.students:
        raise UserError("eval: pass at least one --student DIR to compare with the teacher")
    for p in cfg.metrics_jsonl:
        if not Path(p).is_file():
            raise UserError(f"--metrics-jsonl {p}: file not found")
    rows = load_rows(cfg.data)[: cfg.max_samples]
    say = say or (lambda _msg: None)
    # Tokenizers first: a mismatched student fails in seconds, before any model runs.
    teacher_tok = load_tokenizer(cfg.teacher, "--teacher")
    drafts = [(cfg.draft, "--draft")] if cfg.draft else []
    for path, flag in [(p, f) for _, p, f in roles[1:]] + drafts:
        try:
            check_vocab(teacher_tok, load_tokenizer(path, flag))
        except UserError as e:
            raise UserError(f"{flag} {path}: {e}") from None

    dtype = torch_dtype(cfg.dtype)
    teacher = Engine.load(cfg.teacher, device=cfg.device, dtype=dtype)
    items = prepare_items(
        rows, teacher.tokenizer, min(cfg.max_length, teacher.context_length), cfg.data
    )
    names = _names([p for _, p, _ in roles])
    entries, answers = [], {}
    for (role, path, _), name in zip(roles, names, strict=True):
        say(f"evaluating {role} {name} ...")
        if role == "teacher":
            fields, cost, ans, scored_tokens = _evaluate_one(teacher, items, cfg)
        else:
            engine = Engine.load(path, device=cfg.device, dtype=dtype)
            vocab = check_vocab(teacher.tokenizer, engine.tokenizer, teacher.model, engine.model)
            fields, cost, ans, _ = _evaluate_one(
                engine, items, cfg, teacher.model, vocab, answers[names[0]]
            )
            _free(engine)
        cost["size_on_disk_bytes"] = weights_size(path)
        entries.append({"name": name, "role": role, "path": str(path), **fields, "cost": cost})
        answers[name] = ans
    speculative = None
    if cfg.draft:
        say(f"timing the teacher with --draft {cfg.draft} ...")
        speed_ids = [
            _prompt_ids(teacher, it.prompt, cfg.speed_new_tokens)
            for it in items[: cfg.speed_prompts]
        ]
        speculative = draft_probe(
            teacher, cfg.draft, cfg.draft_tokens, speed_ids, cfg.speed_new_tokens
        )
        alone = entries[0]["cost"]["decode_tokens_per_s_batch1"]
        spec = speculative["decode_tokens_per_s_batch1"]
        speculative["teacher_decode_tokens_per_s_batch1"] = alone
        speculative["speedup"] = spec / alone if spec and alone else None
    device = str(next(teacher.model.parameters()).device)
    _free(teacher)

    method = "not measured (--no-memory)"
    for e in entries:
        e["cost"]["peak_memory_mb"] = None
    if cfg.memory:
        say(f"measuring peak memory of {', '.join(e['name'] for e in entries)} ...")
        probes = []
        for e in entries:
            tok = load_tokenizer(e["path"])
            prompt_ids = [render_prompt(tok, it.prompt) for it in items[: cfg.batch_size]]
            probes.append((e["path"], prompt_ids))
        # One fresh process per model; they share nothing, so run as many at once as there are
        # cores (their start-up, mostly importing torch, is most of the time).
        with ThreadPoolExecutor(max_workers=max(1, min(len(probes), os.cpu_count() or 1))) as pool:
            measured = list(pool.map(lambda probe: memory_probe(*probe, cfg), probes))
        for e, (peak, key) in zip(entries, measured, strict=True):
            e["cost"]["peak_memory_mb"], method = peak, MEMORY_METHODS[key]

    by_role = {e["role"]: e for e in entries}
    for e in entries:
        e["kept"] = (
            None
            if e["role"] != "student"
            else _kept(e, by_role["teacher"], by_role.get("baseline"))
        )

    logs = {e["name"]: str(Path(e["path"]) / "metrics.jsonl") for e in entries}
    logs = {n: p for n, p in logs.items() if Path(p).is_file()}
    logs.update({Path(p).parent.name or p: str(p) for p in cfg.metrics_jsonl})
    samples = [
        {
            "messages": it.prompt,
            "reference": it.reference,
            "answers": {n: a[i] for n, a in answers.items()},
        }
        for i, it in enumerate(items[: cfg.num_samples])
    ]
    results = {
        "schema": "chatdistill.eval/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "path": str(cfg.data),
            "conversations": len(items),
            "scored_tokens": scored_tokens,
            "with_reference": sum(it.reference is not None for it in items),
            "with_answer": sum(it.answer is not None for it in items),
        },
        "settings": {**asdict(cfg), "device": device, "memory_method": method},
        "kept_mode": "gap_closed" if cfg.baseline else "ratio",
        "models": entries,
        "speculative": speculative,
        "samples": samples,
        "training_logs": logs,
    }
    report.write_reports(results, cfg.output)
    if cfg.model_cards:
        for e in entries:
            if e["role"] == "student":
                report.write_model_card(e["path"], results, _recipe(e["path"]))
    return results
