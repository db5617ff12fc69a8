"""Helpers for the server tests: run `chatdistill serve` as a real process on loopback, and build
a model that never ends its answer (so queueing, disconnects and timeouts can be tested without
depending on when a random model happens to emit EOS)."""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: Path, log: Path, *args: str) -> Server:
    """Start `python -m chatdistill.cli serve MODEL_DIR --port P ARGS` without waiting for it."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CHATDISTILL_API_KEY", None)
    cmd = [sys.executable, "-m", "chatdistill.cli", "serve", str(model_dir), "--port", str(port)]
    out = log.open("wb")
    proc = subprocess.Popen([*cmd, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(url=f"http://127.0.0.1:{port}", process=proc, log=log)


def wait_ready(server: Server, timeout_s: float = 120.0) -> None:
    """Poll /health until the server answers; fail with its log if it dies or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.output()}"
            )
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer /health in {timeout_s} s:\n{server.output()}")


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextmanager
def running_server(model_dir: Path, log: Path, *args: str) -> Iterator[Server]:
    server = launch(model_dir, log, *args)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)


@contextmanager
def serving_app(app) -> Iterator[str]:
    """Serve an ASGI app made in this process (uvicorn, on loopback, in a thread); yields its
    URL. For tests that need the server's scheduler in hand."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60  # a bound, only so a bug cannot hang the test
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the app never started"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_endless(model_dir: Path) -> Path:
    """Rewrite a tiny Llama's output head so that greedy decoding never picks EOS: the final
    norm keeps only hidden unit 0, and the head maps its sign to one of two letter tokens ("a"
    or "b") with logit +-1000 * |unit 0|; every other logit is 0, so the argmax is always "a" or
    "b" and each greedy answer runs to its max_tokens. (Sampling could still pick EOS when unit 0
    happens to be near 0, so the tests that rely on this decode with temperature 0.)"""
    tok = AutoTokenizer.from_pretrained(model_dir)
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    norm = torch.zeros_like(weights["model.norm.weight"])
    norm[0] = 1.0
    head = torch.zeros_like(weights["lm_head.weight"])
    head[a, 0], head[b, 0] = 1000.0, -1000.0
    weights["model.norm.weight"], weights["lm_head.weight"] = norm, head
    save_file(weights, path, metadata={"format": "pt"})
    return model_dir


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE body, in order (`[DONE]` included)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def metric_value(text: str, name: str) -> float:
    """Sum of the samples called exactly `name` (any labels) in Prometheus text output."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name:
            total += float(value)
    return total
