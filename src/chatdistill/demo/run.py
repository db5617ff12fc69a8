"""`chatdistill demo`: a task-adapted pretrained chat model distilled into a student cut from it.

The situation it plays: a team adapted SmolLM2-135M-Instruct to its support desk (the shipped
LoRA adapter, made by `scripts/train_teacher_adapter.py`), has many real user questions without
answers (the train prompts) and a small set of human-written answers (`labelled_fraction` of
them). Support questions come with the shop's notes in the system prompt (`demo.grounding`).
Stages, each reused on a rerun:

1. data: prompts, the labelled subset, validation and test, written to OUTPUT/data;
2. teacher answers to every prompt (greedy; sequence-level KD data, `generate-data`);
3. teacher cache: top-k log-probs of the teacher on its answers and the labelled rows;
4. the student cut: `student_layers` of the teacher's layers, one contiguous block removed (the
   one whose removal changes the teacher's outputs least), and the KD student, that cut trained
   from the cache on CE mixed with forward KL (`kd_recipe`);
5. baselines: (a) the same cut with no training, (b) the same cut trained with SFT on the
   labelled rows for the same steps;
6. evaluation of all four on the test split (fidelity on the teacher's own answers):
   results.json, summary.md, report.html.

Stages are reused by what they were made from, not where (`demo.stages`): a moved run directory
is still the same run.
"""

import itertools
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chatdistill import atomic
from chatdistill.data import load_rows, render_prompt
from chatdistill.demo.data import demo_asset_dir, jsonl_text, labelled_subset, to_prompts
from chatdistill.demo.grounding import ground_row
from chatdistill.demo.stages import eval_stage, train_stages
from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.errors import Interrupted, UserError
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.report import headline, text_table
from chatdistill.evaluate.result import EvalResult
from chatdistill.hashing import file_sha256
from chatdistill.models import fast_bf16, load_tokenizer, resolve

TEACHER_ADAPTER = "teacher_adapter"
MAX_LENGTH = 320
ANSWER_TOKENS = 64  # the teacher's answers to the prompts
EVAL_TOKENS = 48  # answers at evaluation: a support answer takes 10-25 tokens


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    teacher: str | None = None
    """teacher (a model directory, a GGUF file, or a peft adapter directory whose config names
    its base); None = SmolLM2-135M-Instruct with the shipped support-desk adapter"""
    student_layers: int = 10
    """teacher layers the student keeps: the first few and the last ones, the block between
    removed (the block whose removal changes the teacher least, `models.block_cut`)"""
    prompts: int | None = 1000
    """train prompts the teacher answers (the first N of the shuffled split); None = all"""
    support_share: float | None = 0.7
    """share of the prompts that are support-desk questions, the rest small talk (taken in the
    split's order): the desk's traffic as the test split samples it, two support questions per
    small-talk turn. None = the train split's own mix (44% support)"""
    labelled_fraction: float = 0.1
    """share of the prompts whose human answers the demo may use"""
    seed: int = 0
    steps: int = 600
    """optimizer steps for the KD student and for the SFT baseline (same budget)"""
    batch_size: int = 4
    """conversations per step: at a fixed budget of conversations, more and smaller steps healed
    the cut far better (bench/demo_recipes.py: 61.7% accuracy at 4 per step vs 13.6% at 16)"""
    lr: float = 1.5e-3
    freeze_embeddings: bool = True
    """keep the teacher's token embeddings (and tied head): 1.4x faster steps, lower CE"""
    temperature: float = 1.0
    ce_weight: float = 0.5
    """CE on the teacher's answers and the labelled rows vs forward KL to its log-probs; 1 = CE
    only (sequence-level KD, no cache). 0.75 won at seed 0 and lost over three seeds (77.4% vs
    79.8% mean accuracy, bench/demo_seeds.py --ce-weight)"""
    divergence: str = "fkl"
    """the KD term against the cached teacher log-probs (any `--loss` but sft)"""
    top_k: int = 64
    eval_samples: int = 120
    """test conversations evaluated (from the start of the shuffled test split)"""
    validation_rows: int = 100


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file alone (so later stages stay reusable)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic.write_text(path, text)


