"""`chatdistill chat MODEL_DIR`: talk to a model in the terminal.

Answers stream as they are generated. The history is kept within the model's context window by
dropping the oldest exchanges (the system turn stays). `/reset` clears the history, `/exit` quits;
Ctrl-C during an answer (or before its first token) stops that answer; Ctrl-C or Ctrl-D at the
prompt quits.
"""

from __future__ import annotations

import contextlib
import sys

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine, SamplingParams

PROMPT = ">>> "
HELP = "/reset clears the history, /exit quits, Ctrl-C stops an answer."


class Conversation:
    """The chat so far, trimmed so prompt + answer fit the context window."""

    def __init__(self, engine: Engine, system: str | None, max_new_tokens: int) -> None:
        self.engine = engine
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # alternating user / assistant messages
        self.budget = engine.context_length - max_new_tokens
        if self.budget < 1:
            raise UserError(
                f"--max-new-tokens {max_new_tokens} leaves no room for the conversation in the "
                f"model's context of {engine.context_length} tokens: lower it"
            )

    def reset(self) -> None:
        self.turns = []

    def prompt_for(self, user_text: str) -> list[dict] | None:
        """Messages for the next answer, dropping the oldest exchanges until they fit.

        Returns None when even the system turn and this message alone do not fit.
        """
        user = {"role": "user", "content": user_text}
        while True:
            messages = [*self.system, *self.turns, user]
            if len(self.engine.encode_chat(messages)) <= self.budget:
                return messages
            if not self.turns:
                return None
            del self.turns[:2]

    def add(self, user_text: str, answer: str) -> None:
        self.turns += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": answer},
        ]


def _answer(engine: Engine, messages: list[dict], params: SamplingParams) -> str:
    """Stream one answer to stdout; Ctrl-C stops it and keeps what was said so far."""
    pieces: list[str] = []

    def show(text: str) -> None:
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        engine.chat(messages, params, on_text=show)
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def run_chat(
    model_dir: str,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    system: str | None = None,
    top_p: float = 0.95,
    seed: int | None = None,
    device: str | None = None,
    draft: str | None = None,
    draft_tokens: int = 6,
    draft_int8: bool = False,
    draft_runtime: str = "torch",
) -> None:
    """Chat with the model in `model_dir` on stdin/stdout until /exit, Ctrl-C or Ctrl-D; with
    `draft`, answers decode speculatively with that model proposing `draft_tokens` a step."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    params.validate()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars would clutter the conversation
    engine = Engine.load(model_dir, device=device)
    if draft is not None:
        from chatdistill.inference.speculative import load_draft

        load_draft(engine, draft, draft_tokens, int8=draft_int8, runtime=draft_runtime)
    conversation = Conversation(engine, system, max_new_tokens)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print(f"chatting with {model_dir} ({engine.context_length} tokens of context). {HELP}")
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            conversation.reset()
            print("(history cleared)")
            continue
        if text in ("/help", "/?"):
            print(HELP)
            continue
        try:  # Ctrl-C before the first token (while the prompt is prepared) cancels this turn
            messages = conversation.prompt_for(line)
            if messages is None:
                print(
                    f"(that message does not fit in {conversation.budget} tokens of context; "
                    "shorten it or lower --max-new-tokens)"
                )
                continue
            conversation.add(line, _answer(engine, messages, params))
        except KeyboardInterrupt:
            print(" [stopped]")
