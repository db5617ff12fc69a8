"""Atomic training checkpoints: write to a temporary directory, then rename; keep the last K.

A checkpoint holds what `accelerate` saves (model as safetensors, optimizer, RNG states), the
learning-rate schedule as `scheduler.json` and `trainer_state.json` (step and data position). A
directory without `trainer_state.json` was never finished and is ignored, so a crash mid-write can
never be resumed from.

Nothing in a checkpoint can run code when it is loaded: accelerate reads the optimizer and RNG
files with `torch.load(weights_only=True)`; the schedule is JSON because accelerate reads the
objects registered with it (`custom_checkpoint_N.pkl`) with `weights_only=False`.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from accelerate.utils import load

from chatdistill.errors import UserError

STATE = "trainer_state.json"
SCHEDULER = "scheduler.json"

# accelerate warns on every save that tied weights (lm_head = embeddings) are stored once; loading
# restores the tie, so the warning is noise in a run log.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def remove_leftovers(output: Path) -> list[Path]:
    """Delete what a killed run left half-written (temporary checkpoint and final-model
    directories); return what was removed."""
    found = [*checkpoint_root(output).glob(".tmp-step-*"), *output.glob(".final-tmp")]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def save_checkpoint(
    accelerator, output: Path, step: int, state: dict, keep_last: int, scheduler
) -> Path:
    """Save accelerate state, the schedule and trainer state atomically as checkpoints/step-N;
    prune old ones."""
    root = checkpoint_root(output)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        # Every process writes its own RNG state into tmp; renaming tmp before a slower one has
        # written it made that process fail (seen with two processes on a loaded machine).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
            (tmp / STATE).write_text(json.dumps({**state, "step": step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        # A half-written checkpoint is never resumed from; removing it gives a full disk its
        # space back.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _read_json(path: Path, what: str, unusable: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no {path.name}; {unusable}") from None
    except (ValueError, UnicodeDecodeError) as e:
        reason = f"not the JSON {what} a checkpoint holds ({e})"
        raise UserError(f"{path}: {reason}; {unusable}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not the JSON {what} a checkpoint holds; {unusable}")
    return value


def load_checkpoint(accelerator, path: Path, scheduler) -> dict:
    """Restore accelerate state and the schedule from `path`; return the trainer state. A
    checkpoint that cannot be read is a UserError naming it."""
    unusable = (
        f"delete {path} to resume from the checkpoint before it, or start over in a new --output"
    )
    state = _read_json(path / STATE, "trainer state", unusable)
    if not all(isinstance(state.get(k), int) for k in ("step", "epoch", "next_batch")):
        raise UserError(f"{path / STATE}: step, epoch or next_batch missing; {unusable}")
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise UserError(
            f"{path}: holds {', '.join(pickles)}, a pickle that could run code when loaded and "
            f"that chatdistill never loads (an older version wrote it); {unusable}"
        )
    schedule = _read_json(path / SCHEDULER, "learning-rate schedule", unusable)
    try:
        # accelerate skips an RNG file it cannot read, which would quietly end bit-exact resumes.
        load(path / f"random_states_{accelerator.process_index}.pkl")  # weights_only=True
        accelerator.load_state(str(path))
        scheduler.load_state_dict(schedule)
    except Exception as e:  # torch, safetensors and accelerate raise many types for a bad file
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UserError(f"{path}: cannot be loaded ({reason}); {unusable}") from None
    return state


def save_final_model(model, tokenizer, output: Path) -> None:
    """save_pretrained into a temporary dir, then move each file into `output` with a rename."""
    tmp = output / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    tmp.rmdir()