def teacher_arg(cfg: DemoConfig) -> str:
    """The teacher as every command takes it: the shipped adapter directory (its config names
    the SmolLM2 GGUF base) unless the user gave one."""
    if cfg.teacher is not None:
        return cfg.teacher
    adapter = demo_asset_dir() / TEACHER_ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"bundled teacher adapter missing: {adapter}; reinstall chatdistill (or make it: "
            "python scripts/train_teacher_adapter.py)"
        )
    return str(adapter)


def _fits(tokenizer, row: dict) -> bool:
    """The conversation, and its prompt plus an answer budget, fit in MAX_LENGTH tokens."""
    prompt = render_prompt(tokenizer, to_prompts([row])[0]["messages"])
    full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    return len(prompt) + ANSWER_TOKENS <= MAX_LENGTH and len(full) <= MAX_LENGTH


def _fitting(name: str, tokenizer) -> Iterator[dict]:
    """The split's grounded rows that fit, in order, each checked only when it is reached."""
    rows = load_rows(demo_asset_dir() / f"{name}.jsonl")
    return (r for r in map(ground_row, rows) if _fits(tokenizer, r))


def _split(name: str, tokenizer, limit: int | None = None) -> list[dict]:
    return list(itertools.islice(_fitting(name, tokenizer), limit))


def mix_rows(rows: Iterable[dict], n: int, support_share: float) -> list[dict]:
    """The first rows of `rows`, in order, until n * support_share support rows and the rest
    of n other rows are taken (fewer where a kind runs out); reads no further than that."""
    want = {True: round(support_share * n)}
    want[False] = n - want[True]
    taken = {True: 0, False: 0}
    out = []
    for row in rows:
        kind = row.get("source") == "support"
        if taken[kind] < want[kind]:
            taken[kind] += 1
            out.append(row)
            if len(out) == n:
                break
    return out


def prepare_data(cfg: DemoConfig, tokenizer) -> dict[str, Path]:
    """Write the demo's data files (grounded support rows and small talk); return their paths."""
    if cfg.prompts is not None and cfg.prompts < 1:
        raise UserError(f"prompts={cfg.prompts}: must be at least 1")
    data = Path(cfg.output) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if cfg.prompts is None or cfg.support_share is None:
        train = _split("train", tokenizer, cfg.prompts)
    else:
        train = mix_rows(_fitting("train", tokenizer), cfg.prompts, cfg.support_share)
    labelled = labelled_subset(train, cfg.labelled_fraction, cfg.seed)
    paths = {name: data / f"{name}.jsonl" for name in ("labelled", "prompts", "validation", "test")}
    _write_if_changed(paths["labelled"], jsonl_text(labelled))
    _write_if_changed(paths["prompts"], jsonl_text(to_prompts(train)))
    validation = _split("validation", tokenizer, cfg.validation_rows)
    _write_if_changed(paths["validation"], jsonl_text(validation))
    _write_if_changed(paths["test"], jsonl_text(_split("test", tokenizer)))
    return paths


