"""Atomic training checkpoints: write to a temporary directory, then rename; keep the last K.

A checkpoint holds what `accelerate` saves (model, optimizer, scheduler, RNG states) plus
`trainer_state.json` (step and data position). A directory without `trainer_state.json` was never
finished and is ignored, so a crash mid-write can never be resumed from.
"""

import json
import logging
import os
import shutil
from pathlib import Path

STATE = "trainer_state.json"

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


def save_checkpoint(accelerator, output: Path, step: int, state: dict, keep_last: int) -> Path:
    """Save accelerate state + trainer state atomically as checkpoints/step-N; prune old ones."""
    root = checkpoint_root(output)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
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


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore accelerate state from `path`; return the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE).read_text())


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
