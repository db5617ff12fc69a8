"""Speculative decoding: the teacher alone against the teacher with each draft (`--draft`).

For every draft and draft length k the teacher answers the same chat prompts greedily (end of
sequence on, so the answers are real ones), one at a time (batch 1, where speculation runs) and
`--concurrency` at a time (continuous batching, where it runs only for a lone last row). Columns:
decode tokens/s at batch 1 (tokens after the first / time after the first, summed over prompts),
its ratio to the teacher alone measured in the same run, the mean time to the first token (the
draft reads the prompt then, beside the teacher), whole answers' speed-up at batch 1 (the teacher
alone's total answer time / this one's, prefill included), the draft's acceptance rate (accepted /
drafted tokens at batch 1), tokens/s under concurrent load (all tokens / wall time, prefills
included) and whether every greedy answer is token for token the teacher's alone. Every
configuration runs once per round, `--repeats` rounds, best time kept: load on the machine only
ever slows a run down, and interleaving spreads drift over all of them alike.

    python bench/speculative_speed.py TEACHER DRAFT [DRAFT ...] [--draft-tokens 2 4 6]
        [--data chat.jsonl] [--prompts 16] [--new-tokens 128] [--concurrency 8]
        [--device cuda] [--dtype bfloat16] [--repeats 3] [--int8] [--output results.json]

TEACHER and each DRAFT: a model directory, GGUF file or `hf:org/name`. Prompts default to the
bundled demo test set. Writes bench/results/speculative_speed.json unless --output says otherwise.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatdistill.openmp import limit_openmp_spin  # noqa: E402

limit_openmp_spin()  # as the chatdistill command does, before torch loads its OpenMP runtime

import torch  # noqa: E402

import chatdistill  # noqa: E402
from chatdistill.data import load_rows, split_prompt_reference  # noqa: E402
from chatdistill.inference.engine import Completion, Engine, SamplingParams  # noqa: E402
from chatdistill.inference.speculative import MIN_CONFIDENCE, load_draft  # noqa: E402
from chatdistill.models import DTYPES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speculative_speed.json"
DEMO_TEST = Path(chatdistill.__file__).parent / "assets" / "demo" / "test.jsonl"


def decode_rate(done: list[Completion]) -> float | None:
    """Decode tokens/s over completions: tokens after the first / time after the first."""
    tokens = sum(max(0, len(c.token_ids) - 1) for c in done)
    seconds = sum(c.elapsed_s - c.time_to_first_token_s for c in done)
    return tokens / seconds if seconds > 0 else None


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run_round(engine: Engine, prompts: list[list[int]], params: SamplingParams, batch: int):
    """One batch-1 pass and one concurrent pass: (batch-1 completions, their drafted and
    accepted token counts, concurrent tokens/s)."""
    before = engine.draft.counts() if engine.draft else (0, 0)
    single = engine.generate(prompts, params, batch_size=1)
    after = engine.draft.counts() if engine.draft else (0, 0)
    sync(engine)
    start = time.perf_counter()
    together = engine.generate(prompts, params, batch_size=batch)
    sync(engine)
    wall = time.perf_counter() - start
    counts = (after[0] - before[0], after[1] - before[1])
    return single, counts, sum(len(c.token_ids) for c in together) / wall


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(a / b, digits) if b else None


def name_of(path: str) -> str:
    """A draft's name: its directory, or for a GGUF file `model.gguf` in an export folder, the
    folder."""
    parts = path.rstrip("/").split("/")
    name = parts[-2] if parts[-1] == "model.gguf" and len(parts) > 1 else parts[-1]
    return name.removesuffix(".gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher")
    ap.add_argument("drafts", nargs="+", metavar="draft")
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[6], metavar="K")
    ap.add_argument("--data", default=str(DEMO_TEST), help="chat rows (JSONL/Parquet)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", help="default: cuda when available")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the loader's default")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--int8", action="store_true", help="each draft also with int8 linears (CPU)")
    ap.add_argument(
        "--confidence",
        type=float,
        default=MIN_CONFIDENCE,
        help="a draft stops after a token it gives less probability (0: always all k)",
    )
    ap.add_argument(
        "--gguf-runtime",
        choices=("torch", "llama.cpp"),
        default="torch",
        help="where .gguf drafts run (`--draft-runtime`); llama.cpp needs llama-cpp-python",
    )
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype] if args.dtype else None
    teacher = Engine.load(args.teacher, device=args.device, dtype=dtype)
    rows = load_rows(args.data)[: args.prompts]
    prompts = [teacher.encode_chat(split_prompt_reference(r["messages"])[0]) for r in rows]
    params = SamplingParams(max_new_tokens=args.new_tokens)

    configs = [("teacher alone", None, teacher)]
    for path in args.drafts:
        for k in args.draft_tokens:
            in_llama_cpp = path.endswith(".gguf") and args.gguf_runtime == "llama.cpp"
            for int8 in (False, True) if args.int8 and not in_llama_cpp else (False,):
                engine = Engine(teacher.model, teacher.tokenizer)
                runtime = "llama.cpp" if in_llama_cpp else "torch"
                load_draft(
                    engine, path, k, int8=int8, runtime=runtime
                ).min_confidence = args.confidence
                name = name_of(path) + (", int8" if int8 else "") + (", llama.cpp" * in_llama_cpp)
                configs.append((name, k, engine))

    for _, _, engine in configs:  # warm-up: kernels, allocator, caches
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=8), batch_size=1)

    # Per configuration, over the rounds: the best speeds and times, and the draft's counts.
    start = {"b1": 0.0, "ttft": float("inf"), "answers_s": float("inf"), "load": 0.0}
    best = [{**start, "drafted": 0, "accepted": 0} for _ in configs]
    answers: list[list[list[int]]] = [[] for _ in configs]
    for _ in range(args.repeats):
        for i, (_, _, engine) in enumerate(configs):
            single, (drafted, accepted), load = run_round(engine, prompts, params, args.concurrency)
            b = best[i]
            b["b1"] = max(b["b1"], decode_rate(single) or 0.0)
            b["ttft"] = min(b["ttft"], sum(c.time_to_first_token_s for c in single) / len(single))
            b["answers_s"] = min(b["answers_s"], sum(c.elapsed_s for c in single))
            b["load"] = max(b["load"], load)
            b["drafted"] += drafted
            b["accepted"] += accepted
            answers[i] = [c.token_ids for c in single]

    alone = best[0]
    table = []
    for (name, k, _), b, got in zip(configs, best, answers, strict=True):
        table.append(
            {
                "config": name,
                "draft_tokens": k,
                "decode_tokens_per_s_batch1": round(b["b1"], 1),
                "speedup_batch1": ratio(b["b1"], alone["b1"]),
                "first_token_ms_batch1": round(1e3 * b["ttft"], 1),
                "answer_speedup_batch1": ratio(alone["answers_s"], b["answers_s"]),
                "acceptance_rate": ratio(b["accepted"], b["drafted"], 4),
                f"tokens_per_s_concurrency{args.concurrency}": round(b["load"], 1),
                "speedup_concurrent": ratio(b["load"], alone["load"]),
                "greedy_identical": sum(a == t for a, t in zip(got, answers[0], strict=True)),
                "answers": len(got),
            }
        )
    print_table(table, args.concurrency)
    out = {
        "teacher": args.teacher,
        "drafts": args.drafts,
        "device": str(teacher.device),
        "device_name": torch.cuda.get_device_name(teacher.device)
        if teacher.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": str(next(teacher.model.parameters()).dtype),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("teacher", "drafts")},
        "rows": table,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


def print_table(table: list[dict], concurrency: int) -> None:
    head = (
        f"{'config':28} {'k':>2} {'tok/s b1':>9} {'x alone':>7} {'1st ms':>7} {'x answer':>8} "
        f"{'accept':>7} "
        f"{f'tok/s c{concurrency}':>9} {'x alone':>7}  greedy identical"
    )
    print(head + "\n" + "-" * len(head))
    for r in table:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        same = r["greedy_identical"] == r["answers"]
        print(
            f"{r['config'][:28]:28} {r['draft_tokens'] or '-':>2} "
            f"{r['decode_tokens_per_s_batch1']:>9.1f} {r['speedup_batch1'] or 0:>7.2f} "
            f"{r['first_token_ms_batch1']:>7.0f} {r['answer_speedup_batch1'] or 0:>8.2f} "
            f"{accept:>7} {r[f'tokens_per_s_concurrency{concurrency}']:>9.1f} "
            f"{r['speedup_concurrent'] or 0:>7.2f}  "
            f"{'yes' if same else 'NO'} ({r['greedy_identical']}/{r['answers']})"
        )


if __name__ == "__main__":
    main()
