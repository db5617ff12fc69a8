"""`export` (ONNX Runtime GenAI, GGUF) and `demo`."""

import argparse

from chatdistill.errors import UserError


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="distil a support-desk SmolLM2 into a student cut from it and show what it kept",
        description="The whole job on a real pretrained teacher, offline: SmolLM2-135M-Instruct "
        "with the shipped support-desk adapter answers the prompts, its log-probs are cached, a "
        "student cut from it learns from both, and it is evaluated beside the teacher and two "
        "baselines of its shape. Finished stages are reused on a rerun.",
    )
    p.add_argument("--output", default="runs/demo", help="where everything is written")
    p.add_argument(
        "--teacher",
        help="another teacher: a model directory, GGUF file or peft adapter directory "
        "(default: SmolLM2-135M-Instruct with the shipped adapter)",
    )
    p.add_argument(
        "--student-layers", type=int, help="teacher layers the student keeps (default 10)"
    )
    p.add_argument("--prompts", type=int, help="train prompts the teacher answers (default 1000)")
    p.add_argument(
        "--support-share",
        type=float,
        help="share of the prompts that are support questions, the rest small talk (default 0.7)",
    )
    p.add_argument(
        "--labelled-fraction", type=float, help="share of prompts with human answers (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", type=int, help="optimizer steps per student (default: the demo's recipe)"
    )
    p.add_argument("--eval-samples", type=int, help="test conversations evaluated (default 120)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from chatdistill.demo.run import DemoConfig, run_demo

    given = {"steps": args.steps, "eval_samples": args.eval_samples, "prompts": args.prompts,
             "student_layers": args.student_layers,
             "labelled_fraction": args.labelled_fraction,
             "support_share": args.support_share}  # fmt: skip
    settings = {k: v for k, v in given.items() if v is not None}
    for name in ("steps", "eval_samples", "prompts", "student_layers"):
        if settings.get(name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} {settings[name]}: must be at least 1")
    run_demo(DemoConfig(output=args.output, teacher=args.teacher, seed=args.seed, **settings))


def add_export(sub: argparse._SubParsersAction) -> None:
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
