"""`chatdistill demo`: the whole promise on the bundled data, offline, on a CPU, in minutes.

The situation it plays: a capable teacher (bundled, trained on all labelled support and small-talk
rows), plenty of real user questions without answers (the train prompts), and only a small set of
human-written answers (`labelled_fraction` of the train rows). Stages, each reused on a rerun:

1. data: the labelled subset and the prompt set, written to OUTPUT/data;
2. teacher answers to every prompt (sequence-level KD data, `generate-data`);
3. teacher cache: top-k log-probs of the teacher on teacher answers + labelled rows;
4. the KD student, trained from the cache on 0.8 x CE + 0.2 x forward KL at T = 1 (`kd_recipe`);
5. baselines of the same shape and step budget: (a) SFT on the labelled subset only, (b) SFT on
   all labelled rows the teacher saw;
6. evaluation of all four on the test split: results.json, summary.md, report.html.
"""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig

from chatdistill import atomic
from chatdistill.data import load_rows, render_prompt
from chatdistill.demo.data import demo_asset_dir, jsonl_text, labelled_subset, to_prompts
from chatdistill.errors import Interrupted, UserError
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.report import headline, text_table
from chatdistill.evaluate.result import EvalResult
from chatdistill.evaluate.run import evaluate

# 0.24x the teacher's parameters in one layer of the teacher's width: at batch 1 on a CPU a decode
# step of a model this small is mostly per-layer and per-call work, so one layer decodes 4-6x
# faster than the teacher's eight, where two layers of 192 (as many parameters, as accurate)
# reached only 2.9x on some CPUs. Heads of 32 dimensions: ONNX Runtime GenAI's attention needs a
# multiple of 16 (for the export).
STUDENT_SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=704,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    labelled_fraction: float = 0.1
    """share of the train rows whose human answers the demo may use"""
    seed: int = 0
    steps: int = 1200
    """optimizer steps for the KD student and for each baseline (same budget)"""
    batch_size: int = 32
    temperature: float = 1.0
    ce_weight: float = 0.8
    """CE on the teacher's answers and the labelled rows vs forward KL to its logits; 1 = CE only
    (sequence-level KD, no cache). bench/demo_recipes.py compares the recipes."""
    divergence: str = "fkl"
    """the KD term against the cached teacher log-probs (any `--loss` but sft)"""
    top_k: int = 32
    eval_samples: int = 200
    """test conversations evaluated (from the start of the shuffled test split)"""
    train_rows: int | None = None
    """use only the first N train rows (quick runs); None = all"""
    teacher: str | None = None
    """teacher model dir sharing the demo tokenizer; None = the bundled one"""


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file alone (so later stages stay reusable)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic.write_text(path, text)


def _assets(cfg: DemoConfig) -> Path:
    assets = demo_asset_dir()
    needs = ["train.jsonl", "test.jsonl", "validation.jsonl"]
    if cfg.teacher is None:
        needs.append("teacher/model.safetensors")
    elif not (Path(cfg.teacher) / "config.json").is_file():
        raise UserError(f"teacher {cfg.teacher}: no config.json there")
    for need in needs:
        if not (assets / need).is_file():
            raise UserError(
                f"bundled demo file missing: {assets / need}; reinstall chatdistill "
                "(or rebuild it: scripts/build_demo_data.py, scripts/train_demo_teacher.py)"
            )
    return assets


MAX_LENGTH = 256
ANSWER_TOKENS = 48


def _fits(tokenizer, row: dict) -> bool:
    """The conversation, and its prompt plus an answer budget, fit in MAX_LENGTH tokens."""
    prompt = render_prompt(tokenizer, to_prompts([row])[0]["messages"])
    full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    return len(prompt) + ANSWER_TOKENS <= MAX_LENGTH and len(full) <= MAX_LENGTH


def prepare_data(cfg: DemoConfig, assets: Path, tokenizer) -> dict[str, Path]:
    """Write the demo's data files; return their paths."""
    data = Path(cfg.output) / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = load_rows(assets / "train.jsonl")[: cfg.train_rows]
    train = [r for r in rows if _fits(tokenizer, r)]
    labelled = labelled_subset(train, cfg.labelled_fraction, cfg.seed)
    paths = {
        "labelled": data / "labelled.jsonl",
        "prompts": data / "prompts.jsonl",
        "all_labelled": data / "all_labelled.jsonl",
        "validation": assets / "validation.jsonl",
        "test": assets / "test.jsonl",
    }
    _write_if_changed(paths["labelled"], jsonl_text(labelled))
    _write_if_changed(paths["prompts"], jsonl_text(to_prompts(train)))
    _write_if_changed(paths["all_labelled"], jsonl_text(train))
    return paths