def _common(cfg: DemoConfig, paths: dict, teacher: str, layers: list[int]) -> dict:
    return {
        "teacher": teacher,
        "student_layers": layers,
        "data.validation": str(paths["validation"]),
        "data.max_length": MAX_LENGTH,
        "train.max_steps": cfg.steps,
        "train.batch_size": cfg.batch_size,
        "train.lr": cfg.lr,
        "train.weight_decay": 0.01,
        "train.warmup_steps": max(1, cfg.steps // 20),
        "train.min_lr_ratio": 0.1,
        "train.freeze_embeddings": cfg.freeze_embeddings,
        "train.eval_every": 0,
        "train.save_every": 100,
        "train.log_every": 5,
        "train.seed": cfg.seed,
        # bf16 matrix multiplies where they are faster here (master weights stay float32).
        "train.precision": "bf16" if fast_bf16() else "fp32",
    }


def run_demo(cfg: DemoConfig, say=print) -> EvalResult:
    """Run every stage (reusing finished ones); return the evaluation results. Stage lines are
    stamped with the time since the start."""
    started = time.monotonic()

    def stamped(msg: str) -> None:
        elapsed = int(time.monotonic() - started)
        say(f"{elapsed // 60:2d}:{elapsed % 60:02d} {msg}" if msg.startswith("[") else msg)

    try:
        results = _run(cfg, stamped)
        stamped("[done]")
        return results
    except KeyboardInterrupt:
        stamped(
            "[interrupted] rerun the same command to continue: finished stages are reused and "
            "an interrupted training resumes from its last checkpoint"
        )
        raise Interrupted from None


@dataclass
class KDInputs:
    """What every student of the demo trains from: data files, the teacher, the layers the cut
    keeps, its answers (as chat rows, with the labelled rows) and, for recipes that use its
    logits, its cache."""

    paths: dict[str, Path]
    teacher: str
    layers: list[int]
    kd_data: Path
    cache: Path | None
    common: dict


def cut_student_layers(teacher: str, keep: int, validation: Path, out: Path, say) -> list[int]:
    """The layers the student keeps (`models.block_cut` on 16 validation rows, the contiguous
    block whose removal changes the teacher least), and baseline (a), that cut saved untrained.
    Reused while the teacher and `keep` are unchanged."""
    from chatdistill.data import build_dataset, collate
    from chatdistill.models import block_cut, cut_student, load_pretrained

    model_dir = out / "baseline_cut_untrained"
    stamp = model_dir / "cut.json"
    asked = {
        "teacher": teacher_fingerprint(teacher),
        "keep": keep,
        "validation": file_sha256(validation),
    }
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in asked} == asked:
            say(f"[student cut] reusing layers {done['layers']} ({model_dir})")
            return done["layers"]
    model, tokenizer, _ = load_pretrained(teacher, "teacher")
    rows = load_rows(validation)[:16]
    batch = collate(build_dataset(rows, tokenizer, MAX_LENGTH, str(validation)).examples,
                    tokenizer.pad_token_id)  # fmt: skip
    layers = block_cut(model, keep, batch)
    n = model.config.get_text_config().num_hidden_layers
    say(f"[student cut] keeping layers {layers} of {n}: the block whose removal changes the "
        "teacher's next-token distributions least; (a) is this cut, untrained")  # fmt: skip
    shutil.rmtree(model_dir, ignore_errors=True)
    cut_student(model, layers).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    atomic.write_text(stamp, json.dumps({**asked, "layers": layers}))
    return layers


def prepare_kd_inputs(cfg: DemoConfig, say) -> KDInputs:
    """Stages 1-4: data, the teacher's answers to every prompt, its cache and the student cut
    (each reused while its inputs are unchanged)."""
    from chatdistill.distill.cache import write_cache
    from chatdistill.distill.teacher_answers import generate_data

    if not 0 < cfg.labelled_fraction <= 1:
        raise UserError(f"labelled fraction {cfg.labelled_fraction} is outside (0, 1]; use 0.1")
    if cfg.support_share is not None and not 0 <= cfg.support_share <= 1:
        raise UserError(f"support share {cfg.support_share} is outside [0, 1]; use e.g. 0.7")
    teacher = teacher_arg(cfg)
    source = resolve(teacher, "teacher")
    base = source.gguf.get("file", source.path)
    say(f"[teacher] {base}" + (f" with the adapter {source.adapter}" if source.adapter else ""))
    out = Path(cfg.output)
    paths = prepare_data(cfg, load_tokenizer(source, "teacher"))
    n_labelled = sum(1 for _ in paths["labelled"].open())
    n_prompts = sum(1 for _ in paths["prompts"].open())
    say(
        f"[data] {n_prompts} prompts; {n_labelled} of them with human answers "
        f"({cfg.labelled_fraction:.0%}); conversations over {MAX_LENGTH} tokens left out"
    )

    answers = out / "data" / "teacher_answers.jsonl"
    say("[teacher answers] the teacher answers every prompt (greedy)")
    # bf16 where it is faster here: measured 1.1e-3 nats/token of KL from float32 at 135M.
    # Greedy answers draw nothing at random: one seed for all, so every seed's run can share them.
    precision = "bf16" if fast_bf16() else "auto"
    generate_data(source, str(paths["prompts"]), str(answers), max_new_tokens=ANSWER_TOKENS,
                  batch_size=32, seed=0, precision=precision,
                  replace_stale=True)  # fmt: skip
    kd_data = out / "data" / "kd_train.jsonl"
    kd_rows = load_rows(answers) + load_rows(paths["labelled"])
    _write_if_changed(kd_data, jsonl_text(kd_rows))

    cache = None
    if cfg.ce_weight < 1:
        cache = out / f"teacher_cache_t{cfg.temperature:g}_k{cfg.top_k}"
        say(f"[teacher cache] top-{cfg.top_k} log-probs at temperature {cfg.temperature:g}")
        write_cache(source, str(kd_data), str(cache), top_k=cfg.top_k,
                    temperature=cfg.temperature, max_length=MAX_LENGTH, batch_size=16,
                    precision=precision, replace_stale=True)  # fmt: skip
    layers = cut_student_layers(teacher, cfg.student_layers, paths["validation"], out, say)
    common = _common(cfg, paths, teacher, layers)
    return KDInputs(paths, teacher, layers, kd_data, cache, common)


