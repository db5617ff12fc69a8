"""`serve` and `chat`, and the `--draft` flags they share with `eval`."""

import argparse
import os

from chatdistill.errors import UserError


def add_draft_flags(p: argparse.ArgumentParser) -> None:
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
        default=6,
        metavar="K",
        help="most tokens the draft proposes per step (default: 6); it stops sooner after a "
        "token it is unsure of (probability below 0.7)",
    )
    p.add_argument(
        "--draft-int8",
        action="store_true",
        help="run the draft's linear layers in int8 (CPU): a quarter of the bytes per drafted "
        "token; the answers stay the teacher's",
    )
    p.add_argument(
        "--draft-runtime",
        choices=("torch", "llama.cpp"),
        default="torch",
        help="where the draft runs: torch (default), or llama.cpp for a GGUF draft such as the "
        "student's `export --format gguf` (CPU; needs llama-cpp-python): several times faster "
        "per drafted token; the answers stay the teacher's",
    )


def check_draft_flags(args: argparse.Namespace) -> None:
    """Fail before any model loads on a --draft-tokens that cannot work."""
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens {args.draft_tokens}: must be at least 1")


def add_serve(sub: argparse._SubParsersAction) -> None:
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
    add_draft_flags(p)
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
    check_draft_flags(args)
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
        draft_int8=args.draft_int8,
        draft_runtime=args.draft_runtime,
    )


def add_chat(sub: argparse._SubParsersAction) -> None:
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
    add_draft_flags(p)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    from chatdistill.inference.chat import run_chat

    check_draft_flags(args)
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
        draft_int8=args.draft_int8,
        draft_runtime=args.draft_runtime,
    )
