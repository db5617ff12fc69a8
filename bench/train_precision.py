"""Training step time of the demo's KD recipe in float32, in bf16 under plain autocast, and in
bf16 as chatdistill trains (`distill.autocast`: the frozen head cast once, attention in float32).

On the demo's inputs (its run directory's data, teacher cache and cut; the demo's stages run
first where that directory lacks them), each variant trains `--steps` optimizer steps of the
demo's KD student in a fresh subprocess, the variants taking turns `--repeats` times; each keeps
its fastest run, since other load only ever slows a run down. Reported: real tokens per second
over the steps after `--warmup` untimed ones (from the trainer's metrics.jsonl), the ratio to
float32, and the last step's loss (the variants agree to bf16's rounding).

bf16 pays only where the CPU multiplies bf16 fast (AMX, some AVX512-BF16 parts; `models.fast_bf16`
decides for the demo), and on a GPU.

    python bench/train_precision.py [--steps 40] [--warmup 5] [--repeats 2] [--threads 1]
        [--output runs/demo]

Writes bench/results/train_precision.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

VARIANTS = {
    "fp32": ("fp32", False),
    "bf16, plain autocast": ("bf16", False),
    "bf16, chatdistill": ("bf16", True),
}
RESULTS = Path(__file__).parent / "results" / "train_precision.json"


def child(args: argparse.Namespace) -> None:
    """Train one variant; print its steps' records as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from chatdistill.config import load_distill_config
    from chatdistill.demo.run import DemoConfig, kd_recipe, prepare_kd_inputs
    from chatdistill.distill import autocast, prepare
    from chatdistill.distill.train import train

    precision, ours = VARIANTS[args.child]
    if not ours:  # torch's autocast as it is: every cast at every use, bf16 attention
        prepare.use_fp32_attention = lambda _model: False
        autocast.FrozenHeadCast.__call__ = lambda _self, head, _device: head
    cfg = DemoConfig(output=args.output)
    with tempfile.TemporaryDirectory() as out:
        over = {**kd_recipe(cfg, prepare_kd_inputs(cfg, lambda _msg: None)), "output": out,
                "train.precision": precision, "train.max_steps": args.steps + args.warmup,
                "train.log_every": 1, "train.save_every": 0, "data.validation": None}  # fmt: skip
        train(load_distill_config(None, over))
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    print("RECORDS " + json.dumps([json.loads(line) for line in lines]))


def run_variant(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--output", args.output]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    records = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RECORDS "))[8:])
    timed = [r for r in records if "tokens_per_s" in r][args.warmup :]
    # Each record is one step (its real tokens over its wall time); every variant draws the same
    # batches in the same order, so their means compare.
    rate = sum(r["tokens_per_s"] for r in timed) / len(timed)
    return {"tokens_per_s": rate, "loss": timed[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default="runs/demo", help="the demo run whose inputs are used")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in VARIANTS:
            run = run_variant(name, args)
            if name not in best or run["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = run
    base = best["fp32"]["tokens_per_s"]
    print(f"\n{'variant':22} {'tokens/s':>9} {'vs fp32':>8} {'last loss':>9}")
    for name, r in best.items():
        print(f"{name:22} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['loss']:>9.4f}")  # fmt: skip
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__}  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {"steps": args.steps, "runs": best, "machine": machine}
    RESULTS.write_text(json.dumps(payload, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
