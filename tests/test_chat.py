"""`chatdistill chat`: driven through a pipe and through a real terminal (tmux)."""

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from chatdistill.errors import UserError
from chatdistill.inference.chat import PROMPT, Conversation, run_chat
from chatdistill.inference.engine import Engine, SamplingParams

from conftest import build_tiny_model

_SCRIPT = Path(sys.executable).with_name("chatdistill")
CLI = [str(_SCRIPT) if _SCRIPT.exists() else "chatdistill", "chat"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def model_dir(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A model that never ends its answer under greedy (EOS logit 0) and has a long context."""
    out = tmp_path_factory.mktemp("chatty")
    build_tiny_model(out, tokenizer_dir, "llama", max_position_embeddings=8192)
    engine = Engine.load(str(out))
    with torch.no_grad():
        for eos in engine.eos_token_ids:
            engine.model.lm_head.weight[eos] = 0
    engine.model.save_pretrained(out)
    return out


def _reply(engine: Engine, messages: list[dict], max_new_tokens: int = 8) -> str:
    return engine.chat(messages, SamplingParams(max_new_tokens=max_new_tokens)).text


def test_piped_conversation_streams_answers_and_reset_forgets(model_dir):
    script = (
        "How much is the lamp?\nDo you ship it to Oslo?\n/reset\nDo you ship it to Oslo?\n/exit\n"
    )
    run = subprocess.run(
        [
            *CLI,
            str(model_dir),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--system",
            "Be brief.",
        ],
        input=script,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    engine = Engine.load(str(model_dir))
    system = {"role": "system", "content": "Be brief."}
    first = _reply(engine, [system, {"role": "user", "content": "How much is the lamp?"}])
    followup = [
        system,
        {"role": "user", "content": "How much is the lamp?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Do you ship it to Oslo?"},
    ]
    second = _reply(engine, followup)
    fresh = _reply(engine, [system, {"role": "user", "content": "Do you ship it to Oslo?"}])
    answers = run.stdout.split(PROMPT)[1:]
    assert answers[0] == first + "\n"
    assert answers[1] == second + "\n"
    assert answers[2] == "(history cleared)\n"
    assert answers[3] == fresh + "\n"


def test_end_of_input_exits_cleanly(model_dir):
    run = subprocess.run(
        [*CLI, str(model_dir), "--max-new-tokens", "4"],
        input="hello\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr


def test_bad_flags_are_one_line_errors(model_dir):
    for args in (
        [str(model_dir), "--temperature", "-1"],
        [str(model_dir), "--max-new-tokens", "5000"],
    ):
        run = subprocess.run(
            [*CLI, *args], input="", capture_output=True, text=True, env=ENV, timeout=300
        )
        assert run.returncode == 2, args
        assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr


class _Reader:
    """Collects a child's stdout in a thread so the test can wait for text without blocking."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            with self._lock:
                self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, predicate, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.text):
                    return self.text
            time.sleep(0.05)
        raise AssertionError(f"timed out; output so far: {self.text[-500:]!r}")


def _start(args: list[str]) -> tuple[subprocess.Popen, _Reader]:
    proc = subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        # A shell's background jobs start with SIGINT ignored; a terminal user's chat never does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return proc, _Reader(proc.stdout)


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(chatty_dir):
    proc, out = _start([str(chatty_dir), "--temperature", "0", "--max-new-tokens", "6000"])
    try:
        out.wait_for(lambda t: t.count(PROMPT) == 1)
        proc.stdin.write(b"Tell me everything.\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t.split(PROMPT, 1)[1]) > 20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        text = out.wait_for(lambda t: t.count(PROMPT) == 2)
        assert " [stopped]\n" in text
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()


def test_ctrl_c_at_the_prompt_exits_cleanly(model_dir):
    proc, out = _start([str(model_dir)])
    try:
        out.wait_for(lambda t: PROMPT in t)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()


def test_ctrl_c_before_the_first_token_cancels_the_turn_not_the_chat(
    model_dir, monkeypatch, capsys
):
    """Ctrl-C that lands while the prompt is prepared returns to the prompt with no history."""
    calls = []
    original = Conversation.prompt_for

    def interrupted_once(self, text):
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self, text)

    monkeypatch.setattr(Conversation, "prompt_for", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/exit\n"))
    run_chat(str(model_dir), temperature=0, max_new_tokens=4)
    out = capsys.readouterr().out
    assert calls == ["first", "second"]
    assert out.count(PROMPT) == 3 and " [stopped]\n" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_real_terminal_session_with_tmux(chatty_dir, tmp_path):
    session = f"chatdistill-test-{os.getpid()}"
    done = tmp_path / "exit-status"
    cmd = " ".join([*CLI, str(chatty_dir), "--temperature", "0", "--max-new-tokens", "6000"])
    env = " ".join(f"{k}={v}" for k, v in ENV.items() if k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS"))
    tmux = ["tmux", "-L", session]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
         # The pane's shell gets Ctrl-C too: a trap keeps it alive (and the child's default).
         f"trap : INT; cd {os.getcwd()} && env {env} {cmd}; echo $? > {done}; sleep 60"],
        check=True,
    )  # fmt: skip

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout

    def wait_screen(predicate) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if predicate(text := screen()):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out; screen: {screen()!r}")

    try:
        wait_screen(lambda s: PROMPT.strip() in s)
        subprocess.run([*tmux, "send-keys", "-t", session, "Tell me everything.", "Enter"])
        # capture-pane pads the screen with blank lines: count only what was written
        wait_screen(
            lambda s: (
                s.count(">>>") == 1
                and "everything." in s
                and len(s.split("everything.", 1)[1].strip()) > 40
            )
        )
        subprocess.run([*tmux, "send-keys", "-t", session, "C-c"])
        wait_screen(lambda s: "[stopped]" in s and s.rstrip().endswith(">>>"))
        subprocess.run([*tmux, "send-keys", "-t", session, "C-d"])
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.read_text().strip() == "0"
        assert "Traceback" not in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_history_drops_oldest_exchanges_but_keeps_the_system_turn(model_dir):
    engine = Engine.load(str(model_dir))
    conv = Conversation(engine, "You are a helpful shop assistant.", max_new_tokens=400)
    for i in range(8):
        conv.add(f"How much is the kettle number {i}?", f"The kettle {i} costs {i} euros.")
    messages = conv.prompt_for("And the mug?")
    assert messages[0]["role"] == "system"
    assert messages[-1] == {"role": "user", "content": "And the mug?"}
    assert len(engine.encode_chat(messages)) <= engine.context_length - 400
    kept = [m["content"] for m in messages if m["role"] == "user"][:-1]
    assert kept and "number 7" in kept[-1] and "number 0" not in " ".join(kept)
    assert conv.prompt_for("mug " * 200) is None


def test_too_many_new_tokens_for_the_context_is_a_user_error(model_dir):
    engine = Engine.load(str(model_dir))
    with pytest.raises(UserError, match="max-new-tokens"):
        Conversation(engine, None, max_new_tokens=engine.context_length)
