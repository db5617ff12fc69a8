"""`chatdistill` command line: one subcommand per job, each calling one plain function.

User mistakes raise `UserError`; they are printed as one line and exit with status 2.
"""

# ruff: noqa: E402 (libgomp's spin count must be set before torch loads it)
import argparse
import os
import sys
from collections.abc import Sequence

from chatdistill.openmp import limit_openmp_spin

limit_openmp_spin()

import torch

from chatdistill import __version__
from chatdistill.allocator import keep_freed_memory
from chatdistill.cli.distill import add_cache_teacher, add_distill, add_generate_data
from chatdistill.cli.evaluation import add_eval
from chatdistill.cli.serving import add_chat, add_serve
from chatdistill.cli.shipping import add_demo, add_export
from chatdistill.errors import Interrupted, UserError, failed_write, free_space, unusable_output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatdistill",
        description="Distil a large chat model into a small, fast student; evaluate, serve and "
        "export it. Runs offline unless you pass a hub id.",
    )
    parser.add_argument("--version", action="version", version=f"chatdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_distill(sub)
    add_serve(sub)
    add_eval(sub)
    add_cache_teacher(sub)
    add_generate_data(sub)
    add_chat(sub)
    add_demo(sub)
    add_export(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--threads",
            type=int,
            help="CPU threads for torch (default: $OMP_NUM_THREADS, else torch's choice); on a "
            "busy machine fewer threads than cores can be much faster",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars say more
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads}: must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted:  # the command said what a rerun does
        return 130
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