def kd_recipe(cfg: DemoConfig, inputs: KDInputs) -> dict:
    """The KD student's overrides: CE on the teacher's answers and the labelled rows, mixed with
    a divergence (forward KL by default) to the cached teacher log-probs (or CE alone,
    sequence-level KD, at ce_weight 1)."""
    recipe = {**inputs.common, "data.train": str(inputs.kd_data)}
    if inputs.cache is None:
        return {**recipe, "loss.kind": "sft"}
    return {**recipe, "teacher_cache": str(inputs.cache), "loss.kind": cfg.divergence,
            "loss.temperature": cfg.temperature, "loss.ce_weight": cfg.ce_weight}  # fmt: skip


def summary(results: EvalResult) -> str:
    """The side-by-side table the demo ends with, and what its columns mean."""
    return (
        text_table(*headline(results))
        + "\nparams and speed (decode tokens/s at batch 1) as a multiple of the teacher's; "
        "held-out CE on the human test answers;\naccuracy: the test answer's fact stated; "
        "kept: accuracy as a share of the teacher's;\nagree and KL: top-1 agreement with the "
        "teacher and KL(teacher||model) on the teacher's own answers to the test prompts.\n"
        "(a) baseline_cut_untrained: the student's starting point, no training; "
        "(b) baseline_sft_labelled: the same cut, SFT on the labelled rows, same steps."
        + "".join(
            f"\n{m.name}: speed and memory measured on {m.cost.same_shape_as} (same shape)"
            for m in results.models
            if m.cost.same_shape_as
        )
    )


def _run(cfg: DemoConfig, say) -> EvalResult:
    inputs = prepare_kd_inputs(cfg, say)
    out, paths, common = Path(cfg.output), inputs.paths, inputs.common
    sft_recipe = {**common, "data.train": str(paths["labelled"]), "loss.kind": "sft"}
    kd, sft = train_stages(
        [("kd_student", kd_recipe(cfg, inputs)), ("baseline_sft_labelled", sft_recipe)], out, say
    )
    cut = out / "baseline_cut_untrained"
    results = eval_stage(
        EvalConfig(
            teacher=inputs.teacher,
            students=[str(kd), str(cut), str(sft)],
            names=["teacher", kd.name, cut.name, sft.name],
            data=str(paths["test"]),
            output=str(out),
            max_samples=cfg.eval_samples,
            max_new_tokens=EVAL_TOKENS,
            batch_size=32,
            max_length=MAX_LENGTH,
            fidelity_on="teacher",
        ),
        say,
    )
    say("\n" + summary(results))
    say(
        f"\nreport: {out / 'report.html'}\n"
        f"chat with the student:  chatdistill chat {kd}\n"
        f"serve it (OpenAI API + web page):  chatdistill serve {kd}\n"
        f"serve the teacher with the student as its speculative draft:  chatdistill serve "
        f"{inputs.teacher} --draft {kd}\n"
        f"export it for edge runtimes (ONNX, int4):  chatdistill export {kd} "
        f"--output {out / 'kd_student_onnx'} --prompts {paths['test']}"
        f"\nor for llama.cpp and Ollama (GGUF, q8_0):  chatdistill export {kd} --format gguf "
        f"--output {out / 'kd_student_gguf'} --prompts {paths['test']}"
        f"\nthe cheapest draft on a CPU, its 4-bit GGUF in llama.cpp (pip install "
        f"llama-cpp-python):  chatdistill export {kd} --format gguf --precision q4_0 "
        f"--output {out / 'kd_student_q4_0'} && chatdistill serve {inputs.teacher} --draft "
        f"{out / 'kd_student_q4_0' / 'model.gguf'} --draft-runtime llama.cpp"
    )
    return results