def _student_config(out: Path, tokenizer_dir: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **STUDENT_SHAPE,
    )
    path = out / "student_config.json"
    _write_if_changed(path, json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return path


def _done(model_dir: Path) -> bool:
    return (model_dir / "train_summary.json").is_file() and (
        model_dir / "model.safetensors"
    ).exists()


def _train(name: str, out: Path, overrides: dict, say) -> Path:
    """Run one training stage, or reuse/resume it when it was made with the same settings."""
    import yaml

    from chatdistill.config import load_distill_config
    from chatdistill.distill.train import train

    model_dir = out / name
    cfg = load_distill_config(None, {**overrides, "output": str(model_dir)})
    saved = model_dir / "chatdistill_config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != cfg.model_dump():
        say(f"[{name}] settings changed since the last run; training it again")
        shutil.rmtree(model_dir)
    if _done(model_dir):
        say(f"[{name}] reusing {model_dir}")
        return model_dir
    say(f"[{name}] training")
    out_dir = train(cfg, resume=(model_dir / "checkpoints").is_dir())
    # Checkpoints only serve a resume; a finished stage is reused from its final model.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir


def _common(cfg: DemoConfig, paths: dict, student_config: Path, teacher: Path) -> dict:
    return {
        "student_config": str(student_config),
        "tokenizer": str(teacher),
        "data.validation": str(paths["validation"]),
        "data.max_length": MAX_LENGTH,
        # A 256-wide student over a 4k vocabulary: whole-batch chunks cost little memory and
        # save the per-chunk overhead that dominates at this size (~10% of the demo's time).
        "loss.chunk_size": 2048,
        "train.max_steps": cfg.steps,
        "train.batch_size": cfg.batch_size,
        "train.lr": 3e-3,
        "train.weight_decay": 0.01,
        "train.warmup_steps": 30,
        "train.min_lr_ratio": 0.05,
        "train.eval_every": 0,
        "train.save_every": 100,
        "train.log_every": 20,
        "train.seed": cfg.seed,
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
    """What every student of the demo trains from: data files, the teacher, its answers (as
    chat rows, with the labelled rows) and, for recipes that use its logits, its cache."""

    paths: dict[str, Path]
    teacher: Path
    kd_data: Path
    cache: Path | None
    common: dict


def prepare_kd_inputs(cfg: DemoConfig, say) -> KDInputs:
    """Stages 1-3: data, the teacher's answers to every prompt, and its cache (each reused)."""
    from chatdistill.distill.cache import write_cache
    from chatdistill.distill.teacher_answers import generate_data

    assets = _assets(cfg)
    teacher = Path(cfg.teacher) if cfg.teacher else assets / "teacher"
    out = Path(cfg.output)
    paths = prepare_data(cfg, assets, AutoTokenizer.from_pretrained(teacher))
    n_labelled = sum(1 for _ in paths["labelled"].open())
    n_prompts = sum(1 for _ in paths["prompts"].open())
    say(
        f"[data] {n_prompts} prompts; {n_labelled} of them with human answers "
        f"({cfg.labelled_fraction:.0%}); conversations over {MAX_LENGTH} tokens left out"
    )

    answers = out / "data" / "teacher_answers.jsonl"
    say("[teacher answers] the teacher answers every prompt (greedy)")
    # Batches of 64 answer 1.5x faster than 32 on a CPU (the weights are read once per step for
    # more rows), with the same greedy answers.
    generate_data(str(teacher), str(paths["prompts"]), str(answers), max_new_tokens=ANSWER_TOKENS,
                  batch_size=64, seed=cfg.seed)  # fmt: skip
    kd_data = out / "data" / "kd_train.jsonl"
    kd_rows = load_rows(answers) + load_rows(paths["labelled"])
    _write_if_changed(kd_data, jsonl_text(kd_rows))

    cache = None
    if cfg.ce_weight < 1:
        cache = out / f"teacher_cache_t{cfg.temperature:g}_k{cfg.top_k}"
        say(f"[teacher cache] top-{cfg.top_k} log-probs at temperature {cfg.temperature:g}")
        write_cache(str(teacher), str(kd_data), str(cache), top_k=cfg.top_k,
                    temperature=cfg.temperature, max_length=MAX_LENGTH, batch_size=32)  # fmt: skip
    common = _common(cfg, paths, _student_config(out, teacher), teacher)
    return KDInputs(paths, teacher, kd_data, cache, common)


def kd_recipe(cfg: DemoConfig, inputs: KDInputs) -> dict:
    """The KD student's overrides: CE on the teacher's answers and the labelled rows, mixed with
    a divergence (forward KL by default) to the cached teacher logits (or CE alone,
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
        "kept: accuracy as a share of the teacher's.\n"
        "(a) baseline_sft_labelled: SFT on the labelled subset only (no teacher); "
        "(b) baseline_sft_all: SFT on all labels the teacher saw."
    )


def _run(cfg: DemoConfig, say) -> EvalResult:
    inputs = prepare_kd_inputs(cfg, say)
    out, paths, common, teacher = Path(cfg.output), inputs.paths, inputs.common, inputs.teacher
    kd = _train("kd_student", out, kd_recipe(cfg, inputs), say)
    sft_small = _train("baseline_sft_labelled",
                       out, {**common, "data.train": str(paths["labelled"]), "loss.kind": "sft"},
                       say)  # fmt: skip
    sft_all = _train("baseline_sft_all",
                     out, {**common, "data.train": str(paths["all_labelled"]), "loss.kind": "sft"},
                     say)  # fmt: skip

    say("[eval] teacher, KD student and both baselines on the test split")
    results = evaluate(
        EvalConfig(
            teacher=str(teacher),
            students=[str(kd), str(sft_small), str(sft_all)],
            data=str(paths["test"]),
            output=str(out),
            max_samples=cfg.eval_samples,
            max_new_tokens=ANSWER_TOKENS,
            batch_size=32,
            max_length=MAX_LENGTH,
        ),
        say=lambda msg: say(f"[eval] {msg}"),
    )
    say("\n" + summary(results))
    say(
        f"\nreport: {out / 'report.html'}\n"
        f"chat with the student:  chatdistill chat {kd}\n"
        f"serve it (OpenAI API + web page):  chatdistill serve {kd}\n"
        f"export it for edge runtimes (ONNX, int4):  chatdistill export {kd} "
        f"--output {out / 'kd_student_onnx'} --prompts {paths['test']}"
        f"\nor for llama.cpp and Ollama (GGUF, q8_0):  chatdistill export {kd} --format gguf "
        f"--output {out / 'kd_student_gguf'} --prompts {paths['test']}"
    )
    return results
