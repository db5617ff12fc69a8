"""OpenAI-compatible request and response models, in the order the OpenAI API reference lists them.

Only shapes and per-field checks live here; anything that needs the model (context window, token
ids, the served name) is checked by the serving code in `serve/app.py`. Requests are strict: an
unknown field or a value of the wrong type is a 400, not silently coerced or ignored, so a client
learns at once that `tools` or `logprobs` are not served. Fields that OpenAI defines but this
server does not implement are accepted only at their neutral value. Fields that are not part of the
OpenAI API are grouped at the end of each request under "extensions".
"""

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from chatdistill.inference.engine import SEED_MAX, SEED_MIN

MAX_STOP_SEQUENCES = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def lone_surrogate(value: object) -> str | None:
    """Where in a parsed JSON value (keys included) a string holds a lone UTF-16 surrogate, as a
    dotted path, or None. JSON's `\\ud800` escapes decode to such strings, which no tokenizer
    can encode and no response can carry as UTF-8."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:  # a stack, not recursion: the body may be nested thousands deep
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and _has_surrogate(key):
                    return path or "body"
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), c) for i, c in enumerate(item))
        elif isinstance(item, str) and _has_surrogate(item):
            return path or "body"
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class TextContentPart(_Request):
    """One part of a message's content list; only text parts are served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined in order)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingChecks(_Request):
    """Checks and helpers shared by chat and text completions; each request declares its own
    fields so that they stay in the OpenAI reference order."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(
                f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                "send valid Unicode text"
            )
        return data

    @field_validator("n", check_fields=False)
    @classmethod
    def _only_one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported; send several requests for several answers")
        return v

    @field_validator("frequency_penalty", "presence_penalty", check_fields=False)
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("penalties are not supported; leave this field at 0")
        return v

    @field_validator("logit_bias", check_fields=False)
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported; leave it out")
        return v

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingChecks):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(
        None, ge=1, description="deprecated alias of max_completion_tokens"
    )
    n: int = 1
    presence_penalty: float = 0.0
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_logprobs: int | None = None
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- extensions (not in the OpenAI API) ---
    top_k: int = Field(
        0, ge=0, description="extension: sample from the k most likely tokens (0=off)"
    )

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported; leave this field out or false")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("top_logprobs is not supported; leave it out")
        return v

    @model_validator(mode="after")
    def _one_length_limit(self) -> "ChatCompletionRequest":
        a, b = self.max_completion_tokens, self.max_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(
                "max_tokens and max_completion_tokens disagree; send only max_completion_tokens"
            )
        return self

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(_SamplingChecks):
    """`POST /v1/completions` body. `prompt` is a string or a list of token ids."""

    model: str | None = None
    prompt: str | list[int]
    echo: bool = False
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int = Field(16, ge=1)
    n: int = 1
    presence_penalty: float = 0.0
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- extensions (not in the OpenAI API) ---
    top_k: int = Field(
        0, ge=0, description="extension: sample from the k most likely tokens (0=off)"
    )

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported; leave it out or false")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs are not supported; leave this field out")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported; leave it out")
        return v


# ---------------------------------------------------------------- responses

FinishReason = Literal["stop", "length"]


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """A streamed piece of the assistant message; unset fields are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason | None = None


class TextCompletion(BaseModel):
    """A text completion, whole (`usage` set) or one streamed chunk (`usage` only on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "chatdistill"
    # --- extensions (not in the OpenAI API) ---
    context_length: int | None = Field(None, description="extension: prompt + output token limit")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
