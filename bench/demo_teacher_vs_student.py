"""Is the demo teacher worth distilling? It against a student-sized model trained the same way.

Trains the demo student's shape with the bundled teacher's own recipe
(`scripts/train_demo_teacher.py --shape student`: same data mix, steps, optimiser) for each seed
and the teacher's shape for the seeds after 0 (the bundled teacher is seed 0 of that recipe),
then scores every model on the validation and test splits: answer accuracy on the support
questions, held-out CE on all conversations, and how many held-out question wordings each
answers right at least half the time (accuracy moves a wording at a time: each wording is many
rows). Prints each model, then mean and spread per shape and whether the teacher wins by more
than the seed spread. Finished training runs in --work are reused, unfinished ones resume.
Writes bench/results/demo_teacher_vs_student.json.

    python bench/demo_teacher_vs_student.py [--seeds 0,1,2] [--work runs/teacher-vs-student]
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from chatdistill.data import load_rows
from chatdistill.demo.data import demo_asset_dir
from chatdistill.evaluate.answering import answer_all, text_quality
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.items import prepare_items
from chatdistill.evaluate.scores import answer_correct
from chatdistill.evaluate.token_scoring import score
from chatdistill.inference.engine import Engine

SPLITS = ("validation", "test")
METRICS = ("accuracy", "ce", "wordings")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo_teacher.py"


def model_dir(shape: str, seed: int, work: Path) -> Path:
    """The seed's model of one shape, trained (or resumed) here unless it is already finished."""
    if shape == "teacher" and seed == 0:
        return demo_asset_dir() / "teacher"
    run = work / f"{shape}-s{seed}"
    out = run / "model"
    if not (out / "model.safetensors").is_file():
        cmd = [sys.executable, str(SCRIPT), "--shape", shape, "--seed", str(seed),
               "--work", str(run), "--no-install"]  # fmt: skip
        subprocess.run(cmd, check=True)
    return out


def split_scores(engine: Engine, split: str) -> dict[str, float]:
    """Accuracy (%), CE and held-out wordings answered right at least half the time, on a split."""
    rows = load_rows(demo_asset_dir() / f"{split}.jsonl")
    items = prepare_items(rows, engine.tokenizer, 256, split)
    cfg = EvalConfig(teacher="", students=[], data="", output="", max_new_tokens=48,
                     batch_size=64, max_length=256)  # fmt: skip
    answers = answer_all(engine, [it.prompt for it in items], cfg)
    right, asked = Counter(), Counter()
    for row, it, a in zip(rows, items, answers, strict=True):
        if it.answer is not None:
            wording = row["wordings"][-1]
            asked[wording] += 1
            right[wording] += answer_correct(a, it.answer)
    examples = [it.example for it in items if it.example is not None]
    return {
        "accuracy": text_quality(answers, items)["accuracy"],
        "ce": score(engine.model, examples, 32, engine.tokenizer.pad_token_id).ce,
        "wordings": sum(2 * right[w] >= asked[w] for w in asked),
        "wordings_of": len(asked),
    }


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default="runs/teacher-vs-student")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    scores: dict[str, dict[int, dict[str, dict[str, float]]]] = {"teacher": {}, "student": {}}
    for shape in scores:
        for seed in seeds:
            engine = Engine.load(str(model_dir(shape, seed, work)))
            scores[shape][seed] = {s: split_scores(engine, s) for s in SPLITS}
            per = "  ".join(
                f"{s}: acc {r['accuracy']:.1f} CE {r['ce']:.3f} wordings "
                f"{r['wordings']}/{r['wordings_of']}"
                for s, r in scores[shape][seed].items()
            )
            size = engine.model.num_parameters() / 1e6
            print(f"{shape} ({size:.2f}M) seed {seed}: {per}", flush=True)
    summary: dict[str, dict] = {}
    print(f"\n{'split':11} {'metric':9} {'teacher':>16} {'student shape':>16} {'diff':>8}  clearly")
    for split in SPLITS:
        for metric in METRICS:
            t = _stats([scores["teacher"][s][split][metric] for s in seeds])
            st = _stats([scores["student"][s][split][metric] for s in seeds])
            better = st[0] - t[0] if metric == "ce" else t[0] - st[0]
            clearly = better > max(t[1], st[1])
            summary[f"{split}/{metric}"] = {
                "teacher": t, "student": st, "teacher_better_by": better, "clearly": clearly
            }  # fmt: skip
            d = 3 if metric == "ce" else 1
            print(f"{split:11} {metric:9} {t[0]:>9.{d}f} ± {t[1]:<4.{d}f} {st[0]:>9.{d}f} ± "
                  f"{st[1]:<4.{d}f} {better:>+8.{d}f}  {'yes' if clearly else 'no'}")  # fmt: skip
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_teacher_vs_student.json").write_text(
        json.dumps({"seeds": seeds, "scores": scores, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
