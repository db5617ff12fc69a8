"""What a run may write into, checked before anything is loaded: never over a model it did not
make (a teacher's own directory included), and `--resume` only with the recipe that made the
checkpoints, since anything else would silently mix two runs into one student.
"""

from pathlib import Path
from typing import Any

import yaml

from chatdistill.config import DistillConfig
from chatdistill.distill.checkpoint import latest_checkpoint
from chatdistill.errors import UserError

RECIPE = "chatdistill_config.yaml"
# Files that make a directory a model (or a teacher cache); a run refuses to write over them.
MODEL_FILES = ("config.json", "*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth")
# Fields a resume may change: they set how long the run goes and how often it logs, evaluates and
# saves, never what a step computes. max_steps also moves the end of the cosine schedule.
RESUMABLE = (
    "train.max_steps",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
)
# Recipe fields naming local files or directories the run reads.
SOURCES = ("teacher", "student", "student_config", "tokenizer", "teacher_cache")
SOURCES += ("data.train", "data.validation")


def model_files(directory: Path) -> list[str]:
    """Names of the model files (MODEL_FILES) directly in `directory`, sorted."""
    if not directory.is_dir():
        return []
    return sorted({p.name for pattern in MODEL_FILES for p in directory.glob(pattern)})


def refuse_model_dir(path: Path, flag: str) -> None:
    """Refuse an output `path` that is a file or a directory holding a model."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; {flag} names a directory, choose another")
    found = model_files(path)
    if found:
        raise UserError(
            f"{flag} {path} holds a model ({', '.join(found[:4])}) that this would overwrite; "
            f"choose a new {flag}"
        )


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as `section.field: value`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of one existing path (`runs/x` and `./runs/x/`)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _recipe_changes(cfg: DistillConfig, out: Path, step: int) -> list[str]:
    """`field old -> new` for each RESUMABLE field the resume changes; refuse any other change."""
    path = out / RECIPE
    if not path.is_file():
        raise UserError(
            f"--output {out} has checkpoints but no {RECIPE}, so it was not made by "
            "`chatdistill distill`; choose a new --output"
        )
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = f"unreadable ({type(e).__name__})"
        raise UserError(f"{path}: {reason}; cannot check the resume against it") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a recipe; cannot check the resume against it")
    old, new = flatten(saved), flatten(cfg.model_dump())
    fields = [k for k in dict.fromkeys([*new, *old]) if k != "output"]
    differ = [k for k in fields if not _same(old.get(k), new.get(k))]
    refused = [k for k in differ if k not in RESUMABLE]
    if refused:
        said = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in refused[:6])
        raise UserError(
            f"--resume: {out} was trained with another recipe: {said}; resume with the recipe "
            f"in {path} (only {', '.join(k.split('.')[1] for k in RESUMABLE)} may change) or "
            "choose a new --output"
        )
    if cfg.train.max_steps < step:
        raise UserError(
            f"--resume: the last checkpoint of {out} is at step {step}, past train.max_steps "
            f"{cfg.train.max_steps}; raise train.max_steps or choose a new --output"
        )
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in differ]


def check_output(cfg: DistillConfig, resume: bool) -> tuple[Path | None, list[str]]:
    """Refuse an output this run must not write into; return the checkpoint to resume from (None
    to start afresh) and the resumable fields the resume changes (`field old -> new`)."""
    out = Path(cfg.output)
    flat = flatten(cfg.model_dump())
    for field in SOURCES:
        src = flat[field]
        if src and Path(src).exists() and Path(src).resolve() == out.resolve():
            raise UserError(f"--output {out} is the {field} itself; choose a new --output")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; --output names a directory, choose another")
    previous = latest_checkpoint(out)
    if previous is None:
        refuse_model_dir(out, "--output")
        return None, []
    if not resume:
        raise UserError(
            f"{out} already has checkpoints; pass --resume to continue or choose a new --output"
        )
    step = int(previous.name.split("-")[1])
    return previous, _recipe_changes(cfg, out, step)
