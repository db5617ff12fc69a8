"""The demo's claim over seeds: does the KD student keep the teacher's accuracy and beat SFT?

Runs `chatdistill demo` for several seeds (the seed picks the labelled subset and seeds every
training run), then prints mean and spread of answer accuracy and held-out CE for the teacher, the
KD student and both baselines, the KD student's share of the teacher's accuracy, and whether it
beats baseline (a) by more than the seed spread. Writes bench/results/demo_seeds.json.

    python bench/demo_seeds.py [--seeds 0,1,2] [--steps 1200] [--output runs/demo-seeds]
"""

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from chatdistill.demo.run import DemoConfig, run_demo
from chatdistill.evaluate.result import EvalResult

ROLES = {
    "teacher": "teacher",
    "kd_student": "KD student",
    "baseline_sft_labelled": "(a) SFT labelled only",
    "baseline_sft_all": "(b) SFT all labels",
}


def _by_name(results: EvalResult) -> dict[str, dict]:
    out = {}
    for m in results.models:
        key = "teacher" if m.role == "teacher" else Path(m.path).name
        out[key] = asdict(m.quality)
    return out


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--output", default="runs/demo-seeds")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        cfg = DemoConfig(output=f"{args.output}/seed-{seed}", seed=seed, steps=args.steps,
                         eval_samples=args.eval_samples)  # fmt: skip
        per_seed[seed] = _by_name(run_demo(cfg, say=lambda s: print(s, flush=True)))
    table = {}
    print(f"\n{'model':24} {'accuracy % (mean ± sd)':>24} {'held-out CE (mean ± sd)':>25}")
    for key, label in ROLES.items():
        acc = _stats([per_seed[s][key]["accuracy"] for s in seeds])
        ce = _stats([per_seed[s][key]["ce"] for s in seeds])
        table[key] = {"accuracy": acc, "ce": ce}
        print(f"{label:24} {acc[0]:>15.1f} ± {acc[1]:<6.1f} {ce[0]:>16.3f} ± {ce[1]:<6.3f}")
    kd, a, t = table["kd_student"], table["baseline_sft_labelled"], table["teacher"]
    kept = [per_seed[s]["kd_student"]["accuracy"] / per_seed[s]["teacher"]["accuracy"] * 100
            for s in seeds]  # fmt: skip
    spread_acc = max(kd["accuracy"][1], a["accuracy"][1])
    spread_ce = max(kd["ce"][1], a["ce"][1])
    verdict = {
        "kd_keeps_pct_of_teacher_accuracy": _stats(kept),
        "kd_minus_a_accuracy": kd["accuracy"][0] - a["accuracy"][0],
        "beats_a_on_accuracy_by_more_than_spread": kd["accuracy"][0] - a["accuracy"][0]
        > spread_acc,
        "a_minus_kd_ce": a["ce"][0] - kd["ce"][0],
        "beats_a_on_ce_by_more_than_spread": a["ce"][0] - kd["ce"][0] > spread_ce,
        "kd_minus_b_accuracy": kd["accuracy"][0] - table["baseline_sft_all"]["accuracy"][0],
        "teacher_accuracy": t["accuracy"],
    }
    print(
        f"\nKD keeps {verdict['kd_keeps_pct_of_teacher_accuracy'][0]:.1f}% of the teacher's "
        f"accuracy; beats (a) by {verdict['kd_minus_a_accuracy']:+.1f} points "
        f"(spread {spread_acc:.1f}) and by {verdict['a_minus_kd_ce']:+.3f} nats of CE "
        f"(spread {spread_ce:.3f}); vs (b): {verdict['kd_minus_b_accuracy']:+.1f} points"
    )
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_seeds.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "steps": args.steps,
                "per_seed": per_seed,
                "table": table,
                "verdict": verdict,
            },
            indent=2,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
