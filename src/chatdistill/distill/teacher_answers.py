"""Sequence-level KD (Kim & Rush 2016): the teacher's answers to prompts, as training data.

`generate_data` (the `generate-data` command) writes the teacher's answers as chat JSONL that any
recipe trains on. It appends and skips rows already written, so a killed run resumes.
"""

import json
import os
import time
from pathlib import Path

import torch

from chatdistill.config import OnPolicyConfig, TrainConfig, check_flag
from chatdistill.data import TRUNCATED, load_rows, split_prompt_reference
from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.distill.rollout import seeded_rng
from chatdistill.errors import UserError
from chatdistill.hashing import file_sha256
from chatdistill.inference.engine import Engine, SamplingParams
from chatdistill.models import ModelSource, inference_dtype, resolve
from chatdistill.progress import RateBar


def _settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".generate.json")


def _complete_lines(output: Path) -> int:
    """Count complete lines in `output`, cutting a half-written last line left by a killed run."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with output.open("rb+") as f:
            f.truncate(keep)
    return data[:keep].count(b"\n")


def generate_data(
    teacher: str | ModelSource,
    prompts: str,
    output: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    samples_per_prompt: int = 1,
    device: str | None = None,
    progress: bool = True,
    precision: str = "auto",
    replace_stale: bool = False,
) -> dict:
    """Write the teacher's answers to every prompt row as chat JSONL; resume a partial output.

    Each output row is the input row with its reference answer (if any) replaced by the teacher's;
    other fields are kept. Row i's sample j is seeded by (seed, i, j), so a resumed file equals an
    uninterrupted one. Returns a summary (rows written, truncated answers, tokens, tokens/s).
    The teacher's weights are in `precision` (see `models.inference_dtype`). An output made with
    other settings is refused, or with `replace_stale` written again.
    """
    if samples_per_prompt < 1:
        raise UserError(f"--samples-per-prompt {samples_per_prompt}: must be at least 1")
    # The ranges of the recipe's on-policy sampling and training fields, finite numbers only.
    check_flag("--max-new-tokens", max_new_tokens, OnPolicyConfig, "max_new_tokens")
    check_flag("--temperature", temperature, OnPolicyConfig, "temperature")
    check_flag("--top-p", top_p, OnPolicyConfig, "top_p")
    check_flag("--batch-size", batch_size, TrainConfig, "batch_size")
    check_flag("--seed", seed, TrainConfig, "seed")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(precision, device)
    if samples_per_prompt > 1 and temperature == 0:
        raise UserError(
            "--samples-per-prompt > 1 with --temperature 0 (greedy) repeats one answer; "
            "set --temperature above 0"
        )
    rows = load_rows(prompts)
    out = Path(output)
    teacher = resolve(teacher, "teacher")  # once: a GGUF file is hashed once
    settings = {
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "prompts_sha256": file_sha256(prompts),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "samples_per_prompt": samples_per_prompt,
        "precision": precision,
    }
    side = _settings_path(out)
    if out.exists():
        old = json.loads(side.read_text()) if side.is_file() else None
        if old is None:
            raise UserError(
                f"{out} exists and was not written by generate-data; pick a new --output"
            )
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff and not replace_stale:
            raise UserError(
                f"{out} was generated with another {diff[0]} ({old.get(diff[0])}); pass the same "
                "settings to resume, or pick a new --output"
            )
        if diff:
            print(f"{out} was generated with another {diff[0]}; answering again")
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(json.dumps(settings, indent=1))
    done = _complete_lines(out)
    jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)][done:]
    try:
        return _answer(
            teacher,
            rows,
            prompts,
            out,
            jobs,
            done,
            settings,
            batch_size,
            (device, dtype),
            progress,
        )
    except BaseException:
        if not out.exists() or out.stat().st_size == 0:  # nothing written: leave nothing behind
            out.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
        raise


def _answer(teacher, rows, prompts, out, jobs, done, settings, batch_size, placement, progress):
    """Answer `jobs` (row, sample) and append them to `out`; the summary `generate_data` returns."""
    max_new_tokens, temperature, top_p, seed = (
        settings[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")
    )
    device, dtype = placement
    engine = Engine.load(teacher, device=device, dtype=dtype)
    prompt_msgs = [split_prompt_reference(r["messages"])[0] for r in rows]
    ids = {}
    for i in sorted({i for i, _ in jobs}):
        ids[i] = engine.encode_chat(prompt_msgs[i])
        if len(ids[i]) >= engine.context_length:
            raise UserError(
                f"{prompts}: row {i + 1} has {len(ids[i])} prompt tokens, more than the teacher's "
                f"context ({engine.context_length}); shorten or drop it"
            )
    summary = {"rows": done, "truncated": 0, "new_tokens": 0, "seconds": 0.0}
    bar = RateBar("teacher answers", len(jobs), progress)
    started = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        step = batch_size * 4
        for a in range(0, len(jobs), step):
            part = jobs[a : a + step]
            params = [
                SamplingParams(
                    max_new_tokens, temperature, top_p, seed=seeded_rng(seed, i, j).getrandbits(62)
                )
                for i, j in part
            ]
            results = engine.generate([ids[i] for i, _ in part], params, batch_size=batch_size)
            for (i, _), c in zip(part, results, strict=True):
                answer = {"role": "assistant", "content": c.text}
                row = {**rows[i], "messages": [*prompt_msgs[i], answer]}
                if c.finish_reason == "length":  # cut mid-answer: it must not teach an ending
                    row[TRUNCATED] = True
                f.write(json.dumps(row) + "\n")
                summary["truncated"] += c.finish_reason == "length"
                summary["new_tokens"] += len(c.token_ids)
            f.flush()
            os.fsync(f.fileno())
            summary["rows"] += len(part)
            bar.advance(len(part), sum(len(c.token_ids) for c in results))
    bar.close()
    summary["seconds"] = time.perf_counter() - started
    summary["tokens_per_s"] = summary["new_tokens"] / max(summary["seconds"], 1e-9)
    return summary
