"""Train the demo's bundled teacher from scratch with chatdistill's own SFT mode.

A Llama-shaped model (256 wide, 8 layers, tied embeddings, 7.3M parameters) on the demo train
split, with the demo tokenizer. The result is copied into `src/chatdistill/assets/demo/teacher/`
(safetensors, tokenizer, chat template, the recipe and its metrics), which `chatdistill demo`
uses. Deterministic for a seed on the same machine and torch version.

The support-desk rows appear `--support-repeat` times per epoch (small talk once): its facts need
many passes to be learnt from the ~7 rows stating each, while more passes over the small talk
only memorise human replies that no model predicts, which ruins held-out CE.

`--shape student` trains the demo student's shape with the same recipe instead and leaves it in
`--work` (nothing is installed): the model the teacher has to beat clearly, since a teacher no
better than a student-sized model trained the same way has nothing to distil. `--no-install`
leaves a teacher there too (other seeds, for `bench/demo_teacher_vs_student.py`).

    python scripts/train_demo_teacher.py [--steps 2000] [--seed 0] [--work runs/demo-teacher]
        [--support-repeat 3] [--shape teacher|student] [--no-install]
"""

import argparse
import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig

from chatdistill.config import load_distill_config
from chatdistill.data import load_rows
from chatdistill.demo.data import demo_asset_dir, jsonl_text
from chatdistill.demo.run import STUDENT_SHAPE
from chatdistill.distill.train import train

SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=768,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "chatdistill_config.yaml",
        "metrics.jsonl", "train_summary.json")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--support-repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/demo-teacher")
    ap.add_argument("--shape", choices=["teacher", "student"], default="teacher")
    ap.add_argument(
        "--no-install", action="store_true", help="leave the model in --work, bundle nothing"
    )
    args = ap.parse_args()
    assets = demo_asset_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    cfg_file = work / "teacher_config.json"
    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **(SHAPE if args.shape == "teacher" else STUDENT_SHAPE),
    )  # fmt: skip
    cfg_file.write_text(json.dumps(config.to_dict()))
    rows = load_rows(assets / "train.jsonl")
    support = [r for r in rows if r.get("source") == "support"]
    mix = work / "train_mix.jsonl"
    mix.write_text(jsonl_text(rows + support * (args.support_repeat - 1)), encoding="utf-8")
    overrides = {
        "output": str(work / "model"),
        "student_config": str(cfg_file),
        "tokenizer": str(assets / "tokenizer"),
        "data.train": str(mix),
        "data.validation": str(assets / "validation.jsonl"),
        "data.max_length": 256,
        "loss.kind": "sft",
        "train.max_steps": args.steps,
        "train.batch_size": 32,
        "train.lr": 2e-3,
        "train.weight_decay": 0.01,
        "train.warmup_steps": 50,
        "train.min_lr_ratio": 0.05,
        "train.eval_every": 200,
        "train.save_every": 200,
        "train.log_every": 20,
        "train.seed": args.seed,
    }
    cfg = load_distill_config(None, overrides)
    resume = (work / "model" / "checkpoints").is_dir()
    out = train(cfg, resume=resume)
    if args.shape == "student" or args.no_install:
        print(f"{args.shape}-shaped model in {out}; nothing bundled")
        return
    dest = assets / "teacher"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for name in KEEP:
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    recipe = dest / "chatdistill_config.yaml"
    # Name the bundled files relative to the package, not to this machine.
    recipe.write_text(recipe.read_text().replace(str(assets), "chatdistill/assets/demo"))
    print(f"teacher copied to {dest}")


if __name__ == "__main__":
    main()
