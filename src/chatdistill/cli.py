"""`chatdistill` command line: one subcommand per job, each calling one plain function.

User mistakes raise `UserError`; they are printed as one line and exit with status 2.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from chatdistill import __version__
from chatdistill.allocator import keep_freed_memory
from chatdistill.config import LOSS_KINDS, load_distill_config
from chatdistill.errors import UserError, failed_write, free_space, unusable_output


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student (or train with --loss sft)",
        description="Train a student from a recipe (YAML) and/or flags. Flags override the recipe; "
        "--set takes any config field as a dotted path (e.g. --set train.lr=3e-4).",
    )
    p.add_argument("--config", help="recipe YAML (see configs/)")
    p.add_argument("--teacher", help="teacher: model directory, GGUF file or hf:org/name")
    p.add_argument("--teacher-adapter", help="peft LoRA adapter merged into the teacher")
    p.add_argument("--teacher-cache", help="teacher cache directory from `cache-teacher`")
    p.add_argument("--student", help="student: model directory, GGUF file or hf:org/name")
    p.add_argument("--student-layers", help="cut from the teacher: layers to keep, e.g. 0,2,4,7")
    p.add_argument("--student-num-layers", type=int, help="cut: keep N evenly spaced layers")
    p.add_argument("--student-config", help="fresh student from a config.json")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the teacher's)")
    p.add_argument("--data", help="training data: JSONL or Parquet of chat rows")
    p.add_argument("--validation", help="validation data (default: split of --data)")
    p.add_argument("--output", help="output directory")
    p.add_argument("--loss", choices=LOSS_KINDS, help="divergence to the teacher, or sft")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--on-policy-fraction", type=float, help="fraction of steps on student samples")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a field")
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> None:
    from chatdistill.distill.train import train

    flags = {
        "teacher": args.teacher,
        "teacher_adapter": args.teacher_adapter,
        "teacher_cache": args.teacher_cache,
        "student": args.student,
        "student_layers": args.student_layers,
        "student_num_layers": args.student_num_layers,
        "student_config": args.student_config,
        "tokenizer": args.tokenizer,
        "data.train": args.data,
        "data.validation": args.validation,
        "output": args.output,
        "loss.kind": args.loss,
        "train.max_steps": args.max_steps,
        "on_policy.fraction": args.on_policy_fraction,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    cfg = load_distill_config(args.config, overrides, args.set)
    train(cfg, resume=args.resume)


def _add_draft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        metavar="DRAFT_DIR",
        help="a smaller model with the same tokenizer (best: a student distilled from this "
        "teacher) that proposes tokens the teacher checks in one forward: the teacher's own "
        "answers, decoded faster while one request runs (speculative decoding)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=4,
        metavar="K",
        help="tokens the draft proposes per step (default: 4)",
    )


def _check_draft_flags(args: argparse.Namespace) -> None:
    """Fail before any model loads on a --draft-tokens that cannot work."""
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens {args.draft_tokens}: must be at least 1")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model: OpenAI-compatible API, web chat page, Prometheus metrics",
        description="Serve MODEL_DIR over HTTP: POST /v1/chat/completions and /v1/completions "
        "(streaming with SSE, continuous batching), GET /v1/models, /health, /metrics, and a chat "
        "page at /. Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (HF format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CHATDISTILL_API_KEY)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8, help="requests decoded together (default: 8)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a batch slot; more are answered 429 with Retry-After, "
        "0 never queues (default: 64)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="cancel a request after S seconds, queue time included (default: 300)",
    )
    p.add_argument("--model-name", help="name served in /v1/models (default: the directory name)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; '*' for any); by "
        "default only the bound address, and the loopback names for a loopback bind",
    )
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    _add_draft_flags(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from chatdistill.serve.app import run_server

    for flag, value in [
        ("--max-batch", args.max_batch),
        ("--request-timeout", args.request_timeout),
    ]:
        if not value > 0:  # written so that NaN fails too
            raise UserError(f"{flag} must be positive, got {value}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    _check_draft_flags(args)
    run_server(
        args.model_dir,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        api_key=args.api_key or os.environ.get("CHATDISTILL_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        allowed_hosts=args.allowed_host,
        device=args.device,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
    _add_draft_flags(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from rich.console import Console

    from chatdistill.evaluate.config import EvalConfig
    from chatdistill.evaluate.report import print_tables
    from chatdistill.evaluate.run import evaluate

    _check_draft_flags(args)
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


def _add_cache_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once and store its top-k log-probs for `distill --teacher-cache`",
        description="Render the data as the trainer does, run the teacher over it in batches and "
        "store the top-k log-probs of every loss position in memory-mapped shards. With --config, "
        "the teacher, data, temperature, max length and output not given as flags come from the "
        "distill recipe, so the cache matches it. Resumable: rerun the same command to finish a "
        "killed run.",
    )
    p.add_argument("--config", help="distill recipe YAML to take the settings from")
    p.add_argument("--teacher", help="teacher model directory or GGUF file (recipe: teacher)")
    p.add_argument("--teacher-adapter", help="peft LoRA adapter (recipe: teacher_adapter)")
    p.add_argument("--data", help="training data: JSONL or Parquet chat rows (recipe: data.train)")
    p.add_argument("--output", help="cache directory (recipe: teacher_cache)")
    p.add_argument("--top-k", type=int, default=64, help="log-probs kept per token (default: 64)")
    p.add_argument(
        "--tail-samples",
        type=int,
        default=0,
        help="of the k slots, fill this many with tokens sampled from outside the top, so the "
        "forward KL from the cache is unbiased for the full vocabulary (default: 0)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="must equal loss.temperature (default: the recipe's, or 1)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="must equal data.max_length (default: the recipe's, or 512)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.set_defaults(func=_run_cache_teacher)


def _cache_settings(args: argparse.Namespace) -> dict:
    """write_cache's teacher, data, output, temperature and max_length: the flags, and for those
    not given the recipe's fields (--config), so the cache matches the recipe that will read it."""
    settings = {
        "teacher": args.teacher,
        "teacher_adapter": args.teacher_adapter,
        "data": args.data,
        "output": args.output,
        "temperature": args.temperature,
        "max_length": args.max_length,
    }
    if args.config:
        cfg = load_distill_config(args.config)
        recipe = {
            "teacher": cfg.teacher,
            "teacher_adapter": cfg.teacher_adapter,
            "data": cfg.data.train,
            "output": cfg.teacher_cache,
            "temperature": cfg.loss.temperature,
            "max_length": cfg.data.max_length,
        }
        settings = {k: recipe[k] if v is None else v for k, v in settings.items()}
    for flag, field in [
        ("teacher", "teacher"),
        ("data", "data.train"),
        ("output", "teacher_cache"),
    ]:
        if settings[flag] is None:
            why = f"{args.config} has no {field}" if args.config else f"or --config with {field}"
            raise UserError(f"cache-teacher needs --{flag}: {why}")
    # A temperature or max_length left unset takes write_cache's default, the recipe's default too.
    return {k: v for k, v in settings.items() if v is not None}


