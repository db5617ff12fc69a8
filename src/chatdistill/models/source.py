"""What a model argument names: a Hugging Face directory, a GGUF file, or a hub id asked for.

Every command resolves its model arguments here, so the rules are the same everywhere:
- an existing directory with `config.json` is a Hugging Face model directory;
- a `.gguf` file, or a directory holding exactly one, is a GGUF model (converted once, see gguf.py);
- `hf:org/name` is a hub id, fetched by transformers; nothing else ever reaches the network, so a
  mistyped local path such as `runs/typo` is an error, not a download;
- a peft LoRA adapter directory (`adapter_config.json`) is its base model plus the adapter, merged
  at load; the base is the one given with the adapter, else the adapter's own
  `base_model_name_or_path` resolved by these same rules (relative to the adapter directory first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatdistill.errors import UserError
from chatdistill.models.gguf import SOURCE_FILE, convert
from chatdistill.models.packaged import SMOLLM2_FILE, smollm2_gguf

HUB_PREFIX = "hf:"
ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument. `path` is what transformers loads: a local directory in Hugging
    Face format (for a GGUF file, its converted copy) or, for a hub id, the id itself."""

    arg: str  # as the user wrote it
    path: str
    kind: str  # "hf" | "gguf" | "hub"
    gguf: dict = field(default_factory=dict)  # file, sha256, quantization, architecture
    adapter: str | None = None  # a peft adapter directory merged into the model at load
    base: str | None = None  # with an adapter: the base model argument, resolved (file or dir)

    def record(self) -> dict:
        """What results, recipes and model cards say about where the model came from."""
        extra = {"adapter": self.adapter} if self.adapter else {}
        return {"path": self.arg, "format": self.kind, **self.gguf, **extra}


def _gguf_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())


def resolve(
    arg: str | Path | ModelSource,
    what: str = "model",
    needs: str = "model",
    adapter: str | Path | None = None,
) -> ModelSource:
    """Resolve `arg` (see the module docstring); `needs` is "model" or "tokenizer"; `adapter` is
    a peft adapter directory to merge into the model `arg` names."""
    if adapter is not None:
        src = resolve(arg, what, needs)
        adapter_dir = str(_adapter_dir(Path(adapter), f"{what} adapter"))
        return replace(src, adapter=adapter_dir, base=src.arg)
    if isinstance(arg, ModelSource):
        return arg
    p = Path(str(arg)).expanduser()
    if (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file():
        base = _adapter_base(p, what)
        return replace(
            resolve(base, f"{what} base", needs), arg=str(arg), adapter=str(p), base=base
        )
    return _resolve_plain(str(arg), what, needs)


def _adapter_dir(p: Path, what: str) -> Path:
    if not (p / ADAPTER_CONFIG).is_file():
        raise UserError(f"{what} {p}: no {ADAPTER_CONFIG} there; pass a peft adapter directory")
    return p


def _adapter_base(p: Path, what: str) -> str:
    """The adapter's `base_model_name_or_path`, as a local path where one exists (beside the
    adapter, as given, or the file of a packaged model such as the demo's SmolLM2 GGUF)."""
    try:
        base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {p}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if not base:
        raise UserError(f"{what} {p}: {ADAPTER_CONFIG} names no base model; pass the base too")
    beside = p / base
    if beside.exists():
        return str(beside)
    if Path(base).expanduser().exists() or str(base).startswith(HUB_PREFIX):
        return str(base)
    if base == SMOLLM2_FILE:  # a model this project installs as a package (the demo's base)
        return str(smollm2_gguf())
    raise UserError(
        f"{what} {p}: its base model {base} is not on this machine; pass the base model as "
        f"the model and this directory as its adapter (e.g. --teacher BASE --teacher-adapter {p})"
    )


def _gguf(path: Path, arg: str, what: str) -> ModelSource:
    target, record = convert(path, what)
    return ModelSource(arg, str(target), "gguf", record)


def _resolve_plain(text: str, what: str, needs: str) -> ModelSource:
    if text.startswith(HUB_PREFIX):
        hub_id = text[len(HUB_PREFIX) :]
        if hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise UserError(f"{what} {text}: a hub id is hf:org/name")
        return ModelSource(text, hub_id, "hub")
    p = Path(text).expanduser()
    if not p.exists():
        hint = ""
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            hint = f"; to download {text} from the Hugging Face hub, pass hf:{text}"
        raise UserError(f"{what} {text}: no such file or directory{hint}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(
                f"{what} {text}: expected a model directory or a .gguf file, got another file"
            )
        return _gguf(p, text, what)
    if (p / "config.json").is_file() or (
        needs == "tokenizer" and any((p / f).is_file() for f in _TOKENIZER_FILES)
    ):
        return ModelSource(text, str(p), "hf", _converted_record(p))
    ggufs = _gguf_files(p)
    if len(ggufs) == 1:
        return _gguf(ggufs[0], text, what)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise UserError(f"{what} {text}: holds {len(ggufs)} GGUF files ({names}); pass one file")
    wanted = "tokenizer.json" if needs == "tokenizer" else "config.json"
    raise UserError(
        f"{what} {text}: no {wanted} or .gguf file there; pass a model directory or a GGUF file"
    )


def _converted_record(d: Path) -> dict:
    """The GGUF record of a directory converted from a GGUF file (empty for any other)."""
    f = d / SOURCE_FILE
    if not f.is_file():
        return {}
    try:
        return dict(json.loads(f.read_text()))
    except (OSError, ValueError):
        return {}
