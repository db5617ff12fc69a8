"""Export a model directory for edge runtimes (ONNX Runtime GenAI) and check that the export
answers like the model.

The ONNX graph comes from ONNX Runtime GenAI's own model builder, run as a subprocess (its command
line is its stable interface): model.onnx with its weights (fp32, int8 or block-wise int4 on CPU;
fp16, bf16 or int4 on CUDA), genai_config.json and the tokenizer files the runtime reads, so the
folder runs as is in ONNX Runtime GenAI's Python, C, C#, Java and mobile APIs. The export is
built in a temporary folder beside the output and renamed into place, so a failed or interrupted
export never leaves a half-written model (a failure leaves the builder's log beside it).

`check_export` runs the same chats through the PyTorch model and the export, greedy, and reports
how many answers are identical and how often the export's next token agrees with the model's
when both read the model's own answer (teacher forcing: a quantised export that once picks a
different word is still compared token by token afterwards), with decode speed and size on disk.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatdistill.errors import UserError

PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "fp16", "bf16", "fp32")}
BUILDER = "onnxruntime_genai.models.builder"
# Chats used by the check when the user gives none: short, generic assistant requests.
DEFAULT_CHECK_CHATS = [
    [{"role": "user", "content": text}]
    for text in (
        "Hello! Who are you?",
        "What can you help me with?",
        "Can you tell me your opening hours?",
        "How do I return an item I bought?",
        "Please summarise our conversation so far.",
        "Thank you, that is all.",
    )
]


def require_runtime() -> None:
    """Raise `UserError` when ONNX Runtime GenAI or its builder's dependencies are missing."""
    missing = []
    for module in ("onnxruntime_genai", "onnx_ir", "onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"export needs {', '.join(missing)}: pip install 'chatdistill[export]' "
            "(onnxruntime-genai-cuda instead of onnxruntime-genai for CUDA exports)"
        )


def _architecture(model_dir: Path) -> str:
    config = model_dir / "config.json"
    if not config.is_file():
        raise UserError(f"{model_dir}: no config.json; pass a model directory saved by chatdistill")
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config}: not readable JSON ({e})") from e
    if not archs:
        raise UserError(f"{config}: no 'architectures' entry; save the model with save_pretrained")
    return archs[0]


