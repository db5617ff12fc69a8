"""The model card of a student: provenance, recipe, metrics, and how to load, chat and serve.

The card goes to README.md (what the Hugging Face Hub shows) when the directory has none or has
one this tool wrote (marked by `CARD_MARKER`), and is rewritten by each evaluation. A README.md
without the marker is the user's, or came with a model from elsewhere: it is never overwritten,
and the card goes to MODEL_CARD.md beside it instead.
"""

from pathlib import Path

from chatdistill import atomic
from chatdistill.evaluate.report import (
    COST,
    DASH,
    FIDELITY,
    KEPT_KEYS,
    QUALITY,
    kept_note,
    kept_value,
    md_table,
    pct,
)
from chatdistill.evaluate.result import EvalResult, ModelResult

CARD_MARKER = (
    "<!-- Model card written by chatdistill eval, which rewrites it on each run. "
    "Delete this line to keep your edits: eval then writes MODEL_CARD.md instead. -->"
)


def card_path(student_dir: str | Path) -> Path:
    """README.md when it is absent or this tool's card; MODEL_CARD.md beside anyone else's."""
    readme = Path(student_dir) / "README.md"
    if not readme.exists() or CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
        return readme
    return readme.with_name("MODEL_CARD.md")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            flat[f"{prefix}{k}"] = v
    return flat


def _card_eval(student: ModelResult, teacher: ModelResult, results: EvalResult) -> list[str]:
    rows = []
    for cols in (QUALITY, FIDELITY, COST):
        for label, f in cols:
            rows.append([label, f(teacher) if cols is not FIDELITY else DASH, f(student)])
    kept = ", ".join(
        f"{label} {pct(kept_value(student, k))}"
        for k, label in KEPT_KEYS
        if kept_value(student, k) is not None
    )
    lines = [
        "## Evaluation",
        "",
        f"On `{results.data.path}` ({results.data.conversations} conversations), "
        "greedy decoding, measured by `chatdistill eval`.",
        "",
        md_table(["Metric", "Teacher", "This model"], rows).replace("|---|---|", "|---|---:|"),
        "",
    ]
    if kept:
        lines += [f"Teacher quality kept: {kept}. {kept_note(results)}", ""]
    return lines


def _source_note(model) -> str:
    """` (GGUF Q4_1, sha256 ...)` for a model evaluated from a GGUF file, else ""."""
    info = model.source if model is not None else {}
    if "sha256" not in info:
        return ""
    return f" (GGUF {info['quantization']}, sha256 `{info['sha256']}`)"


def write_model_card(
    student_dir: str | Path, results: EvalResult | None, recipe_info: dict | None
) -> Path:
    """Write the model card into `student_dir` (at `card_path`); return where it went.

    `results` is the `evaluate` output (or None before evaluation); the student is found in it by
    path. `recipe_info` is the training recipe (e.g. the resolved distill config as a dict).
    """
    d = Path(student_dir)
    recipe = _flatten(recipe_info or {})
    entry = teacher = None
    if results:
        teacher = results.teacher
        entry = next((m for m in results.models if Path(m.path).resolve() == d.resolve()), None)
    teacher_name = recipe.get("teacher") or (teacher.path if teacher else None)
    data = recipe.get("data.train") or (results.data.path if results else None)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    lines += ["tags:", "- chatdistill", "- distillation", "---", CARD_MARKER, "", f"# {d.name}"]
    lines.append("")
    lines += [
        f"A chat model distilled from `{teacher_name or 'an unrecorded teacher'}` "
        "with chatdistill.",
        "",
        "## Training",
        "",
        f"- Teacher: `{teacher_name or DASH}`{_source_note(teacher)}",
        f"- Data: `{data or DASH}`",
    ]
    if recipe:
        rows = [[k, f"`{v}`"] for k, v in recipe.items() if k not in ("teacher", "data.train")]
        lines += ["", "Recipe:", "", md_table(["Setting", "Value"], rows).replace("---:", "---")]
    lines.append("")
    if entry and teacher:
        lines += _card_eval(entry, teacher, results)
    else:
        lines += [
            "## Evaluation",
            "",
            "Not evaluated yet: `chatdistill eval --teacher TEACHER --student "
            f"{d} --data TEST.jsonl --output eval/`.",
            "",
        ]
    lines += [
        "## Use with transformers",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{d}"',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'messages = [{"role": "user", "content": "Hello! What can you do?"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'answer = output[0, inputs["input_ids"].shape[1] :]',
        "print(tokenizer.decode(answer, skip_special_tokens=True))",
        "```",
        "",
        "## Chat and serve",
        "",
        "```bash",
        f"chatdistill chat {d}     # chat in the terminal",
        f"chatdistill serve {d}    # OpenAI-compatible API (/v1) and a web chat page",
        "```",
        "",
    ]
    path = card_path(d)
    atomic.write_text(path, "\n".join(lines))
    return path
