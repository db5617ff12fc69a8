"""The demo's two long stages that a rerun reuses: a training and the evaluation.

Each is reused while what it was made from is the same by content (the teacher's fingerprint,
the data files' hashes, the teacher cache's settings, the trained models' fingerprints) and its
settings are the same apart from paths: a run directory moved or copied elsewhere, or a moved
checkout (which moves the shipped adapter), is the same run and is not made again.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from chatdistill import atomic
from chatdistill.distill.cache import SETTINGS as CACHE_SETTINGS
from chatdistill.distill.cache import read_meta
from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.distill.outputs import RECIPE, SOURCES, flatten
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.result import EvalResult
from chatdistill.hashing import file_sha256

EVAL_STAMP = "eval_inputs.json"
EVAL_PATHS = ("output", "teacher", "students", "data")


def _done(model_dir: Path) -> bool:
    return (model_dir / "train_summary.json").is_file() and (
        model_dir / "model.safetensors"
    ).exists()


def _inputs_key(overrides: dict) -> dict:
    """What a training learns from, by content: the teacher, its data files and what its
    teacher cache holds."""
    key = {
        "teacher": teacher_fingerprint(overrides["teacher"]),
        "train": file_sha256(overrides["data.train"]),
        "validation": file_sha256(overrides["data.validation"]),
    }
    if overrides.get("teacher_cache"):
        meta = read_meta(overrides["teacher_cache"])
        key["cache"] = {k: meta[k] for k in CACHE_SETTINGS}
    return key


def _without_paths(recipe: dict) -> dict:
    """The recipe less the paths it names (`_inputs_key` covers what they hold)."""
    return {k: v for k, v in flatten(recipe).items() if k not in (*SOURCES, "output")}


def train_stage(name: str, out: Path, overrides: dict, say) -> Path:
    """Run one training into out/name, or reuse it (finished) or resume it (interrupted) when it
    was made with the same settings from the same inputs."""
    import yaml

    from chatdistill.config import load_distill_config, save_config
    from chatdistill.distill.train import train

    model_dir = out / name
    cfg = load_distill_config(None, {**overrides, "output": str(model_dir)})
    saved, stamp = model_dir / RECIPE, model_dir / "demo_inputs.json"
    key = _inputs_key(overrides)
    if saved.is_file():
        text = saved.read_text(encoding="utf-8")
        old = yaml.safe_load(text)
        same_inputs = stamp.is_file() and json.loads(stamp.read_text()) == key
        if not same_inputs or _without_paths(old) != _without_paths(cfg.model_dump()):
            say(f"[{name}] settings or data changed since the last run; training it again")
            shutil.rmtree(model_dir)
        elif old != cfg.model_dump():  # the same run, moved: its recipe names the new paths
            notes = [line[2:] for line in text.splitlines() if line.startswith("# ")]
            save_config(cfg, saved, notes)
    if _done(model_dir):
        say(f"[{name}] reusing {model_dir}")
        return model_dir
    say(f"[{name}] training")
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(stamp, json.dumps(key))
    out_dir = train(cfg, resume=(model_dir / "checkpoints").is_dir())
    # Checkpoints only serve a resume; a finished stage is reused from its final model.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    say(f"[{name}] done; the demo removed its checkpoints (a finished stage needs none)")
    return out_dir


def _eval_key(cfg: EvalConfig) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in EVAL_PATHS}
    models = [teacher_fingerprint(p) for p in [cfg.teacher, *cfg.students]]
    key = {"settings": settings, "models": models, "data": file_sha256(cfg.data)}
    return json.loads(json.dumps(key))  # as it reads back from the stamp (tuples as lists)


def eval_stage(cfg: EvalConfig, say) -> EvalResult:
    """Evaluate, or reuse cfg.output/results.json when it was written for the same models, test
    data and settings."""
    from chatdistill.evaluate.run import evaluate

    out = Path(cfg.output)
    stamp, results = out / EVAL_STAMP, out / "results.json"
    key = _eval_key(cfg)
    if stamp.is_file() and results.is_file() and json.loads(stamp.read_text()) == key:
        say(
            f"[eval] reusing {results} (same models, data and settings; delete it to measure again)"
        )
        return EvalResult.from_json(json.loads(results.read_text(encoding="utf-8")))
    stamp.unlink(missing_ok=True)  # results.json is rewritten below: no stamp until it is
    say("[eval] teacher, KD student and both baselines on the test split")
    done = evaluate(cfg, say=lambda msg: say(f"[eval] {msg}"))
    atomic.write_text(stamp, json.dumps(key))
    return done
