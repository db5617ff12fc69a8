"""Continuous batching for the server: one decode thread, many concurrent requests.

The decode thread owns a `DecodeBatch` (see generate.py). Between two decode steps it drops
cancelled rows, admits waiting requests (prefilled several per forward pass, their KV caches merged
into the running batch; a prompt that breaks the forward fails alone), and after the step retires
finished rows, so a new request never waits for the whole batch to finish. Results travel to
callers as `Delta`s: `Job.stream()` for asyncio code (woken with `loop.call_soon_threadsafe`,
once per event loop per decode step), `Job.iter_sync()` for threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from chatdistill.inference.engine import (
    DecodeBatch,
    Engine,
    SamplingParams,
    Sequence,
    no_grad_mode,
    prefill_group,
)

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """`max_queue` requests are already waiting; the caller should answer 429 / retry later."""


class SchedulerDownError(Exception):
    """The decode thread is not running (stopped, or died of an error): nothing will be served."""


@dataclass
class Delta:
    """What a request produced since its previous Delta."""

    text: str  # new text (may be "")
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = (
        None  # None while running; "stop" | "length" | "cancelled" | "error"
    )
    error: str | None = None  # the exception message when finish_reason == "error"


class Wakeups:
    """asyncio events to set from another thread, one `call_soon_threadsafe` per event loop."""

    def __init__(self) -> None:
        self._events: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._events.setdefault(loop, []).append(event)

    def send(self) -> None:
        for loop, events in self._events.items():
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_all, events)
        self._events.clear()


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class Job:
    """One submitted generation: its progress, timings (time.monotonic()) and output stream."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_cancel: Callable[[Job], None],
    ) -> None:
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.text = ""  # everything streamed so far; the final text once finished
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested = False
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: deque[Delta] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def _push(self, delta: Delta, wakeups: Wakeups | None = None) -> None:
        """Called by the decode thread (or by cancel/shutdown) to hand over a Delta. With
        `wakeups` the listener is woken when they are sent (once per decode step for all rows)."""
        with self._cond:
            self.text += delta.text
            if delta.finish_reason is not None:
                self.finish_reason, self.error = delta.finish_reason, delta.error
                self.finished_at = time.monotonic()
            self._deltas.append(delta)
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None:
            pending = Wakeups() if wakeups is None else wakeups
            pending.add(loop, event)
            if wakeups is None:
                pending.send()

    async def stream(self) -> AsyncIterator[Delta]:
        """Yield Deltas as they come; the last one has `finish_reason` set.

        Leaving the loop early (client gone, task cancelled) cancels the request.
        """
        with self._cond:
            if self._loop is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            event = self._event
        finished = False
        try:
            while not finished:
                with self._cond:
                    items = list(self._deltas)
                    self._deltas.clear()
                    if not items:
                        # Cleared under the lock: a Delta pushed after this sets it again.
                        event.clear()
                if not items:
                    await event.wait()
                    continue
                for delta in items:
                    finished = delta.finish_reason is not None
                    yield delta
        finally:
            if not finished:
                self.cancel()

    def iter_sync(self) -> Iterator[Delta]:
        """Blocking iterator over the Deltas, for threads and tests."""
        while True:
            with self._cond:
                while not self._deltas:
                    self._cond.wait()
                delta = self._deltas.popleft()
            yield delta
            if delta.finish_reason is not None:
                return

    def cancel(self) -> None:
        """The client went away: free the slot before the next decode step (no-op when finished)."""
        if self.finish_reason is None and not self.cancel_requested:
            self.cancel_requested = True
            self._on_cancel(self)


