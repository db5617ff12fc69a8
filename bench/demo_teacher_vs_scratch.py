"""What the pretrained teacher adds: the demo's adapted teacher against models of the student's
shape trained from scratch on the same data with the same budget.

The teacher is SmolLM2-135M-Instruct with the shipped support-desk adapter, made by
`scripts/train_teacher_adapter.py` (160 steps of 8 grounded train rows). Each scratch model has
the demo student's shape (the teacher's config with --layers layers, freshly initialised) and
is trained with chatdistill's SFT mode on the same rows, steps and batch size, once per seed.
All are evaluated on the grounded test split (held-out question wordings): answer accuracy and
held-out CE, with mean and spread (max - min) over the seeds.

    python bench/demo_teacher_vs_scratch.py [--seeds 0,1,2] [--steps 160] [--batch-size 8]
        [--lr 1e-3] [--layers 10] [--eval-samples 200] [--output runs/bench-teacher-vs-scratch]

Writes bench/results/demo_teacher_vs_scratch.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from chatdistill.config import load_distill_config  # noqa: E402
from chatdistill.data import load_rows  # noqa: E402
from chatdistill.demo.data import demo_asset_dir, jsonl_text  # noqa: E402
from chatdistill.demo.grounding import ground_row  # noqa: E402
from chatdistill.demo.run import MAX_LENGTH, TEACHER_ADAPTER  # noqa: E402
from chatdistill.distill.train import train  # noqa: E402
from chatdistill.evaluate.config import EvalConfig  # noqa: E402
from chatdistill.evaluate.run import evaluate  # noqa: E402
from chatdistill.models import fast_bf16, resolve  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "demo_teacher_vs_scratch.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs/bench-teacher-vs-scratch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    teacher = str(demo_asset_dir() / TEACHER_ADAPTER)

    data = {}
    for split in ("train", "test"):
        rows = [ground_row(r) for r in load_rows(demo_asset_dir() / f"{split}.jsonl")]
        data[split] = out / f"{split}.jsonl"
        data[split].write_text(jsonl_text(rows), encoding="utf-8")
    config = AutoConfig.from_pretrained(resolve(teacher, "teacher").path)
    config.num_hidden_layers = args.layers
    config.save_pretrained(out / "student_config")

    students, seconds = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        model_dir = out / f"scratch-seed-{seed}"
        students.append(str(model_dir))
        if (model_dir / "train_summary.json").is_file():
            continue
        recipe = load_distill_config(None, {
            "output": str(model_dir), "student_config": str(out / "student_config"),
            "tokenizer": teacher, "data.train": str(data["train"]), "loss.kind": "sft",
            "data.max_length": MAX_LENGTH, "train.max_steps": args.steps,
            "train.batch_size": args.batch_size, "train.lr": args.lr,
            "train.warmup_steps": max(1, args.steps // 20), "train.min_lr_ratio": 0.05,
            "train.eval_every": 0, "train.save_every": 1000, "train.seed": seed,
            "train.precision": "bf16" if fast_bf16() else "fp32",
        })  # fmt: skip
        started = time.monotonic()
        train(recipe)
        seconds[seed] = time.monotonic() - started

    results = evaluate(EvalConfig(
        teacher=teacher, students=students, data=str(data["test"]), output=str(out / "eval"),
        max_samples=args.eval_samples, max_new_tokens=64, batch_size=32, max_length=MAX_LENGTH,
        memory=False, model_cards=False,
    ), say=print)  # fmt: skip
    rows = [(m.name, m.quality.accuracy, m.quality.ce) for m in results.models]
    print(f"\n{'model':24s} {'accuracy %':>11s} {'held-out CE':>12s}")
    for name, acc, ce in rows:
        print(f"{name:24s} {acc:11.1f} {ce:12.3f}")
    scratch = [acc for name, acc, _ in rows[1:]]
    spread = max(scratch) - min(scratch)
    margin = rows[0][1] - max(scratch)
    print(f"scratch mean {sum(scratch) / len(scratch):.1f}, spread {spread:.1f}; "
          f"teacher ahead of the best seed by {margin:.1f} points")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "models": [{"name": n, "accuracy": a, "ce": c} for n, a, c in rows],
        "scratch_spread": spread, "teacher_margin_over_best_scratch": margin,
        "train_seconds": seconds, "settings": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }, indent=1))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
