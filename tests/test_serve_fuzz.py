"""Malformed requests, generated from a seed, against a real server: none may be answered 5xx or
hang, and the server must be healthy and answering afterwards.

The bodies start from valid requests and break them the ways clients do: wrong types, huge and
negative integers, NaN and infinities, lone UTF-16 surrogates, control tokens, nested junk,
missing and unknown fields, whole bodies that are not objects, and bytes that are not JSON. The
model has a 64-token context, so a body that happens to be valid generates only a few tokens.
"""

import json
import random
from collections.abc import Iterator

import httpx
import pytest
from serve_helpers import running_server

from conftest import build_tiny_model

SEED = 20240611
BODIES = 600
# A bound per request, only so that a hang fails the test instead of stalling it.
CLIENT_TIMEOUT_S = 60

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "logprobs",
    "top_logprobs", "logit_bias", "user", "echo", "suffix", "frequency_penalty",
    "presence_penalty",
]  # fmt: skip


def _junk(rng: random.Random, depth: int = 0) -> object:
    """One value of a type and size a field would not expect."""
    scalars = [
        None, True, False, 0, -1, 1, 3, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40,
        -(10**40), 0.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "3",
        "\ud800", "a\udfffb", "\ud83d", "\x00", "<|im_end|>\n<|im_start|>system\n", "😀" * 4,
        "x" * 2000, "user", "text", "assistant",
    ]  # fmt: skip
    roll = rng.random()
    if depth > 3 or roll < 0.6:
        return rng.choice(scalars)
    if roll < 0.75:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.9:
        keys = rng.sample([*FIELDS, "role", "content", "type", "text", "\ud800", ""], 2)
        return {k: _junk(rng, depth + 1) for k in keys}
    nested: object = rng.choice([1, "x", None])
    for _ in range(rng.randint(20, 200)):
        nested = [nested] if rng.random() < 0.5 else {"a": nested}
    return nested


def _message(rng: random.Random) -> object:
    message: dict = {"role": "user", "content": "How much is the kettle?"}
    roll = rng.random()
    if roll < 0.3:
        message[rng.choice(["role", "content", "name"])] = _junk(rng)
    elif roll < 0.45:
        message.pop(rng.choice(["role", "content"]))
    elif roll < 0.6:
        message["content"] = [{"type": rng.choice(["text", "image_url", 1]), "text": _junk(rng)}]
    elif roll < 0.7:
        message[rng.choice(["tool_calls", "\ud800", "x"])] = _junk(rng)
    elif roll < 0.8:
        return _junk(rng)
    return message


def _body(rng: random.Random) -> tuple[str, object]:
    """(path, body) where body is a JSON-able object or raw bytes."""
    chat = rng.random() < 0.6
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        body: dict = {"messages": [_message(rng) for _ in range(rng.randint(1, 3))]}
    else:
        body = {"prompt": rng.choice(["The mug", [5, 6, 7], "\ud800 x", [2**70], [], "<|im_end|>"])}
    body.update(max_tokens=rng.choice([1, 2, 3]), temperature=rng.choice([0, 0.7, 1.0]))
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.55:
            body[rng.choice(FIELDS)] = _junk(rng)
        elif roll < 0.7:
            body.pop(rng.choice(list(body) or ["model"]), None)
        elif roll < 0.8:
            body[rng.choice(["tools", "functions", "\udcff", "", "x" * 300])] = _junk(rng)
        elif roll < 0.88:
            body["stream"] = True
        else:
            return path, _junk(rng)
    return path, body


def _raw(rng: random.Random) -> bytes:
    """A body that is not (valid) JSON at all."""
    return rng.choice(
        [
            b"",
            b"{",
            b'{"messages": [',
            b"\xff\xfe{}",
            b'{"prompt": "\xc3\x28"}',
            b'\xef\xbb\xbf{"prompt": "hi"}',
            b'{"prompt": "hi", "prompt": 5}',
            b'{"prompt": NaN}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b"null",
            b"\x00" * 64,
            rng.randbytes(rng.randint(1, 200)),
        ]
    )


def generated_requests(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` (path, encoded body) pairs, the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.1:
            yield rng.choice(["/v1/chat/completions", "/v1/completions"]), _raw(rng)
            continue
        path, body = _body(rng)
        yield path, json.dumps(body, allow_nan=True).encode()


def test_generated_requests_are_deterministic():
    first = list(generated_requests(SEED, 50))
    assert first == list(generated_requests(SEED, 50))
    assert first != list(generated_requests(SEED + 1, 50))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("fuzz")
    model = build_tiny_model(root / "model", tokenizer_dir, "llama", max_position_embeddings=64)
    with running_server(model, root / "server.log", "--max-batch", "4") as srv:
        yield srv


def _send(http: httpx.Client, url: str, body: bytes) -> tuple[int, str]:
    """Status and the whole body (streams are read to the end)."""
    headers = {"Content-Type": "application/json"}
    with http.stream("POST", url, content=body, headers=headers) as resp:
        return resp.status_code, resp.read().decode(errors="replace")


def test_malformed_requests_are_never_5xx_and_never_hang(server):
    failures, statuses = [], {}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        for i, (path, body) in enumerate(generated_requests(SEED, BODIES)):
            try:
                status, text = _send(http, server.url + path, body)
            except httpx.TimeoutException:
                failures.append(f"#{i} {path} hung: {body[:200]!r}")
                continue
            except httpx.TransportError as e:
                failures.append(f"#{i} {path} {e!r}: {body[:200]!r}")
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500:
                failures.append(f"#{i} {path} -> {status} {text[:200]}: {body[:200]!r}")
            elif status >= 400:
                error = json.loads(text)["error"]
                assert set(error) == {"message", "type", "param", "code"}, (i, text)
    assert not failures, f"{len(failures)} of {BODIES}:\n" + "\n".join(failures[:20])
    assert statuses.get(400, 0) > BODIES // 2, statuses  # the bodies are mostly malformed
    assert statuses.get(200, 0) > 0, statuses  # and some are valid: the generator reaches both
    health = httpx.get(server.url + "/health", timeout=CLIENT_TIMEOUT_S)
    assert health.status_code == 200 and health.json()["running"] == 0
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "The mug", "max_tokens": 2, "temperature": 0},
        timeout=CLIENT_TIMEOUT_S,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
