"""Export a model directory for ONNX Runtime GenAI, and the reader the export check uses.

The ONNX graph comes from ONNX Runtime GenAI's own model builder, run as a subprocess (its command
line is its stable interface): model.onnx with its weights (fp32, int8 or block-wise int4 on CPU;
fp16, bf16 or int4 on CUDA), genai_config.json and the tokenizer files the runtime reads, so the
folder runs as is in ONNX Runtime GenAI's Python, C, C#, Java and mobile APIs. The export is
built in a temporary folder beside the output and renamed into place, so a failed or interrupted
export never leaves a half-written model (a failure leaves the builder's log beside it).

`check_export` compares the export's answers with the PyTorch model's (`check.run_check`).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from chatdistill.errors import UserError
from chatdistill.export.check import ExportCheck, run_check
from chatdistill.export.folder import architecture, building, check_new_output, source_dir

PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "fp16", "bf16", "fp32")}
BUILDER = "onnxruntime_genai.models.builder"


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
    src = source_dir(model_dir)
    arch = architecture(src)
    out = Path(output).expanduser()
    check_new_output(out)
    require_runtime()
    with building(out) as built:
        cmd = [sys.executable, "-m", BUILDER, "-i", str(src), "-o", str(built)]
        cmd += ["-p", precision, "-e", device, "-c", str(built.parent / "cache")]
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
    return out


def _keep_chat_template(src: Path, built: Path) -> None:
    """Give the export the chat template the model is served with (ChatML when it has none)."""
    from transformers import AutoTokenizer

    from chatdistill.models.tokenizer import CHATML_TEMPLATE

    if (built / "chat_template.jinja").is_file():
        return
    template = AutoTokenizer.from_pretrained(str(src)).chat_template or CHATML_TEMPLATE
    (built / "chat_template.jinja").write_text(template)


def _brief(error: Exception) -> str:
    """The runtime's message without its node bookkeeping: the part after 'Status Message:'."""
    text = " ".join(str(error).split())
    return text.split("Status Message:")[-1].strip() or type(error).__name__


class OnnxReader:
    """An ONNX Runtime GenAI export, run by the runtime itself (so its decode speed is real)."""

    timed = True

    def __init__(self, export_dir: Path, tokenizer) -> None:
        import onnxruntime_genai as og

        self._og = og
        self._dir = export_dir
        try:
            self._model = og.Model(str(export_dir))
        except Exception as e:  # the runtime raises its own error types for unreadable folders
            raise UserError(f"{export_dir}: ONNX Runtime GenAI cannot load it ({e})") from e
        cfg = json.loads((export_dir / "genai_config.json").read_text())
        eos = cfg.get("model", {}).get("eos_token_id", [])
        self._eos = {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}
        self._tokenizer = tokenizer  # the export keeps the model's vocabulary

    def _failed(self, error: Exception) -> UserError:
        return UserError(
            f"{self._dir}: ONNX Runtime GenAI cannot run this export ({_brief(error)})"
        )

    def answers(
        self, chats: list[list[dict]], prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        try:
            return [self._answer(p, max_new_tokens) for p in prompts]
        except Exception as e:  # the runtime's own errors (unsupported shapes, operators)
            raise self._failed(e) from e

    def _answer(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        gen = self._og.Generator(self._model, params)
        gen.append_tokens(prompt)
        out: list[int] = []
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in self._eos:
                break
            out.append(token)
        return out

    def agreement(self, prompt: list[int], answer: list[int]) -> int:
        if not answer:
            return 0
        try:
            params = self._og.GeneratorParams(self._model)
            params.set_search_options(max_length=len(prompt) + len(answer) + 1, do_sample=False)
            gen = self._og.Generator(self._model, params)
            gen.append_tokens(prompt)
            hits = 0
            for token in answer:
                hits += int(gen.get_logits().reshape(-1).argmax()) == token
                gen.append_tokens([token])
        except Exception as e:
            raise self._failed(e) from e
        return hits

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def check_export(
    model_dir: str | Path,
    export_dir: str | Path,
    chats: list[list[dict]] | None = None,
    max_new_tokens: int = 48,
    answers: list[str | None] | None = None,
) -> ExportCheck:
    """Answer `chats` greedily with the model and with its ONNX export and compare them."""
    from chatdistill.evaluate.probes import weights_size
    from chatdistill.inference.engine import Engine

    require_runtime()
    if max_new_tokens < 1:
        raise UserError(f"--check-tokens {max_new_tokens}: must be at least 1")
    engine = Engine.load(str(model_dir), device="cpu")
    export_dir = Path(export_dir)
    reader = OnnxReader(export_dir, engine.tokenizer)
    return run_check(
        engine,
        reader,
        weights_size(model_dir),
        weights_size(export_dir),
        chats,
        max_new_tokens,
        answers,
    )
