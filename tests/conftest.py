"""Shared fixtures: a tokenizer trained here, tiny Llama/Qwen2/GPT-2 models, small chat data.

Everything is built offline inside the tests; nothing is downloaded.
"""

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF files convert once into this cache (build/ is ignored by git), reused by later test runs.
os.environ.setdefault(
    "CHATDISTILL_CACHE", str(Path(__file__).resolve().parents[1] / "build" / "cache")
)

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from chatdistill.models.tokenizer import train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_ITEMS = ["kettle", "lamp", "backpack", "umbrella", "notebook", "teapot", "scarf", "mug"]
_CITIES = ["Lyon", "Oslo", "Porto", "Kyoto", "Quito", "Turku"]


# Prompts that exports answer next to their model (a system turn in one of them).
SHOP_CHATS = [
    [{"role": "user", "content": "How much is the kettle?"}],
    [
        {"role": "system", "content": "You are a helpful shop assistant."},
        {"role": "user", "content": "Do you ship the lamp to Oslo?"},
    ],
    [{"role": "user", "content": "How much is the scarf?"}],
]


def make_conversations(n: int = 64, seed: int = 0) -> list[dict]:
    """Deterministic small support-desk conversations, some multi-turn, some with a system turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        item, city = rng.choice(_ITEMS), rng.choice(_CITIES)
        price = rng.randint(5, 90)
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are a helpful shop assistant."})
        msgs.append({"role": "user", "content": f"How much is the {item}?"})
        msgs.append({"role": "assistant", "content": f"The {item} costs {price} euros."})
        if i % 2 == 0:
            msgs.append({"role": "user", "content": f"Do you ship it to {city}?"})
            msgs.append({"role": "assistant", "content": f"Yes, we ship the {item} to {city}."})
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# The project's first demo teacher (7.3M parameters, 8 x 256, trained from scratch on the demo
# data by chatdistill's SFT mode, recipe in its chatdistill_config.yaml): a small model that has
# learnt something, for checks that random weights cannot make (export agreement).
TOY_TEACHER = Path(__file__).parent / "fixtures" / "toy_teacher"

_TINY = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=512),
}


@pytest.fixture(scope="session")
def chat_rows() -> list[dict]:
    return make_conversations()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, chat_rows) -> Path:
    texts = [m["content"] for r in chat_rows for m in r["messages"]]
    tok = train_bpe_tokenizer(texts * 4, vocab_size=400)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory, chat_rows) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows)


def build_tiny_model(
    out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, **overrides
) -> Path:
    """Save a randomly initialised tiny `arch` model plus the test tokenizer to `out`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(_TINY[arch])
    model_type = kw.pop("model_type")
    kw.update(overrides)
    ids = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = AutoConfig.for_model(model_type, **{**ids, **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One tiny model directory per architecture: {'llama': ..., 'qwen2': ..., 'gpt2': ...}."""
    root = tmp_path_factory.mktemp("models")
    return {a: build_tiny_model(root / a, tokenizer_dir, a) for a in _TINY}


def distill_cfg(out, teacher, data, **over):
    """A 4-step recipe distilling a 2-layer student cut from `teacher`; `over` sets fields."""
    from chatdistill.config import load_distill_config

    base = {
        "teacher": str(teacher) if teacher else None,
        "student_num_layers": 2,
        "data.train": str(data),
        "output": str(out),
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "train.save_every": 2,
        "train.warmup_steps": 1,
    }
    base.update(over)
    return load_distill_config(None, {k: v for k, v in base.items() if v is not None})
