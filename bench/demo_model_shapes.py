"""Throughput of candidate teacher/student shapes for the bundled demo, on this machine's CPU.

Measures plain `LlamaForCausalLM` (no project code): training throughput (forward + backward +
AdamW step, tokens/s) and batch-1 greedy decoding with the KV cache (new tokens/s). The baseline
is the proposed teacher, measured in the same run; every row reports its ratio to it.

    python bench/demo_model_shapes.py [--threads 2] [--seconds 8]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 4096
# name: (hidden, layers, heads, kv_heads, intermediate); the first is the baseline (the teacher).
SHAPES = {
    "teacher-256x8": (256, 8, 8, 4, 768),
    "teacher-320x8": (320, 8, 8, 4, 960),
    "student-128x2": (128, 2, 4, 2, 384),
    "student-160x3": (160, 3, 4, 2, 480),
    "student-192x2": (192, 2, 4, 2, 576),
    "student-256x1": (256, 1, 8, 4, 704),  # the demo's student
}


def build(hidden: int, layers: int, heads: int, kv: int, inter: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def train_tokens_per_s(model: LlamaForCausalLM, seconds: float, batch: int, seq: int) -> float:
    """Forward + backward + AdamW step on random ids (batch, seq); tokens/s after one warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, VOCAB, (batch, seq))
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * batch * seq / (time.perf_counter() - start)


@torch.inference_mode()
def decode_tokens_per_s(model: LlamaForCausalLM, seconds: float, new_tokens: int = 64) -> float:
    """Batch-1 greedy decoding of `new_tokens` after a 32-token prompt; new tokens/s."""
    model.eval()
    prompt = torch.randint(3, VOCAB, (1, 32))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(prompt, **kw)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.generate(prompt, **kw)
        n += 1
    return n * new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, shape in SHAPES.items():
        model = build(*shape)
        params = sum(p.numel() for p in model.parameters())
        train = train_tokens_per_s(model, args.seconds, args.batch, args.seq)
        decode = decode_tokens_per_s(model, args.seconds)
        rows.append(
            dict(name=name, shape=shape, params=params, train_tok_s=train, decode_tok_s=decode)
        )
        print(f"measured {name}", flush=True)

    base = rows[0]
    print(
        f"\n{'shape':<16}{'params':>10}{'x teacher':>10}{'train tok/s':>13}{'ratio':>7}"
        f"{'decode tok/s':>14}{'ratio':>7}"
    )
    for r in rows:
        r["params_ratio"] = r["params"] / base["params"]
        r["train_ratio"] = r["train_tok_s"] / base["train_tok_s"]
        r["decode_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        print(
            f"{r['name']:<16}{r['params'] / 1e6:>9.2f}M{r['params_ratio']:>10.2f}"
            f"{r['train_tok_s']:>13.0f}{r['train_ratio']:>7.2f}"
            f"{r['decode_tok_s']:>14.0f}{r['decode_ratio']:>7.2f}"
        )
    out = Path(__file__).parent / "results" / "demo_model_shapes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(threads=args.threads, batch=args.batch, seq=args.seq, vocab=VOCAB)
    out.write_text(json.dumps(dict(settings=meta, baseline=base["name"], rows=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
