"""`accelerate launch` with two CPU processes (gloo) runs the same command and the same maths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ACCELERATE = Path(sys.executable).parent / "accelerate"


def _distill(out: Path, teacher: Path, data: Path, launcher: list[str], *extra: str) -> Path:
    cmd = launcher + [
        "-m", "chatdistill.cli", "distill", "--teacher", str(teacher),
        "--student-num-layers", "2", "--data", str(data), "--output", str(out),
        "--max-steps", "3", "--set", "train.batch_size=4", "--set", "train.save_every=2",
        "--set", "train.log_every=1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _steps(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_models, chat_file):
    launch = [str(ACCELERATE), "launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]  # fmt: skip
    two = _distill(tmp_path / "two", tiny_models["llama"], chat_file, launch)
    one = _distill(
        tmp_path / "one", tiny_models["llama"], chat_file, [sys.executable], "--set",
        "train.grad_accum=2",
    )  # fmt: skip
    # Same loss and same synchronised gradient norm at every step: the step is normalised by the
    # tokens of all processes, and DDP's averaging is undone.
    logs = [_steps(two), _steps(one)]
    assert len(logs[0]) == 3
    for r2, r1 in zip(*logs):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    # Adam turns float-summation-order noise in near-zero gradients into lr-sized steps, so the
    # weights agree to a few learning rates, not bit for bit.
    a, b = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=3 * 5e-4 * 2)
    assert (two / "checkpoints").is_dir() and (two / "config.json").is_file()
