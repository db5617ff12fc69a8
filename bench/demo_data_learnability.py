"""Does the demo data reward knowing the facts? SFT a small model on all support labels vs 10%.

Plain transformers `LlamaForCausalLM` + AdamW on the shipped support split, same shape and the
same number of steps for both runs; greedy answer accuracy and answer-token CE on the support test
split (unseen wordings). The baseline is training on all labels (what a teacher trained on all
labelled rows, and a student distilled from it, can reach); the 10% row shows the gap that
distillation has to close.

    python bench/demo_data_learnability.py [--steps 1200] [--threads 2]
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chatdistill.data import IGNORE, collate, render_example, render_prompt
from chatdistill.demo.build import facts_missing
from chatdistill.demo.data import demo_asset_dir, labelled_subset, load_demo_split
from chatdistill.evaluate.scores import answer_accuracy


def support(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["source"] == "support"]


def build_model(tok, hidden: int, layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64),
        intermediate_size=3 * hidden,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def train(model, tok, rows: list[dict], steps: int, batch: int, lr: float) -> float:
    """AdamW, linear warm-up then cosine decay; returns seconds spent."""
    examples = [render_example(tok, r["messages"], 256) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    rng = random.Random(0)
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch], order[batch:]
        b = collate([examples[i] for i in idx], tok.pad_token_id)
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.inference_mode()
def evaluate(model, tok, rows: list[dict]) -> tuple[float, float]:
    """Greedy answer accuracy (%) and mean answer-token CE on `rows`."""
    model.eval()
    preds = []
    for i in range(0, len(rows), 32):
        prompts = [render_prompt(tok, r["messages"][:-1]) for r in rows[i : i + 32]]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        preds += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    acc = answer_accuracy(preds, [r["answer"] for r in rows])
    total, count = 0.0, 0
    for i in range(0, len(rows), 32):
        b = collate([render_example(tok, r["messages"], 256) for r in rows[i : i + 32]], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total, count = total + ce.item(), count + (labels != IGNORE).sum().item()
    return acc, total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(demo_asset_dir() / "tokenizer")
    tok.padding_side = "left"
    train_rows = support(load_demo_split("train"))
    test_rows = support(load_demo_split("test"))
    runs = {"all labels": train_rows, "10% labels": labelled_subset(train_rows, 0.1, 0)}
    results = []
    for name, rows in runs.items():
        model = build_model(tok, args.hidden, args.layers)
        seconds = train(model, tok, rows, args.steps, args.batch, args.lr)
        acc, ce = evaluate(model, tok, test_rows)
        results.append(
            dict(
                run=name,
                rows=len(rows),
                facts_unseen=len(facts_missing(rows)),
                accuracy=acc,
                answer_ce=ce,
                train_s=seconds,
            )
        )
        print(f"done {name}: accuracy {acc:.1f}%, answer CE {ce:.3f}", flush=True)
    base = results[0]
    print(f"\n{'run':<12}{'rows':>6}{'unseen facts':>14}{'acc %':>8}{'ratio':>7}{'CE':>7}")
    for r in results:
        r["accuracy_ratio"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
        ratio = f"{r['accuracy_ratio']:.2f}" if r["accuracy_ratio"] is not None else "-"
        print(
            f"{r['run']:<12}{r['rows']:>6}{r['facts_unseen']:>14}{r['accuracy']:>8.1f}"
            f"{ratio:>7}{r['answer_ce']:>7.3f}"
        )
    out = Path(__file__).parent / "results" / "demo_data_learnability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(settings=vars(args), rows=results), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
