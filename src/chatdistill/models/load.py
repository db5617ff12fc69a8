"""The one way every command loads a model and its tokenizer.

Weights are read as safetensors only (a pickle can run code), remote code is never trusted, and
the tokenizer always has a pad token (its EOS when it has none). Arguments resolve as in
`source.resolve`: a Hugging Face directory, a GGUF file, or `hf:org/name`.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from chatdistill.errors import UserError, first_line
from chatdistill.models.source import ModelSource, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(model: str | Path | ModelSource, what: str, needs: str = "model") -> ModelSource:
    return model if isinstance(model, ModelSource) else resolve(model, what, needs)


def load_tokenizer(model: str | Path | ModelSource, what: str = "tokenizer"):
    """The tokenizer of a model (directory, GGUF file or hub id), with a pad token."""
    src = _source(model, what, needs="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types on bad files; one line each
        raise UserError(f"{what} {src.arg}: cannot load its tokenizer ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _refuse_remote_code(src: ModelSource, what: str) -> None:
    """A model whose architecture exists only as code in its own folder (`auto_map` and a
    model_type transformers does not know) cannot load without running that code: refuse it."""
    config = Path(src.path) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # transformers gives the one-line error for a missing or unreadable config
    if (
        isinstance(cfg, dict)
        and cfg.get("auto_map")
        and cfg.get("model_type") not in CONFIG_MAPPING
    ):
        raise UserError(
            f"{what} {src.arg}: its architecture ({cfg.get('model_type')}) is custom code in the "
            "model folder, and chatdistill never runs a model's own code; use a model of an "
            "architecture transformers ships"
        )


def _check_weights(src: ModelSource, what: str) -> None:
    d = Path(src.path)
    if src.kind == "hub" or any(d.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise UserError(
            f"{what} {src.arg}: weights are a pickle ({pickles[0]}), which can run code; "
            "chatdistill reads safetensors only: save the model with save_pretrained "
            "(safe_serialization=True) or pass a GGUF file"
        )
    raise UserError(f"{what} {src.arg}: no *.safetensors weights there")


def default_dtype(device: str | torch.device | None) -> torch.dtype | str:
    """float32 on the CPU (fastest and exact there); the checkpoint's own dtype on accelerators."""
    return torch.float32 if device is None or torch.device(device).type == "cpu" else "auto"


@functools.cache
def fast_bf16() -> bool:
    """True when bf16 matrix multiplies pay on this machine: a CUDA device that supports them, or
    a CPU with AVX512-BF16 or AMX where a multiply of a small model's shape (256 x 576 x 1536)
    runs at least 1.25x faster in bf16 than in float32. The flags alone do not say it: measured
    1.7x on an AMD EPYC with AVX512-BF16, 0.6x on an Intel Xeon with it and no AMX (without
    either, bf16 on a CPU is emulated and slower still). The check takes about 0.2 s, once per
    process."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    fp32, bf16 = _matmul_seconds((torch.float32, torch.bfloat16))
    return fp32 > 1.25 * bf16


def _matmul_seconds(dtypes: tuple[torch.dtype, ...], rounds: int = 12) -> list[float]:
    """Best time of one (256, 576) @ (576, 1536) multiply in each of `dtypes` on the CPU. The
    dtypes take turns, round after round: other work on the machine only ever slows a multiply
    down, and taking turns lets both see it alike (one-after-the-other timings flipped the
    answer on a busy machine)."""
    pairs = [(torch.randn(256, 576).to(d), torch.randn(576, 1536).to(d)) for d in dtypes]
    best = [float("inf")] * len(dtypes)
    with torch.inference_mode():
        for i in range(rounds + 2):  # the first two warm up
            for j, (a, b) in enumerate(pairs):
                start = time.perf_counter()
                a @ b
                if i >= 2:
                    best[j] = min(best[j], time.perf_counter() - start)
    return best


PRECISIONS = ("auto", "fp32", "bf16")


def inference_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """Weights dtype of a model that only runs forward: "bf16", "fp32", or "auto" (bf16 on a
    GPU that supports it, else the loader's default); None = the loader's default."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and torch.device(device).type == "cuda" and fast_bf16():
        return torch.bfloat16
    return torch.float32 if precision == "fp32" else None


def load_model(
    model: str | Path | ModelSource,
    what: str = "model",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """AutoModelForCausalLM from a directory, GGUF file or hub id; `dtype` None: `default_dtype`."""
    src = _source(model, what)
    if src.kind != "hub":
        _refuse_remote_code(src, what)
    _check_weights(src, what)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            src.path,
            dtype=default_dtype(device) if dtype is None else dtype,
            use_safetensors=True,
            trust_remote_code=False,
        )
    except Exception as e:  # noqa: BLE001 - corrupt safetensors, bad config.json, remote code ...
        if isinstance(e, UserError):
            raise
        raise UserError(f"{what} {src.arg}: cannot load the model ({first_line(e)})") from None
    if src.adapter:
        loaded = _merge_adapter(loaded, src, what)
    return loaded.to(device) if device is not None else loaded


def _merge_adapter(model: PreTrainedModel, src: ModelSource, what: str) -> PreTrainedModel:
    """The model with the peft adapter `src.adapter` merged in (one plain model, as fast as the
    base at inference)."""
    from peft import PeftModel  # only adapter users pay for importing peft

    adapter = Path(src.adapter)
    if not any(adapter.glob("*.safetensors")):
        raise UserError(f"{what} adapter {adapter}: no adapter_model.safetensors there")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API that warns it is renamed
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - shape mismatches, unknown target modules ...
        raise UserError(
            f"{what} adapter {adapter} does not fit the model {src.path} ({first_line(e)}); "
            "pass the base model it was trained on"
        ) from None
    return merged


def load_pretrained(
    model: str | Path, what: str = "model", dtype=None, device=None, adapter: str | None = None
) -> tuple[PreTrainedModel, object, ModelSource]:
    """(model, tokenizer, source) resolved once: a GGUF file converts at most once."""
    src = resolve(model, what, adapter=adapter)
    tok = load_tokenizer(src, what)
    return load_model(src, what, dtype, device), tok, src
