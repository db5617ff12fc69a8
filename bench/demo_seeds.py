"""The demo over several seeds: does the KD student keep the teacher's accuracy, and beat SFT?

Runs `chatdistill demo` (its defaults unless flags say otherwise) once per seed; the seed draws
the labelled subset and seeds training, the teacher and its prompts stay the same. Stages a
previous run finished are reused (copy `runs/demo` to `OUTPUT/seed-0` to reuse `make demo`; with
`--reuse-results` its evaluation too).
Prints, per seed and as mean and spread (max - min): answer accuracy of the teacher, the KD
student, (a) the untrained cut and (b) SFT on the labelled rows; the share of the teacher's
accuracy the KD student keeps; top-1 agreement with the teacher on its own answers; and decode
speed at batch 1 as a multiple of the teacher's.

    python bench/demo_seeds.py [--seeds 0,1,2] [--output runs/bench-demo-seeds] [--steps N]
        [--ce-weight W]

A finished seed leaves its figures in OUTPUT/seed-N/seed_figures.json and is not run again, so
seeds can run in separate processes (`--seeds 1 --threads 1` beside `--seeds 2 --threads 1`)
and a last call with every seed gathers them.

Writes bench/results/demo_seeds.json.
"""

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from chatdistill.demo.run import DemoConfig, run_demo  # noqa: E402
from chatdistill.evaluate.result import EvalResult  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "demo_seeds.json"
MODELS = {"teacher": "teacher", "kd_student": "KD", "baseline_cut_untrained": "(a) cut",
          "baseline_sft_labelled": "(b) SFT"}  # fmt: skip


def measure(results) -> dict:
    by_name = {m.name: m for m in results.models}
    teacher = results.teacher
    out = {}
    for name, label in MODELS.items():
        m = teacher if name == "teacher" else by_name[name]
        speed = m.cost.decode_tokens_per_s_batch1 / teacher.cost.decode_tokens_per_s_batch1
        out[label] = {
            "accuracy": m.quality.accuracy,
            "agreement": None if m.fidelity is None else m.fidelity.top1_agreement,
            "kl": None if m.fidelity is None else m.fidelity.kl,
            "speed_x": speed,
        }
    out["KD"]["kept"] = 100 * out["KD"]["accuracy"] / out["teacher"]["accuracy"]
    return out


def share_answers(root: Path, out: Path) -> None:
    """Give a seed's run the teacher's answers another seed's run made (greedy, seed-free): the
    demo checks their settings and prompts, and answers again if they differ."""
    name = "data/teacher_answers.jsonl"
    done = [d for d in sorted(root.glob("seed-*")) if (d / f"{name}.generate.json").is_file()]
    if done and not (out / name).exists():
        (out / "data").mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".generate.json"):
            shutil.copyfile(done[0] / f"{name}{suffix}", out / f"{name}{suffix}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--output", default="runs/bench-demo-seeds")
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument(
        "--ce-weight",
        type=float,
        default=DemoConfig.ce_weight,
        help="the KD student's CE share (the rest: forward KL to the cache)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reuse-results",
        action="store_true",
        help="take a seed's figures from its finished demo's results.json (e.g. `make demo`'s "
        "runs/demo copied to OUTPUT/seed-0 with the same settings) instead of running it",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    settings = {"steps": args.steps, "ce_weight": args.ce_weight}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.output) / f"seed-{seed}"
        done = out / "seed_figures.json"  # one seed's figures, for a later call to gather
        stored = json.loads(done.read_text()) if done.is_file() else {}
        if stored and all(stored.get(k) == v for k, v in settings.items()):
            runs[seed] = stored["figures"]
            print(f"seed {seed}: figures from {done}")
            continue
        finished = out / "results.json"
        if args.reuse_results and finished.is_file():
            runs[seed] = measure(EvalResult.from_json(json.loads(finished.read_text())))
            print(f"seed {seed}: figures from {finished}")
        else:
            share_answers(Path(args.output), out)
            cfg = DemoConfig(output=str(out), seed=seed, steps=args.steps, ce_weight=args.ce_weight)
            runs[seed] = measure(run_demo(cfg, say=lambda msg: print(msg, flush=True)))
        done.write_text(json.dumps({**settings, "figures": runs[seed]}))

    cols = [("teacher", "accuracy"), ("KD", "accuracy"), ("KD", "kept"), ("(a) cut", "accuracy"),
            ("(b) SFT", "accuracy"), ("KD", "agreement"), ("(b) SFT", "agreement"),
            ("KD", "speed_x")]  # fmt: skip
    print("\nseed  " + "  ".join(f"{m} {k}"[:16].rjust(16) for m, k in cols))
    for seed, r in runs.items():
        print(f"{seed:<6}" + "  ".join(f"{r[m][k]:16.2f}" for m, k in cols))
    summary = {}
    for m, k in cols:
        vals = [r[m][k] for r in runs.values()]
        summary[f"{m} {k}"] = {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals)}
    print("mean  " + "  ".join(f"{summary[f'{m} {k}']['mean']:16.2f}" for m, k in cols))
    print("spread" + "  ".join(f"{summary[f'{m} {k}']['spread']:16.2f}" for m, k in cols))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__}  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({**settings, "runs": runs, "summary": summary, "machine": machine}, indent=1)
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
