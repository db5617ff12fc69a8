"""The demo's recipe search: which way of training the cut student keeps most of the teacher.

On the demo's inputs (seed 0 by default: the same prompts, teacher answers, labelled rows, cache
and cut as `chatdistill demo`), trains the KD student under each recipe with the same budget of
conversations (`--budget`, 960: 60 steps of 16), then evaluates them all with the teacher on the
test split as the demo does (answer accuracy, held-out CE, top-1 agreement and KL on the
teacher's own answers). Each recipe is the demo's KD recipe (CE on the teacher's answers and the
labelled rows mixed with forward KL to the top-64 cache) with these changes:

  b16_lr5e-4     16 conversations per step, lr 5e-4 (the demo's recipe before this search)
  b16            16 per step, lr 1.5e-3
  b8             8 per step, lr 1.5e-3
  b4             4 per step, lr 1.5e-3
  b4_frozen      as b4, token embeddings (and the tied head) kept as the teacher's
  b2_frozen      2 per step, embeddings kept
  b4_frozen_ce0  as b4_frozen, forward KL alone (no CE)
  b4_frozen_seq  as b4_frozen, CE alone on the teacher's answers (sequence-level KD, no cache)
  b4_frozen_ce75 as b4_frozen, 0.75 CE + 0.25 forward KL

Reports each recipe's training wall time (run it on an idle machine) and its ratio to the first
recipe's. A recipe already trained in OUTPUT is reused. Writes bench/results/demo_recipes.json.

    python bench/demo_recipes.py [--recipes a,b] [--budget 960] [--output runs/demo-recipes]
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from chatdistill.allocator import keep_freed_memory  # noqa: E402
from chatdistill.config import load_distill_config  # noqa: E402
from chatdistill.demo.run import (  # noqa: E402
    EVAL_TOKENS,
    MAX_LENGTH,
    DemoConfig,
    kd_recipe,
    prepare_kd_inputs,
)
from chatdistill.distill.train import train  # noqa: E402
from chatdistill.evaluate.config import EvalConfig  # noqa: E402
from chatdistill.evaluate.run import evaluate  # noqa: E402

LR = 1.5e-3
# name: (conversations per step, trainer overrides, demo-config overrides)
RECIPES = {
    "b16_lr5e-4": (16, {"train.lr": 5e-4}, {}),
    "b16": (16, {"train.lr": LR}, {}),
    "b8": (8, {"train.lr": LR}, {}),
    "b4": (4, {"train.lr": LR}, {}),
    "b4_frozen": (4, {"train.lr": LR, "train.freeze_embeddings": True}, {}),
    "b2_frozen": (2, {"train.lr": LR, "train.freeze_embeddings": True}, {}),
    "b4_frozen_ce0": (4, {"train.lr": LR, "train.freeze_embeddings": True}, {"ce_weight": 0.0}),
    "b4_frozen_seq": (4, {"train.lr": LR, "train.freeze_embeddings": True}, {"ce_weight": 1.0}),
    "b4_frozen_ce75": (4, {"train.lr": LR, "train.freeze_embeddings": True}, {"ce_weight": 0.75}),
}


def recipe_overrides(base: DemoConfig, name: str, budget: int, out: Path) -> dict:
    """The trainer overrides of one recipe: the demo's KD recipe with the recipe's changes."""
    batch, train_over, demo_over = RECIPES[name]
    cfg = dataclasses.replace(base, **demo_over)
    steps = budget // batch
    recipe = kd_recipe(cfg, prepare_kd_inputs(cfg, lambda _msg: None))
    return {**recipe, **train_over, "output": str(out / name), "train.batch_size": batch,
            "train.max_steps": steps, "train.warmup_steps": max(1, steps // 20),
            "train.save_every": 0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--budget", type=int, default=960, help="conversations per recipe")
    ap.add_argument("--eval-samples", type=int, default=120)
    ap.add_argument("--output", default="runs/demo-recipes")
    args = ap.parse_args()
    keep_freed_memory()
    out = Path(args.output)
    base = DemoConfig(output=str(out), seed=args.seed)
    inputs = prepare_kd_inputs(base, lambda s: print(s, flush=True))
    rows = {}
    for name in args.recipes.split(","):
        timing = out / name / "bench_seconds.json"
        if timing.is_file():
            rows[name] = json.loads(timing.read_text())
            print(f"[{name}] reusing {out / name}")
            continue
        print(f"[{name}] training", flush=True)
        started = time.perf_counter()
        train(load_distill_config(None, recipe_overrides(base, name, args.budget, out)))
        rows[name] = {"train_seconds": time.perf_counter() - started}
        timing.write_text(json.dumps(rows[name]))
    results = evaluate(
        EvalConfig(
            teacher=str(inputs.teacher),
            students=[str(out / n) for n in rows],
            data=str(inputs.paths["test"]),
            output=str(out),
            max_samples=args.eval_samples,
            max_new_tokens=EVAL_TOKENS,
            batch_size=32,
            max_length=MAX_LENGTH,
            memory=False,
            model_cards=False,
            fidelity_on="teacher",
        )
    )
    teacher = results.teacher.quality
    print(f"\nteacher: accuracy {teacher.accuracy:.1f}%, held-out CE {teacher.ce:.3f}")
    print(f"{'recipe':14} {'steps':>5} {'accuracy %':>10} {'kept %':>7} {'CE':>6} {'agree %':>7} "
          f"{'KL':>6} {'train s':>7} {'x first':>7}")  # fmt: skip
    first = next(iter(rows.values()))["train_seconds"]
    for m in results.models[1:]:
        name, q, f = Path(m.path).name, m.quality, m.fidelity
        row = rows[name]
        row.update(steps=args.budget // RECIPES[name][0], accuracy=q.accuracy, ce=q.ce,
                   kept=100 * q.accuracy / teacher.accuracy, agreement=f.top1_agreement,
                   kl=f.kl)  # fmt: skip
        print(f"{name:14} {row['steps']:>5} {q.accuracy:>10.1f} {row['kept']:>7.1f} {q.ce:>6.3f} "
              f"{f.top1_agreement:>7.1f} {f.kl:>6.3f} {row['train_seconds']:>7.0f} "
              f"{row['train_seconds'] / first:>6.2f}x")  # fmt: skip
    dest = Path(__file__).parent / "results" / "demo_recipes.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seed": args.seed, "budget": args.budget, "teacher": dataclasses.asdict(teacher),
               "recipes": rows}  # fmt: skip
    dest.write_text(json.dumps(payload, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
