"""The demo's long stages that a rerun reuses: its trainings (two at once on a CPU) and the
evaluation.

Each is reused while what it was made from is the same by content (the teacher's fingerprint,
the data files' hashes, the teacher cache's settings, the trained models' fingerprints) and its
settings are the same apart from paths: a run directory moved or copied elsewhere, or a moved
checkout (which moves the shipped adapter), is the same run and is not made again.
"""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from chatdistill import __version__, atomic
from chatdistill.distill.cache import SETTINGS as CACHE_SETTINGS
from chatdistill.distill.cache import read_meta
from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.distill.outputs import RECIPE, SOURCES, flatten
from chatdistill.errors import UserError
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.result import EvalResult
from chatdistill.hashing import file_sha256

STAMP = "demo_inputs.json"
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


def _reusable(name: str, out: Path, overrides: dict, key: dict, say) -> bool:
    """True when out/name is finished with these settings from these inputs (`key`); a stage
    made otherwise is removed, one moved here gets its recipe pointed at the new paths."""
    import yaml

    from chatdistill.config import load_distill_config, save_config

    model_dir = out / name
    cfg = load_distill_config(None, {**overrides, "output": str(model_dir)})
    saved, stamp = model_dir / RECIPE, model_dir / STAMP
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
        return True
    return False


def _train_now(name: str, out: Path, overrides: dict, key: dict) -> Path:
    """Train out/name (resuming its checkpoint, if any); drop the checkpoints when done."""
    from chatdistill.config import load_distill_config
    from chatdistill.distill.train import train

    model_dir = out / name
    cfg = load_distill_config(None, {**overrides, "output": str(model_dir)})
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(model_dir / STAMP, json.dumps(key))
    out_dir = train(cfg, resume=(model_dir / "checkpoints").is_dir(), resume_hint=None)
    # Checkpoints only serve a resume; a finished stage is reused from its final model.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir


def train_stages(stages: list[tuple[str, dict]], out: Path, say) -> list[Path]:
    """Run each (name, overrides) training into out/name, or reuse it. On a CPU with two or more
    threads to give, two trainings run at once, the second in a child process, each on half the
    threads: on 2 cores the demo's two trainings took 14:01 together against 21:57 one after the
    other (small models use two threads poorly)."""
    keyed = [(name, overrides, _inputs_key(overrides)) for name, overrides in stages]
    todo = [(n, o, k) for n, o, k in keyed if not _reusable(n, out, o, k, say)]
    threads = torch.get_num_threads()
    side_by_side = len(todo) == 2 and threads >= 2 and not torch.cuda.is_available()
    child = _start_beside(todo[1], out, threads // 2, todo[0][0], say) if side_by_side else None
    try:
        for name, overrides, key in todo[:1] if child else todo:
            say(f"[{name}] training" + (f" on {_threads(threads - threads // 2)}" * bool(child)))
            if child:
                torch.set_num_threads(threads - threads // 2)
            _train_now(name, out, overrides, key)
            say(_done_line(name))
        if child:
            child.wait_done(say)
    finally:
        torch.set_num_threads(threads)
        if child:
            child.stop()  # no-op once it has finished
    return [out / name for name, _ in stages]


def _done_line(name: str) -> str:
    return f"[{name}] done; the demo removed its checkpoints (a finished stage needs none)"


class _Beside:
    """A training in a child process (`python -m chatdistill.demo.stages`), its output in
    out/NAME.log. It gets its own session, so a Ctrl-C reaches this process only, which then
    interrupts it once (it saves a checkpoint, as a training does on Ctrl-C); it is interrupted
    too if this process dies (`_interrupt_when_parent_dies`)."""

    def __init__(self, name: str, out: Path, overrides: dict, key: dict, threads: int) -> None:
        self.name, self.log = name, out / f"{name}.log"
        self.metrics, self.steps = out / name / "metrics.jsonl", overrides["train.max_steps"]
        args = {"name": name, "out": str(out), "overrides": overrides, "key": key,
                "parent": os.getpid()}  # fmt: skip
        src = str(Path(__file__).resolve().parents[2])  # importable as this one, even uninstalled
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
        with self.log.open("w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatdistill.demo.stages", json.dumps(args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def step(self) -> str:
        """The last logged step of the child's training, as `step N/STEPS` (or `starting`)."""
        try:
            last = self.metrics.read_text(encoding="utf-8").splitlines()[-1]
            return f"step {json.loads(last)['step']}/{self.steps}"
        except (OSError, IndexError, ValueError, KeyError):
            return "starting"

    def wait_done(self, say, every: float = 30.0) -> None:
        """Wait for the child, saying its step every `every` seconds; a failure is a UserError
        with its last line."""
        said = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - said >= every:
                said = time.monotonic()
                say(f"[{self.name}] {self.step()}")
            time.sleep(0.5)
        if self.proc.returncode != 0:
            lines = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            last = lines[-1] if lines else "no output"
            raise UserError(
                f"[{self.name}] training failed (exit {self.proc.returncode}): {last}; its log: "
                f"{self.log}"
            )
        say(_done_line(self.name))

    def stop(self) -> None:
        """Interrupt the child if it still runs and wait for it to save its checkpoint."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait()


def _start_beside(stage: tuple, out: Path, threads: int, first: str, say) -> _Beside:
    name, overrides, key = stage
    child = _Beside(name, out, overrides, key, threads)
    say(f"[{name}] training beside {first}, on {_threads(threads)}; progress: {child.log}")
    return child


def _threads(n: int) -> str:
    return f"{n} thread{'s' * (n > 1)}"


def _interrupt_when_parent_dies(parent: int) -> None:
    """In the child: a SIGINT when the parent dies (Linux; elsewhere nothing), and one now if it
    died before this was set."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise KeyboardInterrupt


def _eval_key(cfg: EvalConfig) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in EVAL_PATHS}
    models = [teacher_fingerprint(p) for p in [cfg.teacher, *cfg.students]]
    key = {"settings": settings, "models": models, "data": file_sha256(cfg.data)}
    key["chatdistill"] = __version__  # another version may measure otherwise
    return json.loads(json.dumps(key))  # as it reads back from the stamp (tuples as lists)


def eval_stage(cfg: EvalConfig, say) -> EvalResult:
    """Evaluate, or reuse cfg.output/results.json when this version of chatdistill wrote it for
    the same models, test data and settings."""
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


def _child_main(argv: list[str]) -> int:
    """The training `train_stages` runs beside another one: exit 0 when done, 2 on a user error
    (its line last in the log), 130 when interrupted (after the checkpoint is saved)."""
    args = json.loads(argv[0])
    try:
        _interrupt_when_parent_dies(args["parent"])
        _train_now(args["name"], Path(args["out"]), args["overrides"], args["key"])
    except UserError as e:
        print(f"error: {e}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
