"""Which distillation recipe keeps most of the demo teacher: off-policy, sequence-level, on-policy.

On the demo's data (seed 0 by default: the same labelled subset, prompts and teacher answers as
`chatdistill demo`), trains the demo's student shape with the same step budget under each recipe:

  offpolicy_t2   forward KL at T=2 mixed half and half with CE, from a top-32 cache (the classic
                 Hinton mix; the demo's first default)
  offpolicy_t1   forward KL at T=1 with CE weight 0.8, from a top-32 cache
  jsd            generalised JSD (beta 0.5) at T=1 alone, no CE, from the same top-32 cache
  seqkd          CE only on the teacher's greedy answers + the labelled rows (sequence-level KD)
  onpolicy       live teacher; a quarter of the steps on the student's own samples (forward KL
                 at T=1), the rest as offpolicy_t1 on reference answers

then evaluates all of them and the teacher on the test split (answer accuracy, held-out CE) and
reports each recipe's training wall time (the cost; the teacher's answers and caches are made
once beforehand and timed separately). Writes bench/results/demo_recipes.json.

    python bench/demo_recipes.py [--seed 0] [--steps N] [--recipes a,b] [--output runs/demo-recipes]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from chatdistill.config import load_distill_config
from chatdistill.demo.run import DemoConfig, kd_recipe, prepare_kd_inputs
from chatdistill.distill.train import train
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.run import evaluate

RECIPES = {
    "offpolicy_t2": {"temperature": 2.0, "ce_weight": 0.5},
    "offpolicy_t1": {"temperature": 1.0, "ce_weight": 0.8},
    "jsd": {"temperature": 1.0, "ce_weight": 0.0, "divergence": "jsd"},
    "seqkd": {"ce_weight": 1.0},
    "onpolicy": {"temperature": 1.0, "ce_weight": 0.8, "on_policy": 0.25},
}


def overrides(base: DemoConfig, name: str, out: Path, say) -> tuple[dict, float]:
    """The recipe's trainer overrides and the seconds spent making its inputs (cache)."""
    spec = dict(RECIPES[name])
    on_policy = spec.pop("on_policy", 0.0)
    cfg = dataclasses.replace(base, **spec)
    started = time.perf_counter()
    inputs = prepare_kd_inputs(cfg, say)
    prep = time.perf_counter() - started
    recipe = {**kd_recipe(cfg, inputs), "output": str(out / name)}
    if on_policy:  # the live teacher scores the student's samples: no cache
        recipe.pop("teacher_cache")
        recipe.update({"teacher": str(inputs.teacher), "on_policy.fraction": on_policy,
                       "on_policy.max_new_tokens": 48})  # fmt: skip
    return recipe, prep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--output", default="runs/demo-recipes")
    args = ap.parse_args()
    out = Path(args.output)
    base = DemoConfig(output=str(out), seed=args.seed, steps=args.steps)
    say = lambda s: print(s, flush=True)  # noqa: E731
    rows = {}
    for name in args.recipes.split(","):
        recipe, prep = overrides(base, name, out, say)
        say(f"[{name}] training")
        started = time.perf_counter()
        train(load_distill_config(None, recipe))
        rows[name] = {"train_seconds": time.perf_counter() - started, "prep_seconds": prep}
    inputs = prepare_kd_inputs(base, say)
    results = evaluate(
        EvalConfig(
            teacher=str(inputs.teacher),
            students=[str(out / n) for n in rows],
            data=str(inputs.paths["test"]),
            output=str(out),
            max_samples=args.eval_samples,
            max_new_tokens=48,
            batch_size=32,
            max_length=256,
            memory=False,
            model_cards=False,
        )
    )
    by_name = {Path(m.path).name: dataclasses.asdict(m.quality) for m in results.models[1:]}
    t = dataclasses.asdict(results.teacher.quality)
    print(f"\nteacher: accuracy {t['accuracy']:.1f}%, held-out CE {t['ce']:.3f}")
    print(
        f"{'recipe':14} {'accuracy %':>10} {'kept %':>7} {'CE':>7} {'train s':>8} {'vs seqkd':>9}"
    )
    base_s = rows.get("seqkd", next(iter(rows.values())))["train_seconds"]
    for name, row in rows.items():
        q = by_name[name]
        row.update(accuracy=q["accuracy"], ce=q["ce"], kept=100 * q["accuracy"] / t["accuracy"])
        print(
            f"{name:14} {q['accuracy']:>10.1f} {row['kept']:>7.1f} {q['ce']:>7.3f} "
            f"{row['train_seconds']:>8.0f} {row['train_seconds'] / base_s:>8.2f}x"
        )
    dest = Path("bench/results/demo_recipes.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seed": args.seed, "steps": args.steps, "teacher": t, "recipes": rows}
    dest.write_text(json.dumps(payload, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
