"""`eval`: teacher, students and baselines side by side."""

import argparse

from chatdistill.cli.serving import add_draft_flags, check_draft_flags


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare teacher, students and a baseline: quality, fidelity, speed, memory, size",
        description="Score every model on the same test conversations (held-out CE, ROUGE-L, chrF, "
        "answer accuracy, KL and top-1 agreement with the teacher, share of the teacher kept) and "
        "measure its cost; write results.json, summary.md and report.html to --output, and a "
        "model card into each student directory (README.md; MODEL_CARD.md beside a README.md "
        "that chatdistill did not write, which is never overwritten).",
    )
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument(
        "--student", action="append", required=True, help="student model directory (repeatable)"
    )
    p.add_argument(
        "--baseline",
        help="baseline model (e.g. the student before distillation): kept%% then "
        "means the share of the baseline-to-teacher gap closed",
    )
    p.add_argument("--data", required=True, help="test data: JSONL or Parquet chat rows")
    p.add_argument("--output", required=True, help="directory for results.json and the reports")
    p.add_argument("--max-samples", type=int, default=64, help="conversations used (default: 64)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="greedy answer budget (default: 128)"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="rows per forward/generate (default: 8)"
    )
    p.add_argument(
        "--metrics-jsonl",
        nargs="+",
        default=[],
        metavar="PATH",
        help="extra trainer logs to plot (each model dir's metrics.jsonl is found by itself)",
    )
    p.add_argument(
        "--speed-prompts", type=int, default=8, help="prompts timed at batch 1 (default: 8)"
    )
    p.add_argument(
        "--speed-new-tokens", type=int, default=32, help="tokens per speed probe (default: 32)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-model-card", action="store_true", help="write no model cards")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument(
        "--fidelity-on",
        choices=["references", "teacher"],
        default="references",
        help="tokens KL and agreement to the teacher are measured on: the test answers "
        "(default) or the teacher's own greedy answers",
    )
    add_draft_flags(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from rich.console import Console

    from chatdistill.evaluate.config import EvalConfig
    from chatdistill.evaluate.report import print_tables
    from chatdistill.evaluate.run import evaluate

    check_draft_flags(args)
    cfg = EvalConfig(
        teacher=args.teacher,
        students=args.student,
        baseline=args.baseline,
        data=args.data,
        output=args.output,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        metrics_jsonl=args.metrics_jsonl,
        speed_prompts=args.speed_prompts,
        speed_new_tokens=args.speed_new_tokens,
        memory=not args.no_memory,
        model_cards=not args.no_model_card,
        device=args.device,
        dtype=args.dtype,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
        draft_int8=args.draft_int8,
        draft_runtime=args.draft_runtime,
        fidelity_on=args.fidelity_on,
    )
    # soft_wrap: a progress line naming a long path stays one line in a log file.
    console = Console(stderr=True, soft_wrap=True)
    results = evaluate(cfg, say=console.print)
    print_tables(results)
    if results.speculative is not None:
        print(_draft_summary(results.speculative))
    console.print(f"wrote {args.output}/results.json, summary.md, report.html")


def _draft_summary(spec: dict) -> str:
    """One line on the teacher's speed with its draft (figures that could not be measured: n/a)."""

    def fmt(value: float | None, spec_: str) -> str:
        return "n/a" if value is None else format(value, spec_)

    return (
        f"teacher with --draft {spec['draft']}: "
        f"{fmt(spec['decode_tokens_per_s_batch1'], ',.0f')} vs "
        f"{fmt(spec['teacher_decode_tokens_per_s_batch1'], ',.0f')} tokens/s alone at batch 1 "
        f"({fmt(spec['speedup'], '.2f')}x), acceptance {fmt(spec['acceptance_rate'], '.0%')}, "
        f"{spec['identical_greedy_answers']}/{spec['answers_compared']} greedy answers identical"
    )