def _run_cache_teacher(args: argparse.Namespace) -> None:
    from chatdistill.distill.cache import write_cache

    settings = _cache_settings(args)
    args.output = settings["output"]  # so a refused or failed write names the recipe's output
    meta = write_cache(
        **settings,
        top_k=args.top_k,
        tail_samples=args.tail_samples,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(
        f"cached {meta['examples']} conversations ({meta['tokens']:,} tokens, "
        f"{meta['dropped_by_truncation']} dropped by truncation) in {len(meta['shards'])} "
        f"shard(s) at {args.output}"
    )


def _add_generate_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate-data",
        help="write the teacher's answers as chat JSONL (sequence-level distillation data)",
        description="Answer every prompt row with the teacher and write chat JSONL that any recipe "
        "trains on; reference answers are replaced, other fields kept. Resumable: rerun the same "
        "command to continue a partial output.",
    )
    p.add_argument("--teacher", required=True, help="teacher model directory or GGUF file")
    p.add_argument("--teacher-adapter", help="peft LoRA adapter merged into the teacher")
    p.add_argument("--prompts", required=True, help="chat rows (JSONL/Parquet) to answer")
    p.add_argument("--output", required=True, help="output JSONL file")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer budget (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, help="answers decoded together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="answers per prompt")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.set_defaults(func=_run_generate_data)


def _run_generate_data(args: argparse.Namespace) -> None:
    from chatdistill.distill.teacher_answers import generate_data
    from chatdistill.models import resolve

    s = generate_data(
        resolve(args.teacher, "teacher", adapter=args.teacher_adapter),
        args.prompts,
        args.output,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        samples_per_prompt=args.samples_per_prompt,
        device=args.device,
    )
    cut = f"; {s['truncated']} hit --max-new-tokens" if s["truncated"] else ""
    print(
        f"{args.output}: {s['rows']} rows ({s['new_tokens']:,} new tokens at "
        f"{s['tokens_per_s']:,.0f} tok/s{cut})"
    )


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Talk to a model; answers stream as they are generated. /reset clears the "
        "history, /exit quits; Ctrl-C stops an answer, Ctrl-C or Ctrl-D at the prompt quits.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (or hub id)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    p.add_argument("--system", help="system message kept at the start of the conversation")
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    _add_draft_flags(p)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    from chatdistill.inference.chat import run_chat

    _check_draft_flags(args)
    run_chat(
        args.model_dir,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="distil the bundled teacher into a 4x smaller student and show what it kept",
        description="The whole job on the bundled data, offline: teacher answers and cache, a KD "
        "student, two SFT baselines of the same shape, and a side-by-side evaluation. Finished "
        "stages are reused on a rerun.",
    )
    p.add_argument("--output", default="runs/demo", help="where everything is written")
    p.add_argument(
        "--labelled-fraction", type=float, default=0.1, help="share of human-answered train rows"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps per student")
    p.add_argument("--eval-samples", type=int, default=200, help="test conversations evaluated")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from chatdistill.demo.run import DemoConfig, run_demo

    if args.steps < 1 or args.eval_samples < 1:
        raise UserError("--steps and --eval-samples must be at least 1")
    run_demo(
        DemoConfig(
            output=args.output,
            labelled_fraction=args.labelled_fraction,
            seed=args.seed,
            steps=args.steps,
            eval_samples=args.eval_samples,
        )
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model for edge runtimes (ONNX Runtime GenAI, GGUF) and check it",
        description="Write MODEL_DIR for an edge runtime: an ONNX Runtime GenAI model folder "
        "(model.onnx, genai_config.json, tokenizer; needs pip install 'chatdistill[export]') or a "
        "GGUF file for llama.cpp and Ollama (model.gguf and an Ollama Modelfile). Then answer a "
        "few chats with both the model and the export and report identical answers, next-token "
        "agreement and size.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory to export")
    p.add_argument("--output", required=True, help="new folder for the export")
    p.add_argument(
        "--format",
        choices=("onnx", "gguf"),
        default="onnx",
        help="onnx (default): ONNX Runtime GenAI; gguf: llama.cpp and Ollama",
    )
    p.add_argument(
        "--precision",
        help="onnx: int4 (default; block-wise weights), int8 or fp32 on cpu; int4, fp16, bf16 or "
        "fp32 on cuda. gguf: q8_0 (default), f16 or q4_0",
    )
    p.add_argument(
        "--device", default="cpu", help="onnx only: runtime the export targets, cpu or cuda"
    )
    p.add_argument("--prompts", help="chat rows (JSONL/Parquet) to check with; default: 6 built-in")
    p.add_argument("--check-chats", type=int, default=16, help="rows of --prompts to use")
    p.add_argument("--check-tokens", type=int, default=48, help="answer budget in the check")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the model")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from chatdistill.atomic import write_text
    from chatdistill.export.check import summary

    if args.check_chats < 1:
        raise UserError(f"--check-chats {args.check_chats}: must be at least 1")
    if args.format == "gguf" and args.device != "cpu":
        raise UserError(f"--device {args.device}: applies to --format onnx only")
    chats = answers = None
    if args.prompts and not args.no_check:
        from chatdistill.data import load_rows, split_prompt_reference

        rows = load_rows(args.prompts)[: args.check_chats]
        chats = [split_prompt_reference(r["messages"])[0] for r in rows]
        answers = [r.get("answer") if isinstance(r.get("answer"), str) else None for r in rows]
    if args.format == "gguf":
        from chatdistill.export.gguf import check_gguf, export_gguf

        precision = args.precision or "q8_0"
        out = export_gguf(args.model_dir, args.output, precision)
        print(f"exported {args.model_dir} to {out} (GGUF, {precision}; Ollama: see its Modelfile)")
        check = check_gguf
    else:
        from chatdistill.export.onnx import check_export, export_onnx

        precision = args.precision or "int4"
        out = export_onnx(args.model_dir, args.output, precision, args.device)
        print(f"exported {args.model_dir} to {out} (ONNX Runtime GenAI, {precision})")
        check = check_export
        if not args.no_check and args.device != "cpu":
            print(
                "check skipped: it runs on CPU exports (load this one with onnxruntime-genai-cuda)"
            )
            return
    if args.no_check:
        return
    c = check(args.model_dir, out, chats, args.check_tokens, answers)
    write_text(Path(out) / "export_check.json", json.dumps(c.as_dict(), indent=2))
    for line in summary(c):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatdistill",
        description="Distil a large chat model into a small, fast student; evaluate, serve and "
        "export it. Runs offline unless you pass a hub id.",
    )
    parser.add_argument("--version", action="version", version=f"chatdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_distill(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_cache_teacher(sub)
    _add_generate_data(sub)
    _add_chat(sub)
    _add_demo(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars say more
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        output = getattr(args, "output", None)
        refused = unusable_output(e, output)
        if refused is not None:
            print(f"error: --output {output}: cannot write there ({refused})", file=sys.stderr)
            return 2
        reason = failed_write(e)
        if reason is None:
            raise
        target = output or "the output directory"
        after = AFTER_A_FAILED_WRITE.get(args.command)
        print(
            f"error: {reason} while writing {target}{free_space(target)}; free some space and run "
            "the same command again" + (f": {after}" if after else ""),
            file=sys.stderr,
        )
        return 2
    return 0


# What a rerun does after a write failed part-way (every command writes atomically).
AFTER_A_FAILED_WRITE = {
    "distill": "with --resume it continues from the last checkpoint",
    "cache-teacher": "it keeps the finished shards and continues",
    "generate-data": "it keeps the answers written so far and continues",
    "demo": "finished stages are kept and an interrupted training resumes",
    "eval": "nothing it wrote is half-finished",
    "export": "nothing half-written is left in place",
}


if __name__ == "__main__":
    sys.exit(main())