def _builder_error(log: str) -> str:
    """The builder's own error line from its output (the last 'SomethingError: message')."""
    errors = re.findall(r"^\w*(?:Error|Exception): (.+)$", log, flags=re.M)
    if errors:
        return errors[-1].strip()
    lines = [x for x in log.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no output"


def export_onnx(
    model_dir: str | Path, output: str | Path, precision: str = "int4", device: str = "cpu"
) -> Path:
    """Write an ONNX Runtime GenAI model folder for `model_dir` at `output`; return its path."""
    if device not in PRECISIONS:
        raise UserError(f"--device {device!r}: choose one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS[device]:
        raise UserError(
            f"--precision {precision!r} is not available on {device}: "
            f"choose one of {', '.join(PRECISIONS[device])}"
        )
    src = Path(model_dir).expanduser()
    if not src.is_dir():
        raise UserError(f"{model_dir}: model directory not found; check the path")
    arch = _architecture(src)
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new --output")
    require_runtime()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        built = work / "model"
        cmd = [sys.executable, "-m", BUILDER, "-i", str(src), "-o", str(built)]
        cmd += ["-p", precision, "-e", device, "-c", str(work / "cache")]
        # A local directory never needs the hub; telemetry stays off in the child too.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not (built / "genai_config.json").is_file():
            log_path = out.parent / f"{out.name}.export.log"
            log_path.write_text(log)
            raise UserError(
                f"{model_dir} ({arch}): ONNX export failed: {_builder_error(log)} "
                f"(builder log: {log_path})"
            )
        _keep_chat_template(src, built)
        (built / "chatdistill_export.json").write_text(
            json.dumps(
                {
                    "format": "onnxruntime-genai",
                    "precision": precision,
                    "device": device,
                    "source": str(src.resolve()),
                    "architecture": arch,
                },
                indent=2,
            )
        )
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace needs the name free
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _keep_chat_template(src: Path, built: Path) -> None:
    """Give the export the chat template the model is served with (ChatML when it has none)."""
    from transformers import AutoTokenizer

    from chatdistill.models.tokenizer import CHATML_TEMPLATE

    if (built / "chat_template.jinja").is_file():
        return
    template = AutoTokenizer.from_pretrained(str(src)).chat_template or CHATML_TEMPLATE
    (built / "chat_template.jinja").write_text(template)


@dataclass
class ExportCheck:
    """How an export answers next to its source model on the same chats (greedy)."""

    chats: int
    identical_answers: int
    token_agreement: float  # export's argmax == model's token, reading the model's answer
    compared_tokens: int
    model_tokens_per_s: float  # batch 1 decode, PyTorch
    export_tokens_per_s: float  # batch 1 decode, ONNX Runtime GenAI
    model_bytes: int
    export_bytes: int
    first_difference: str | None  # one chat's two answers where they differ
    model_accuracy: float | None = None  # % right, given answers (an `answer` field per row)
    export_accuracy: float | None = None
    model_answers: list[str] = field(default_factory=list)
    export_answers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _brief(error: Exception) -> str:
    """The runtime's message without its node bookkeeping: the part after 'Status Message:'."""
    text = " ".join(str(error).split())
    return text.split("Status Message:")[-1].strip() or type(error).__name__


def _eos_ids(export_dir: Path) -> set[int]:
    cfg = json.loads((export_dir / "genai_config.json").read_text())
    eos = cfg.get("model", {}).get("eos_token_id", [])
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def _export_answer(og, model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out: list[int] = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in eos:
            break
        out.append(token)
    return out


def _agreement(og, model, prompt: list[int], answer: list[int]) -> int:
    """How many of `answer`'s tokens the export predicts (argmax) when fed the answer so far."""
    if not answer:
        return 0
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(answer) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    hits = 0
    for token in answer:
        hits += int(gen.get_logits().reshape(-1).argmax()) == token
        gen.append_tokens([token])
    return hits


def check_export(
    model_dir: str | Path,
    export_dir: str | Path,
    chats: list[list[dict]] | None = None,
    max_new_tokens: int = 48,
    answers: list[str | None] | None = None,
) -> ExportCheck:
    """Answer `chats` greedily with the model and with its export and compare (see module doc).

    `answers` (one per chat, None where a chat has none) adds each side's answer accuracy
    (`metrics.answer_correct`: the expected answer appears in the reply)."""
    import onnxruntime_genai as og

    from chatdistill.evaluate import scores as metrics
    from chatdistill.evaluate.run import weights_size
    from chatdistill.inference.engine import Engine, SamplingParams

    require_runtime()
    if max_new_tokens < 1:
        raise UserError(f"--check-tokens {max_new_tokens}: must be at least 1")
    chats = chats or DEFAULT_CHECK_CHATS
    if answers is not None and len(answers) != len(chats):
        raise ValueError(f"{len(answers)} answers for {len(chats)} chats")
    engine = Engine.load(str(model_dir), device="cpu")
    export_dir = Path(export_dir)
    try:
        exported = og.Model(str(export_dir))
    except Exception as e:  # the runtime raises its own error types for unreadable folders
        raise UserError(f"{export_dir}: ONNX Runtime GenAI cannot load it ({e})") from e
    eos = _eos_ids(export_dir)
    prompts = [engine.encode_chat(c) for c in chats]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    # Warm-up (lazy kernel and thread-pool set-up is not decode speed).
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), batch_size=1)
    started = time.perf_counter()
    ref = [c.token_ids for c in engine.generate(prompts, params, batch_size=1)]
    model_s = time.perf_counter() - started
    try:
        _export_answer(og, exported, prompts[0], 2, eos)  # warm-up
        started = time.perf_counter()
        got = [_export_answer(og, exported, p, max_new_tokens, eos) for p in prompts]
        export_s = time.perf_counter() - started
        hits = sum(_agreement(og, exported, p, a) for p, a in zip(prompts, ref, strict=True))
    except Exception as e:  # the runtime's own errors (unsupported shapes, operators)
        raise UserError(
            f"{export_dir}: ONNX Runtime GenAI cannot run this export ({_brief(e)})"
        ) from e
    compared = sum(len(a) for a in ref)
    texts = [engine.tokenizer.decode(a, skip_special_tokens=True) for a in ref]
    export_texts = [engine.tokenizer.decode(b, skip_special_tokens=True) for b in got]
    first = next(
        (
            f"model: {a!r} | export: {b!r}"
            for a, b in zip(texts, export_texts, strict=True)
            if a != b
        ),
        None,
    )
    keyed = [i for i, a in enumerate(answers or []) if a]

    def accuracy(replies: list[str]) -> float | None:
        if not keyed:
            return None
        return metrics.answer_accuracy([replies[i] for i in keyed], [answers[i] for i in keyed])

    return ExportCheck(
        chats=len(chats),
        identical_answers=sum(a == b for a, b in zip(ref, got, strict=True)),
        token_agreement=hits / compared if compared else 1.0,
        compared_tokens=compared,
        model_tokens_per_s=sum(map(len, ref)) / max(model_s, 1e-9),
        export_tokens_per_s=sum(map(len, got)) / max(export_s, 1e-9),
        model_bytes=weights_size(model_dir),
        export_bytes=weights_size(export_dir),
        first_difference=first,
        model_accuracy=accuracy(texts),
        export_accuracy=accuracy(export_texts),
        model_answers=texts,
        export_answers=export_texts,
    )