class Scheduler:
    """Runs requests on `engine` with continuous batching, up to `max_batch` rows at a time;
    up to `max_queue` more wait for a row, and beyond that `submit` refuses.

    A failure while decoding ends only the requests it concerns (a request whose sampling state
    cannot be built fails alone; a failed forward fails the rows that shared it) and the thread
    goes on. Should the thread itself die, every request it held ends with an error, `failure`
    says why and `submit` refuses, so callers never wait on a thread that is gone.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_finish: Callable[[Job], None] | None = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._batch = DecodeBatch(engine)
        self._num_running = 0
        self._taken: set[Job] = set()  # jobs taken from the queue that have not ended yet
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the decode thread died, once it has

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def healthy(self) -> bool:
        """The decode thread is running and will serve what is submitted."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.failure is None and not self._stopping

    def start(self) -> None:
        """Start the decode thread (once)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self.failure = None
        self._thread = threading.Thread(target=self._run, name="chatdistill-decode", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the decode thread; requests still running or waiting end as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in list(self._batch.seqs):
            seq.finish("cancelled")
            self._deliver(seq, "")
        self._batch = DecodeBatch(self.engine)
        self._num_running = 0
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            self._end(job, "cancelled")

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Job:
        """Queue a request. Raises `UserError` for bad params/prompt, `QueueFullError` when
        `max_queue` requests would be waiting for a row, `SchedulerDownError` once the decode
        thread has died (or was shut down)."""
        params.validate()
        self.engine.check_prompt(prompt_ids)
        job = Job(request_id or f"job-{uuid.uuid4().hex[:16]}", prompt_ids, params, self._cancel)
        with self._cond:
            if self.failure is not None or self._stopping:
                raise SchedulerDownError(self.failure or "the scheduler is shutting down")
            # Requests that a free row will take at once do not count as waiting.
            if len(self._waiting) + len(self._taken) >= self.max_batch + self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                waiting = True
            else:
                waiting = False
                self._cond.notify_all()
        if waiting:
            self._end(job, "cancelled")

    def _release(self, job: Job) -> None:
        """Give back the job's row before its last Delta goes out, so a caller that reacts to
        that Delta with a new request finds the row free."""
        with self._cond:
            self._taken.discard(job)

    def _end(self, job: Job, reason: str, error: str | None = None) -> None:
        """End a job outside the normal delivery of its row (cancelled, failed)."""
        self._release(job)
        job._push(Delta("", [], reason, error))
        self._finished(job)

    def _finished(self, job: Job) -> None:
        if self.on_finish is None:
            return
        try:
            self.on_finish(job)
        except Exception:
            log.exception("on_finish hook failed for %s", job.id)

    def _deliver(self, seq: Sequence, text: str, wakeups: Wakeups | None = None) -> None:
        """Send a row's progress to its request as one Delta (nothing when there is no news)."""
        job: Job = seq.tag
        sent = job.completion_tokens
        new_ids = seq.token_ids[sent:]
        job.completion_tokens = len(seq.token_ids)
        job.first_token_at = seq.first_token_at
        if seq.finish_reason is not None:
            self._release(job)
        if text or new_ids or seq.finish_reason is not None:
            job._push(Delta(text, new_ids, seq.finish_reason), wakeups)
        if seq.finish_reason is not None:
            self._finished(job)

    def _run(self) -> None:
        try:
            self.engine.model.eval()
            with no_grad_mode():
                self._loop()
        except BaseException as e:  # nothing above to catch it: record it and end every job
            log.exception("the decode thread died")
            self._died(f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._batch:
                    self._cond.wait()
                if self._stopping:
                    return
                room = self.max_batch - len(self._batch)
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._taken.update(admit)
            try:
                self._drop_cancelled()
                self._admit(admit)
                if self._batch:
                    self._step()
            except Exception as e:  # a bug outside the per-request guards: fail the rows in hand
                log.exception("decode loop failed")
                with self._cond:
                    taken = list(self._taken)
                self._fail(taken, str(e))
                self._batch = DecodeBatch(self.engine)
            self._num_running = len(self._batch)

    def _fail(self, jobs: list[Job], error: str) -> None:
        """End each unfinished job in `jobs` with `error`."""
        for job in jobs:
            if job.finish_reason is None:
                self._end(job, "error", error)

    def _died(self, error: str) -> None:
        with self._cond:
            self.failure = error
            jobs = [*self._taken, *self._waiting]
            self._waiting.clear()
        self._fail(jobs, error)
        self._batch = DecodeBatch(self.engine)
        self._num_running = 0

    def _drop_cancelled(self) -> None:
        for seq in self._batch.seqs:
            if seq.tag.cancel_requested:
                self._deliver(seq, seq.finish("cancelled"))
        self._batch.retire()

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted requests, several per forward pass (`prefill_group`)."""
        seqs = []
        for job in jobs:
            if job.cancel_requested:
                self._end(job, "cancelled")
                continue
            try:
                seq = Sequence(self.engine, job.prompt_ids, job.params)
            except Exception as e:  # e.g. a seed the generator refuses: this request alone fails
                log.exception("could not start %s", job.id)
                self._end(job, "error", str(e))
                continue
            seq.tag = job
            job.started_at = seq.started_at
            seqs.append(seq)
        while seqs:
            n = prefill_group((len(s.prompt_ids) for s in seqs), len(seqs))
            group, seqs = seqs[:n], seqs[n:]
            try:
                texts = self._batch.add_many(group)
            except Exception:  # some prompt broke the forward: one by one, to fail only that one
                self._prefill_alone(group)
                continue
            self._num_running = len(self._batch)
            for seq, text in zip(group, texts, strict=True):
                self._deliver(seq, text)

    def _prefill_alone(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            try:
                text = self._batch.add(seq)
            except Exception as e:  # this prompt broke the forward; the running batch is untouched
                log.exception("prefill failed for %s", seq.tag.id)
                self._end(seq.tag, "error", str(e))
                continue
            self._num_running = len(self._batch)
            self._deliver(seq, text)

    def _step(self) -> None:
        seqs = list(self._batch.seqs)
        try:
            texts = self._batch.step()
        except Exception as e:  # the shared cache is now unusable: fail the rows, start afresh
            log.exception("decode step failed")
            self._batch = DecodeBatch(self.engine)
            for seq in seqs:
                seq.finish("error")
                self._end(seq.tag, "error", str(e))
            return
        wakeups = Wakeups()
        for seq, text in zip(seqs, texts, strict=True):
            self._deliver(seq, text, wakeups)
        wakeups.send()
        self._batch.retire()
