"""The shipped demo data, read at run time: its folder, its splits, and views of its rows.

Reading never builds anything: the generators (`kb`, `questions`, `support`, `chatterbot`) run
only when the files are rebuilt, from `chatdistill.demo.build` (`scripts/build_demo_data.py`).
"""

import json
import random
from importlib import resources
from pathlib import Path

from chatdistill.errors import UserError

SPLITS = ("train", "validation", "test")


def demo_asset_dir() -> Path:
    """Folder of the shipped demo files (train/validation/test JSONL, tokenizer/, README.md)."""
    path = Path(str(resources.files("chatdistill") / "assets" / "demo"))
    if not (path / "train.jsonl").is_file():
        raise UserError(
            f"demo data missing at {path}; reinstall chatdistill or run "
            "`python scripts/build_demo_data.py`"
        )
    return path


def load_demo_split(name: str) -> list[dict[str, object]]:
    """Rows of a shipped split: "train", "validation", "test", or "prompts" (train as prompts)."""
    if name not in (*SPLITS, "prompts"):
        raise UserError(f"unknown demo split {name!r}; use one of {', '.join(SPLITS)}, prompts")
    path = demo_asset_dir() / f"{'train' if name == 'prompts' else name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return to_prompts(rows) if name == "prompts" else rows


def jsonl_text(rows: list[dict[str, object]]) -> str:
    """The shipped JSONL serialisation (UTF-8 text, one compact object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


def to_prompts(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows without their final assistant turn (and without `answer`): the questions a teacher
    answers for distillation. Earlier turns stay as context."""
    out = []
    for row in rows:
        messages = list(row["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        kept = {k: v for k, v in row.items() if k not in ("messages", "answer")}
        out.append({"messages": messages, **kept})
    return out


def labelled_subset(
    rows: list[dict[str, object]], fraction: float, seed: int
) -> list[dict[str, object]]:
    """A random `fraction` of `rows` (at least one), in their original order: the small set of
    human-written answers the demo pretends to have."""
    if not 0 < fraction <= 1:
        raise UserError(f"labelled fraction {fraction} is outside (0, 1]; use e.g. 0.1")
    n = max(1, round(fraction * len(rows)))
    keep = set(random.Random(f"{seed}/labelled").sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]
