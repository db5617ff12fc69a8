"""From an OpenAI request to scheduler work and back: prompt ids, limits, sampling parameters,
then either one JSON answer or an SSE stream of chunks.

Every request is bounded by `ServeConfig.request_timeout_s` (queue time included) and is cancelled
in the scheduler as soon as its client goes away, so an abandoned request never holds a batch slot.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine, SamplingParams
from chatdistill.inference.scheduler import (
    Delta,
    Job,
    QueueFullError,
    Scheduler,
    SchedulerDownError,
)
from chatdistill.serve.config import ServeConfig
from chatdistill.serve.errors import APIError
from chatdistill.serve.metrics import ServerMetrics
from chatdistill.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    TextCompletion,
    Usage,
)

RETRY_AFTER_S = 1
_FINISHED = ("stop", "length")
# OpenAI's newer "developer" role is the system role under another name; chat templates know only
# the latter.
_TEMPLATE_ROLE = {"developer": "system"}


@dataclass
class _Outcome:
    """What one generation produced, whole or so far."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    parts: list[str] = field(default_factory=list)


class CompletionService:
    """Turns validated requests into scheduler jobs and jobs into OpenAI responses."""

    def __init__(
        self, engine: Engine, scheduler: Scheduler, cfg: ServeConfig, metrics: ServerMetrics
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.cfg = cfg
        self.metrics = metrics
        self.vocab_size = len(engine.tokenizer)

    # ------------------------------------------------------------------ public routes

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._check_model(body.model)
        messages = [
            {"role": _TEMPLATE_ROLE.get(m.role, m.role), "content": m.text()} for m in body.messages
        ]
        prompt_ids = await asyncio.to_thread(self._encode_chat, messages)
        limit = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        params = self._sampling(body, len(prompt_ids), body.requested_max_tokens(), limit)
        job = self._submit(prompt_ids, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return self._sse(job, self._chat_chunks(rid, len(prompt_ids), body))
        out = await self._collect(job, len(prompt_ids), request)
        return ChatCompletion(
            id=rid,
            model=self.cfg.model_name,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=out.text), finish_reason=out.finish_reason
                )
            ],
            usage=Usage.of(len(prompt_ids), out.completion_tokens),
        )

    async def complete(self, body: CompletionRequest, request: Request) -> Any:
        self._check_model(body.model)
        prompt_ids = await asyncio.to_thread(self._encode_prompt, body.prompt)
        params = self._sampling(body, len(prompt_ids), body.max_tokens, "max_tokens")
        job = self._submit(prompt_ids, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return self._sse(job, self._text_chunks(rid, len(prompt_ids), body))
        out = await self._collect(job, len(prompt_ids), request)
        return TextCompletion(
            id=rid,
            model=self.cfg.model_name,
            choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
            usage=Usage.of(len(prompt_ids), out.completion_tokens),
        )

    # ------------------------------------------------------------------ request -> job

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(
                404,
                f"model '{name}' is not served here; use '{self.cfg.model_name}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.engine.encode_chat(messages)
        except Exception as e:  # a template may reject e.g. a role order: the request's fault
            raise APIError(
                400, f"messages: the model's chat template rejected them: {e}", param="messages"
            ) from e

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.engine.tokenizer.encode(prompt, add_special_tokens=False))
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
                code="invalid_value",
            )
        return list(prompt)

    def _sampling(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_len: int,
        requested: int | None,
        limit_name: str,
    ) -> SamplingParams:
        """Sampling parameters, after checking that prompt and answer fit the context window;
        `limit_name` is the request field that set `requested`, for the error message."""
        ctx = self.engine.context_length
        chat = isinstance(body, ChatCompletionRequest)
        if prompt_len >= ctx:
            raise APIError(
                400,
                f"the prompt is {prompt_len} tokens but the model's context window is {ctx}; "
                "shorten the conversation",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        if requested is None:
            requested = min(self.cfg.default_max_tokens, room)
        elif requested > room:
            raise APIError(
                400,
                f"{limit_name}={requested} does not fit: the prompt is {prompt_len} tokens and the "
                f"context window {ctx}, so at most {room} new tokens; lower {limit_name}",
                param=limit_name,
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_new_tokens=requested,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_list(),
            seed=body.seed,
        )

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        try:
            return self.scheduler.submit(prompt_ids, params)
        except UserError as e:  # the engine's own checks; ours above should have caught it first
            raise APIError(400, str(e), code="invalid_value") from e
        except QueueFullError as e:
            raise APIError(
                429,
                f"the server is busy: all {self.cfg.max_batch} batch slots are taken and "
                f"{self.cfg.max_queue} requests are waiting for one; retry shortly",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from e
        except SchedulerDownError as e:
            raise APIError(
                503,
                f"the server cannot generate ({e}); it needs a restart, see its log",
                code="engine_unavailable",
            ) from e

    # ------------------------------------------------------------------ job -> response

    def _failure(self, reason: str | None) -> APIError:
        """The error for a job that ended without `stop` or `length`."""
        if reason == "timeout":
            return APIError(
                504,
                f"the request took longer than the server's limit of "
                f"{self.cfg.request_timeout_s:g} s and was cancelled; ask for fewer tokens or "
                "retry when the server is less busy",
                code="request_timeout",
            )
        if reason == "cancelled":
            return APIError(
                503, "the server cancelled the request (shutting down?)", code="cancelled"
            )
        return APIError(500, "generation failed; see the server log", code="generation_error")

    async def _deltas(self, job: Job, prompt_tokens: int) -> AsyncIterator[Delta]:
        """The job's deltas; `asyncio.TimeoutError` once `request_timeout_s` has passed (a timer
        cancels the job, so nothing runs on for a client that was told it timed out). Records the
        inter-token gaps and, at the end, the request's metrics."""
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            job.cancel()

        timer = asyncio.get_running_loop().call_later(self.cfg.request_timeout_s, expire)
        last, tokens, reason = None, 0, "cancelled"
        try:
            async with aclosing(job.stream()) as stream:
                async for delta in stream:
                    if delta.finish_reason == "cancelled" and expired:
                        reason = "timeout"
                        raise asyncio.TimeoutError
                    now = time.monotonic()
                    if delta.token_ids:
                        if last is not None:
                            self.metrics.observe_token_gap(now - last, len(delta.token_ids))
                        last = now
                        tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        reason = delta.finish_reason
                    yield delta
        finally:
            timer.cancel()
            if reason == "cancelled":  # the consumer stopped early: free the batch slot
                job.cancel()
            self._record(job, prompt_tokens, tokens, reason)

    def _record(self, job: Job, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        self.metrics.observe_finished(
            queued_at=job.queued_at,
            started_at=job.started_at,
            first_token_at=job.first_token_at,
            finished_at=job.finished_at if job.finished_at is not None else time.monotonic(),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=reason,
        )

    async def _collect(self, job: Job, prompt_tokens: int, request: Request) -> _Outcome:
        """Run the job to the end; cancel it if the client leaves or the deadline passes."""
        out = _Outcome()

        async def gather() -> None:
            async for delta in self._deltas(job, prompt_tokens):
                out.parts.append(delta.text)
                out.completion_tokens += len(delta.token_ids)
                out.finish_reason = delta.finish_reason or out.finish_reason

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            gone.cancel()
        if not work.done():
            # The client left: stop the work and let `_deltas` cancel the job on its way out.
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "client closed the request", code="client_closed_request")
        if isinstance(work.exception(), asyncio.TimeoutError):
            raise self._failure("timeout")
        work.result()
        if out.finish_reason not in _FINISHED:
            raise self._failure(out.finish_reason)
        out.text = "".join(out.parts)
        return out

    def _sse(self, job: Job, chunks: "_ChunkMaker") -> "_JobStream":
        """An SSE response: a role chunk, content chunks, the finish chunk, an optional usage
        chunk, `[DONE]`. Starlette cancels this generator when the client disconnects; the
        `finally` in `_deltas` then cancels the job."""

        async def events() -> AsyncIterator[str]:
            yield _event(chunks.first())
            completion_tokens, reason = 0, None
            try:
                async with aclosing(self._deltas(job, chunks.prompt_tokens)) as deltas:
                    async for delta in deltas:
                        completion_tokens += len(delta.token_ids)
                        reason = delta.finish_reason
                        finished = reason if reason in _FINISHED else None
                        if delta.text or finished:
                            yield _event(chunks.piece(delta.text, finished))
            except asyncio.TimeoutError:
                reason = "timeout"
            if reason in _FINISHED:
                if chunks.include_usage:
                    yield _event(chunks.usage(completion_tokens))
            else:
                yield _event(self._failure(reason).body())
            yield "data: [DONE]\n\n"

        return _JobStream(
            events(),
            job,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _chat_chunks(
        self, rid: str, prompt_tokens: int, body: ChatCompletionRequest
    ) -> "_ChunkMaker":
        created, name = int(time.time()), self.cfg.model_name

        def make(delta: ChunkDelta, reason: str | None) -> dict[str, Any]:
            choice = ChatChunkChoice(delta=delta, finish_reason=reason)
            return ChatCompletionChunk(
                id=rid, created=created, model=name, choices=[choice]
            ).model_dump()

        return _ChunkMaker(
            first=lambda: make(ChunkDelta(role="assistant", content=""), None),
            piece=lambda text, reason: make(ChunkDelta(content=text or None), reason),
            prompt_tokens=prompt_tokens,
            usage=lambda n: ChatCompletionChunk(
                id=rid, created=created, model=name, choices=[], usage=Usage.of(prompt_tokens, n)
            ).model_dump(),
            include_usage=body.include_usage(),
        )

    def _text_chunks(self, rid: str, prompt_tokens: int, body: CompletionRequest) -> "_ChunkMaker":
        created, name = int(time.time()), self.cfg.model_name

        def make(text: str, reason: str | None) -> dict[str, Any]:
            choice = CompletionChoice(text=text, finish_reason=reason)
            chunk = TextCompletion(id=rid, created=created, model=name, choices=[choice])
            return chunk.model_dump()

        return _ChunkMaker(
            first=lambda: make("", None),
            piece=make,
            prompt_tokens=prompt_tokens,
            usage=lambda n: TextCompletion(
                id=rid, created=created, model=name, choices=[], usage=Usage.of(prompt_tokens, n)
            ).model_dump(),
            include_usage=body.include_usage(),
        )


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends, including a client
    that disconnects before the first chunk (the event generator never starts, so its own
    cleanup never runs). Cancelling a finished job does nothing."""

    def __init__(self, content: AsyncIterator[str], job: Job, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


@dataclass
class _ChunkMaker:
    """How one endpoint shapes its stream: the opening chunk, a content chunk, the usage chunk."""

    first: Callable[[], dict[str, Any]]
    piece: Callable[[str, str | None], dict[str, Any]]
    prompt_tokens: int
    usage: Callable[[int], dict[str, Any]]
    include_usage: bool


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _client_gone(request: Request) -> None:
    """Return once the client disconnects. The body has been read, so the server's `receive`
    now only ever yields `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
