"""Edge exports in their own runtimes against the PyTorch model, on the demo's student:
ONNX Runtime GenAI (fp32, int8, int4) and llama.cpp (GGUF f16, q8_0, q4_0).

For the demo's KD student (runs/demo/kd_student, made by `make demo`), each precision is exported
(`export.onnx.export_onnx`, `export.gguf.export_gguf`) and checked with `export.check.run_check`
on the first --chats conversations of the demo's (grounded) test split: greedy answers of up to
48 tokens at batch 1 from PyTorch (the baseline, measured in the same call) and from the export in
its runtime. Reported per export: weights on disk, decode tokens/s (prefill included, as for
PyTorch) and its ratio to PyTorch's, identical answers, next-token agreement on the model's own
answers, and answer accuracy of both.

The GGUF files run in llama.cpp through `llama-cpp-python`, which PyPI has as source only: the
first `pip install llama-cpp-python` compiles llama.cpp (about 15 minutes on 2 cores; pip keeps
the wheel). Without it the GGUF rows are skipped with a note.

    python bench/export_speed.py [--chats 139] [--formats onnx,gguf]
        [--precisions fp32,int8,int4,f16,q8_0,q4_0] [--threads 2]

Writes bench/results/export_speed.json.
"""

import argparse
import importlib.util
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from chatdistill.data import load_rows, split_prompt_reference  # noqa: E402
from chatdistill.evaluate.probes import weights_size  # noqa: E402
from chatdistill.export.check import run_check  # noqa: E402
from chatdistill.export.gguf import GGUF_NAME, PRECISIONS, export_gguf  # noqa: E402
from chatdistill.export.onnx import check_export, export_onnx  # noqa: E402
from chatdistill.inference.engine import Engine  # noqa: E402
from chatdistill.inference.llama_cpp_draft import load_llama  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "export_speed.json"
ONNX_PRECISIONS = ("fp32", "int8", "int4")


class LlamaCppReader:
    """A GGUF file in llama.cpp (`export.check.ExportReader`): greedy answers from the model's
    own prompt ids, timed; next-token agreement from a second instance that keeps every
    position's logits (which the timed one does not compute)."""

    timed = True

    def __init__(self, path: Path, threads: int, engine: Engine) -> None:
        self.llm = load_llama(str(path), 1024, threads)
        self.scorer = load_llama(str(path), 1024, threads, logits_all=True)
        self.eos, self.tokenizer = engine.eos_token_ids, engine.tokenizer

    def answers(self, chats, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids = []
            for token in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0,
                                           repeat_penalty=1.0, reset=True):  # fmt: skip
                if token in self.eos:
                    break
                ids.append(token)
                if len(ids) == max_new_tokens:
                    break
            out.append(ids)
        return out

    def agreement(self, prompt: list[int], answer: list[int]) -> int:
        if not answer:
            return 0
        self.scorer.reset()
        self.scorer.eval(prompt + answer)
        predicted = self.scorer.scores[len(prompt) - 1 : len(prompt) + len(answer) - 1].argmax(-1)
        return int((predicted == answer).sum())

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_in_llama_cpp(model: Path, precision: str, work: Path, chats, answers, threads: int):
    """Export `model` to GGUF at `precision` and check it in llama.cpp."""
    out = export_gguf(model, work / f"gguf-{precision}", precision)
    engine = Engine.load(str(model), device="cpu")
    reader = LlamaCppReader(out / GGUF_NAME, threads, engine)
    return run_check(engine, reader, weights_size(model), (out / GGUF_NAME).stat().st_size,
                     chats, max_new_tokens=48, answers=answers)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chats", type=int, default=139, help="test conversations with an answer")
    ap.add_argument("--formats", default="onnx,gguf")
    ap.add_argument("--precisions", default="fp32,int8,int4,f16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and llama.cpp threads (ONNX Runtime uses its default)")  # fmt: skip
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

    formats = args.formats.split(",")
    if "gguf" in formats and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: GGUF rows skipped "
              "(pip install llama-cpp-python compiles llama.cpp, about 15 minutes)")  # fmt: skip
        formats.remove("gguf")
    runs = [(fmt, p) for p in args.precisions.split(",") for fmt in formats
            if p in (ONNX_PRECISIONS if fmt == "onnx" else PRECISIONS)]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, path in models.items():
            for fmt, precision in runs:
                if fmt == "gguf":
                    c = check_in_llama_cpp(path, precision, Path(work), chats, answers,
                                           args.threads)  # fmt: skip
                else:
                    out = export_onnx(path, Path(work) / f"onnx-{precision}", precision)
                    c = check_export(path, out, chats, max_new_tokens=48, answers=answers)
                runtime = "llama.cpp" if fmt == "gguf" else "ONNX Runtime GenAI"
                r = {"model": name, "runtime": runtime, "precision": precision, **c.as_dict()}
                del r["model_answers"], r["export_answers"]
                results.append(r)
                print(f"  {name} {precision}: {c.export_tokens_per_s:.0f} vs "
                      f"{c.model_tokens_per_s:.0f} tok/s")  # fmt: skip

    print(f"\n{len(chats)} test chats, greedy, up to 48 tokens, batch 1; baseline PyTorch fp32")
    head = ("model", "runtime", "export", "MB", "x smaller", "tok/s", "PyTorch", "x faster",
            "identical", "agree", "acc %", "PyTorch acc %")  # fmt: skip
    print("".join(f"{h:>19}" for h in head))
    for r in results:
        cells = (
            r["model"], r["runtime"], r["precision"], f"{r['export_bytes'] / 1e6:.1f}",
            f"{r['model_bytes'] / r['export_bytes']:.2f}", f"{r['export_tokens_per_s']:.0f}",
            f"{r['model_tokens_per_s']:.0f}",
            f"{r['export_tokens_per_s'] / r['model_tokens_per_s']:.2f}",
            f"{r['identical_answers']}/{r['chats']}", f"{r['token_agreement']:.1%}",
            f"{r['export_accuracy']:.1f}", f"{r['model_accuracy']:.1f}",
        )  # fmt: skip
        print("".join(f"{c:>19}" for c in cells))
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
