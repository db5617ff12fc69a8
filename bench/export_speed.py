"""Edge export: ONNX Runtime GenAI (fp32, int8, int4) vs the PyTorch model, on the demo's student.

For the demo's KD student (runs/demo/kd_student, made by `make demo`), each precision is exported
with `export.onnx.export_onnx` and checked with `check_export` on the first --chats
conversations of the demo's (grounded) test split: greedy answers of up to 48 tokens at
batch 1 from PyTorch (the baseline, measured in the same call) and from the export. Reported per
export: weights on disk, decode tokens/s and its ratio to PyTorch's, identical answers, next-token
agreement on the model's own answers, and answer accuracy of both.

    python bench/export_speed.py [--chats 139] [--precisions fp32,int8,int4] [--threads 2]

Writes bench/results/export_speed.json.
"""

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from chatdistill.data import load_rows, split_prompt_reference  # noqa: E402
from chatdistill.export.onnx import check_export, export_onnx  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "export_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chats", type=int, default=139, help="test conversations with an answer")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (ORT uses its default)")
    ap.add_argument("--demo", default="runs/demo", help="the output of `make demo`")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    student, test = Path(args.demo, "kd_student"), Path(args.demo, "data", "test.jsonl")
    if not (student / "config.json").is_file() or not test.is_file():
        print(f"{student}: not found; run `make demo` first (nothing to export)")
        return
    rows = [r for r in load_rows(test) if r.get("answer")][: args.chats]
    chats = [split_prompt_reference(r["messages"])[0] for r in rows]
    answers = [r["answer"] for r in rows]
    models = {"KD student": student}

    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, path in models.items():
            for precision in args.precisions.split(","):
                out = export_onnx(path, Path(work) / f"{name}-{precision}".replace(" ", "_"),
                                  precision)  # fmt: skip
                c = check_export(path, out, chats, max_new_tokens=48, answers=answers)
                r = {"model": name, "precision": precision, **c.as_dict()}
                del r["model_answers"], r["export_answers"]
                results.append(r)
                print(f"  {name} {precision}: {c.export_tokens_per_s:.0f} vs "
                      f"{c.model_tokens_per_s:.0f} tok/s")  # fmt: skip

    print(f"\n{len(chats)} test chats, greedy, up to 48 tokens, batch 1; baseline PyTorch fp32")
    head = ("model", "export", "MB", "x smaller", "tok/s", "PyTorch", "x faster", "identical",
            "agree", "acc %", "PyTorch acc %")  # fmt: skip
    print("".join(f"{h:>14}" for h in head))
    for r in results:
        cells = (
            r["model"], r["precision"], f"{r['export_bytes'] / 1e6:.1f}",
            f"{r['model_bytes'] / r['export_bytes']:.2f}", f"{r['export_tokens_per_s']:.0f}",
            f"{r['model_tokens_per_s']:.0f}",
            f"{r['export_tokens_per_s'] / r['model_tokens_per_s']:.2f}",
            f"{r['identical_answers']}/{r['chats']}", f"{r['token_agreement']:.1%}",
            f"{r['export_accuracy']:.1f}", f"{r['model_accuracy']:.1f}",
        )  # fmt: skip
        print("".join(f"{c:>14}" for c in cells))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "chats": len(chats), "runs": results},
                                  indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
