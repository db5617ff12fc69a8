"""What a model costs: weights on disk, prefill and decode speed, and peak memory while
generating (measured in a fresh process per model, see `memory_child`)."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from chatdistill.evaluate.config import EvalConfig
from chatdistill.inference.engine import SamplingParams
from chatdistill.inference.speculative import load_draft

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".onnx.data"
)  # fmt: skip


def weights_size(path: str | Path, base: str | Path | None = None) -> int:
    """Bytes of weight files (safetensors, bin, ...) directly in a model directory, or of a model
    file (a GGUF file is what its user ships and loads); with `base` (an adapter's base model),
    the base's too: what it takes to ship the model."""
    p = Path(path)
    files = [p] if p.is_file() else list(p.iterdir()) if p.is_dir() else []  # a hub id: none
    own = sum(f.stat().st_size for f in files if f.name.endswith(WEIGHT_SUFFIXES))
    return own + (weights_size(base) if base is not None else 0)


def speed_probe(engine, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> dict:
    """Prefill tokens/s and time to first token (batch 1), decode tokens/s at batch 1 and 8.

    End-of-sequence is switched off for the probe so every model decodes `new_tokens` tokens and
    the rates compare like for like. Decode rate = tokens after the first / time after the first.
    The probe runs `repeats` times and keeps each figure's best: other load on the machine only
    ever slows a pass down, and one slow spell would otherwise decide a model's figure.
    """
    saved, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        engine.generate([prompts[0]], SamplingParams(max_new_tokens=2), batch_size=1)  # warm-up
        passes = [_speed_pass(engine, prompts, new_tokens) for _ in range(repeats)]
    finally:
        engine.eos_token_ids = saved
    best = {}
    for key in passes[0]:
        values = [p[key] for p in passes if p[key] is not None]
        pick = min if key == "time_to_first_token_s" else max
        best[key] = pick(values) if values else None
    return best


def _speed_pass(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    ttft, prefill_tok, decode_tok, decode_s = [], 0, 0, 0.0
    for p in prompts:
        (c,) = engine.generate([p], params, batch_size=1)
        ttft.append(c.time_to_first_token_s)
        prefill_tok += len(c.prompt_ids)
        decode_tok += max(0, len(c.token_ids) - 1)
        decode_s += c.elapsed_s - c.time_to_first_token_s
    # Batch 8: every row is prefilled before the first decode step, then all step together and
    # finish on the same step. The row whose first token came last therefore spent its time after
    # it decoding with the whole batch: that is the batch's decode time, measured inside one run.
    # (Subtracting the time of a separate prefill-only run instead went negative whenever other
    # load slowed that run, and the figure was lost.)
    batch = engine.generate((prompts * 8)[:8], params, batch_size=8)
    b8_tok = sum(max(0, len(c.token_ids) - 1) for c in batch)
    b8_s = min(c.elapsed_s - c.time_to_first_token_s for c in batch)
    return {
        "prefill_tokens_per_s": prefill_tok / sum(ttft) if sum(ttft) > 0 else None,
        "decode_tokens_per_s_batch1": decode_tok / decode_s if decode_s > 0 else None,
        "decode_tokens_per_s_batch8": b8_tok / b8_s if b8_s > 0 else None,
        "time_to_first_token_s": statistics.median(ttft),
    }


MEMORY_METHODS = {
    "cuda-max-allocated": "torch.cuda.max_memory_allocated while generating at --batch-size "
    "(weights, KV cache, activations), after a warm-up, in a fresh process per model",
    "rss-hwm": "weight bytes plus the growth of the resident-set high-water mark while generating "
    "at --batch-size (KV cache, activations), after a warm-up, in a fresh process per model",
    "ru-maxrss": "peak RSS of a fresh process per model minus its RSS before loading (includes "
    "the loading peak and libraries: an upper bound)",
}


def memory_probe(path: str, prompts: list[list[int]], cfg: EvalConfig) -> tuple[float, str]:
    """Peak memory (MB) of one model generating greedy answers to `prompts` at --batch-size,
    measured in a fresh subprocess so models measured earlier do not count. Returns (MB, key of
    MEMORY_METHODS)."""
    spec = {
        "path": path,
        "prompts": prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "chatdistill.evaluate.memory_child", f.name],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {path} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_memory_mb"], out["method"]


def draft_probe(
    engine,
    draft: str,
    draft_tokens: int,
    prompts: list[list[int]],
    new_tokens: int,
    int8: bool = False,
    runtime: str = "torch",
) -> dict:
    """The engine's speed with a speculative `draft` attached (`speed_probe` figures), the draft's
    acceptance rate, and how many greedy answers to `prompts` (batch 1, where speculation runs)
    stay identical to the engine's alone. The draft is detached afterwards."""
    greedy = SamplingParams(max_new_tokens=new_tokens)
    alone = engine.generate(prompts, greedy, batch_size=1)
    attached = load_draft(engine, draft, draft_tokens, int8=int8, runtime=runtime)
    try:
        drafted = engine.generate(prompts, greedy, batch_size=1)
        speed = speed_probe(engine, prompts, new_tokens)
    finally:
        engine.draft = None
    return {
        "draft": draft,
        "draft_tokens": draft_tokens,
        "draft_int8": int8,
        "draft_runtime": runtime,
        **speed,
        "acceptance_rate": attached.acceptance_rate,
        "identical_greedy_answers": sum(
            a.token_ids == b.token_ids for a, b in zip(alone, drafted, strict=True)
        ),
        "answers_compared": len(prompts),
    }
