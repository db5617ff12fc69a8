"""GGUF models (llama.cpp, Ollama) in: dequantised once into a content-keyed cache.

transformers reads a GGUF file (weights dequantised to float32, tokenizer and chat template from
its metadata), which takes ~25 s for a 135M model on 2 CPU cores and minutes for larger ones. The
result is saved as a Hugging Face directory (safetensors) under `cache_root()/<sha256 prefix>`,
so every later load of the same file, by any command, is an ordinary directory load. The key is
the file's content, so a renamed or copied file reuses the conversion and an edited one does not.
The directory appears only once complete (written beside it, then renamed): an interrupted
conversion leaves at most a `.tmp-*` folder, removed by the next conversion of that file.

Clear the cache with `rm -r ~/.cache/chatdistill/gguf` (or `$CHATDISTILL_CACHE/gguf`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from chatdistill.errors import UserError, first_line
from chatdistill.hashing import file_sha256

# Written into a converted directory: the GGUF file it came from (also how `source` tells one).
SOURCE_FILE = "chatdistill_source.json"


def cache_root() -> Path:
    """`$CHATDISTILL_CACHE/gguf`, else `$XDG_CACHE_HOME/chatdistill/gguf`, else `~/.cache/...`."""
    base = os.environ.get("CHATDISTILL_CACHE")
    if base:
        return Path(base).expanduser() / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "chatdistill" / "gguf"


def read_header(path: Path, what: str) -> dict:
    """Architecture and quantisation type from a GGUF file's header, or a one-line error."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct or numpy errors on bad bytes
        raise UserError(
            f"{what} {path}: not a readable GGUF file ({first_line(e)}); is it truncated? "
            "download or export it again"
        ) from None

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    file_type = field("general.file_type")
    if file_type is not None:
        try:
            quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"file_type {file_type}"
    else:  # older files: name the most common type among the 2-D weights
        kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) == 2]
        quant = max(set(kinds), key=kinds.count) if kinds else "unknown"
    return {"architecture": str(arch), "quantization": quant}


def convert(path: Path, what: str) -> tuple[Path, dict]:
    """The converted directory of the GGUF file `path` (converting it on first use) and the
    file's record: name, sha256, architecture, quantisation. A converted file's header is read
    from its record: parsing a GGUF header builds every vocabulary string (5.6 s for SmolLM2's
    49k tokens), and the demo resolves its teacher about ten times."""
    sha = file_sha256(path)
    target = cache_root() / sha[:24]
    done = target / SOURCE_FILE
    if done.is_file():
        with contextlib.suppress(ValueError):  # a damaged record: convert again
            return target, {**json.loads(done.read_text(encoding="utf-8")), "file": path.name}
    record = {"file": path.name, "sha256": sha, **read_header(path, what)}
    _convert_into(path, target, record, what)
    return target, record


def _convert_into(path: Path, target: Path, record: dict, what: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # removed in part by hand: convert again
        shutil.rmtree(target)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    print(
        f"{what}: converting {path.name} ({record['quantization']}, {record['architecture']}) "
        f"to safetensors once, into {target}",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        except (ValueError, KeyError, NotImplementedError, RuntimeError, OSError) as e:
            raise UserError(
                f"{what} {path}: transformers cannot read this GGUF ({record['architecture']}, "
                f"{record['quantization']}): {first_line(e)}; convert the original model instead"
            ) from None
        # The weights are plain float tensors now; drop the GGUF quantiser so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a finished concurrent conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
