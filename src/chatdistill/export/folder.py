"""The two folders every export touches: the model directory it reads and the new folder it
writes, which is built under a temporary name beside `--output` and renamed into place, so a
failed or interrupted export never leaves a half-written model behind."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chatdistill.errors import UserError
from chatdistill.models import resolve


def source_dir(model_dir: str | Path) -> Path:
    """The Hugging Face directory an export reads, through the one model loader: a GGUF file's
    converted copy, or `model_dir` itself; `UserError` when it names no model."""
    src = resolve(model_dir, "model")
    if src.kind == "hub" or src.adapter:
        raise UserError(
            f"{model_dir}: export reads a model directory or GGUF file; save a hub model or a "
            "base + adapter with save_pretrained first (or distil it: the student is one)"
        )
    return Path(src.path)


def architecture(model_dir: Path) -> str:
    """The model class named in `model_dir/config.json` (e.g. LlamaForCausalLM)."""
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


def check_new_output(out: Path) -> None:
    """Refuse an `out` that holds something: an export never overwrites."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new --output")


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yield an empty folder to build the export in; when the block succeeds it becomes `out`.

    The folder sits beside `out` (same file system, so the rename is atomic); it is removed
    whatever happens, so a failure leaves nothing but what the caller chose to keep."""
    check_new_output(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise UserError(f"--output {out}: cannot write there ({e.strerror}: {e.filename})") from e
    try:
        built = work / "model"
        built.mkdir()
        yield built
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace needs the name free
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
