"""`distill`, `cache-teacher` and `generate-data`: the training side of the command line."""

import argparse

from chatdistill.config import LOSS_KINDS, load_distill_config
from chatdistill.errors import UserError


def add_distill(sub: argparse._SubParsersAction) -> None:
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


def add_cache_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once and store its top-k log-probs for `distill --teacher-cache`",
        description="Render the data as the trainer does, run the teacher over it in batches and "
        "store the top-k log-probs of every loss position in memory-mapped shards (each position "
        "keeps the top tokens holding --min-mass of their mass). With --config, "
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
        "--min-mass",
        type=float,
        help="per position, keep the fewest top tokens holding this share of the top-k's "
        "probability mass; the rest joins the tail bucket (1 keeps all k; default: 0.999)",
    )
    p.add_argument(
        "--logprob-bits",
        type=int,
        choices=(8, 16),
        help="bits per stored log-prob: 8 (codes 1/16 nat apart) or 16 (float16) (default: 8)",
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
    _add_precision(p)
    p.set_defaults(func=_run_cache_teacher)


def _add_precision(p: argparse.ArgumentParser) -> None:
    from chatdistill.models import PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the teacher's weights: auto = bf16 on a GPU that has it, else fp32; bf16 also "
        "pays on CPUs with native bf16 (AVX512-BF16, AMX)",
    )


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
    # Left unset, they take write_cache's defaults.
    compact = {"min_mass": args.min_mass, "logprob_bits": args.logprob_bits}
    meta = write_cache(
        **settings,
        **{k: v for k, v in compact.items() if v is not None},
        top_k=args.top_k,
        tail_samples=args.tail_samples,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
    )
    print(
        f"cached {meta['examples']} conversations ({meta['tokens']:,} tokens, "
        f"{meta['dropped_by_truncation']} dropped by truncation) in {len(meta['shards'])} "
        f"shard(s) at {args.output}"
    )


def add_generate_data(sub: argparse._SubParsersAction) -> None:
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
    _add_precision(p)
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
        precision=args.precision,
    )
    cut = f"; {s['truncated']} hit --max-new-tokens" if s["truncated"] else ""
    print(
        f"{args.output}: {s['rows']} rows ({s['new_tokens']:,} new tokens at "
        f"{s['tokens_per_s']:,.0f} tok/s{cut})"
    )
