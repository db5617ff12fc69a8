"""Continuous batching: greedy output as at batch size 1, admission mid-batch, cancel, queue."""

import asyncio
import threading

import pytest
import torch

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine, SamplingParams
from chatdistill.inference.scheduler import (
    Delta,
    Job,
    QueueFullError,
    Scheduler,
    SchedulerDownError,
    Wakeups,
)

from conftest import build_tiny_model, make_conversations


@pytest.fixture(scope="module")
def engine(tiny_models) -> Engine:
    return Engine.load(str(tiny_models["qwen2"]))


@pytest.fixture(scope="module")
def chatty(tmp_path_factory, tokenizer_dir) -> Engine:
    """A model that never picks EOS under greedy (its EOS logit is 0) and has a long context."""
    path = build_tiny_model(
        tmp_path_factory.mktemp("chatty"), tokenizer_dir, "llama", max_position_embeddings=8192
    )
    engine = Engine.load(str(path))
    with torch.no_grad():
        for eos in engine.eos_token_ids:
            engine.model.lm_head.weight[eos] = 0
    return engine


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    rows = make_conversations(6, seed=3)
    return [engine.encode_chat(r["messages"][:-1]) for r in rows]


@pytest.fixture
def running():
    """Start schedulers through this and they are shut down after the test."""
    started: list[Scheduler] = []

    def start(engine: Engine, **kw) -> Scheduler:
        s = Scheduler(engine, **kw)
        s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.shutdown()


def _ended(job, bound_s: float = 120) -> list:
    """The job's deltas once it has ended; the bound only turns a hang (a bug) into a failure."""
    deltas: list = []
    reader = threading.Thread(target=lambda: deltas.extend(job.iter_sync()), daemon=True)
    reader.start()
    reader.join(bound_s)
    assert not reader.is_alive(), f"{job.id} never ended"
    return deltas


def test_concurrent_greedy_requests_equal_engine_at_batch_size_one(engine, prompts, running):
    lengths = [5, 30, 12, 40, 3, 20]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    expected = [engine.generate([p], sp, batch_size=1)[0] for p, sp in zip(prompts, params)]
    sched = running(engine, max_batch=4)
    requests = [sched.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for req, want in zip(requests, expected, strict=True):
        deltas = list(req.iter_sync())
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        assert deltas[-1].finish_reason == want.finish_reason
        assert "".join(d.text for d in deltas) == req.text == want.text
        assert [t for d in deltas for t in d.token_ids] == want.token_ids
        assert req.completion_tokens == len(want.token_ids)
        assert req.prompt_tokens == len(want.prompt_ids)


def test_request_submitted_while_others_run_gets_first_token_before_they_finish(chatty, running):
    sched = running(chatty, max_batch=4)
    prompt = chatty.encode_chat([{"role": "user", "content": "How much is the mug?"}])
    long = [sched.submit(prompt, SamplingParams(max_new_tokens=400)) for _ in range(2)]
    for req in long:
        next(req.iter_sync())  # both are decoding
    late = sched.submit(prompt[:-3], SamplingParams(max_new_tokens=5))
    assert list(late.iter_sync())[-1].finish_reason == "length"
    for req in long:
        assert list(req.iter_sync())[-1].finish_reason == "length"
        assert req.started_at < late.queued_at
        assert late.first_token_at < late.finished_at < req.finished_at


def test_cancelled_request_frees_its_slot(chatty, running):
    sched = running(chatty, max_batch=1)
    prompt = chatty.encode_chat([{"role": "user", "content": "Do you ship it to Oslo?"}])
    hog = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    next(hog.iter_sync())
    queued = sched.submit(prompt, SamplingParams(max_new_tokens=4))
    assert sched.num_running == 1 and sched.num_waiting == 1
    hog.cancel()
    assert list(queued.iter_sync())[-1].finish_reason == "length"
    assert list(hog.iter_sync())[-1].finish_reason == "cancelled"
    assert hog.finish_reason == "cancelled" and hog.completion_tokens < 8000
    assert hog.finished_at < queued.finished_at


def test_cancelling_a_waiting_request_ends_it_at_once(engine, prompts):
    sched = Scheduler(engine, max_batch=1)  # not started: everything waits
    req = sched.submit(prompts[0], SamplingParams())
    assert sched.num_waiting == 1
    req.cancel()
    assert [d.finish_reason for d in req.iter_sync()] == ["cancelled"]
    assert sched.num_waiting == 0


def test_queue_bound_raises_queue_full(engine, prompts):
    sched = Scheduler(engine, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    for prompt in prompts[:3]:  # one for the free row, two waiting
        sched.submit(prompt, SamplingParams())
    with pytest.raises(QueueFullError):
        sched.submit(prompts[3], SamplingParams())
    sched.shutdown()
    assert sched.num_waiting == 0


def test_queue_bound_zero_serves_free_rows_and_refuses_waiting(chatty, running):
    sched = running(chatty, max_batch=1, max_queue=0)
    prompt = chatty.encode_chat([{"role": "user", "content": "Do you ship the kettle?"}])
    hog = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    next(hog.iter_sync())
    with pytest.raises(QueueFullError):
        sched.submit(prompt, SamplingParams(max_new_tokens=2))
    hog.cancel()
    assert _ended(hog)[-1].finish_reason == "cancelled"
    assert _ended(sched.submit(prompt, SamplingParams(max_new_tokens=2)))[-1].finish_reason


def test_async_streams_from_the_event_loop(engine, prompts, running):
    sched = running(engine, max_batch=8)
    params = SamplingParams(max_new_tokens=15)
    expected = engine.generate(prompts[:3], params, batch_size=1)

    async def collect(prompt):
        req = sched.submit(prompt, params)
        return [d async for d in req.stream()]

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts[:3]))

    results = asyncio.run(main())
    for deltas, want in zip(results, expected, strict=True):
        assert "".join(d.text for d in deltas) == want.text
        assert deltas[-1].finish_reason == want.finish_reason


def test_leaving_an_async_stream_early_cancels_the_request(chatty, running):
    sched = running(chatty, max_batch=2)
    prompt = chatty.encode_chat([{"role": "user", "content": "How much is the scarf?"}])

    async def first_then_leave():
        req = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
        stream = req.stream()
        await stream.__anext__()
        await stream.aclose()
        return req

    req = asyncio.run(first_then_leave())
    assert list(req.iter_sync())[-1].finish_reason == "cancelled"


def test_on_finish_hook_sees_each_request_once_with_ordered_times(engine, prompts, running):
    seen = []
    done = threading.Event()
    sched = Scheduler(engine, max_batch=2)
    sched.on_finish = lambda r: (seen.append(r), len(seen) == 3 and done.set())
    sched.start()
    try:
        reqs = [sched.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts[:3]]
        assert done.wait(120)
    finally:
        sched.shutdown()
    assert sorted(r.id for r in seen) == sorted(r.id for r in reqs)
    for r in seen:
        assert r.queued_at <= r.started_at <= r.first_token_at <= r.finished_at
        assert r.finish_reason == "length" and r.completion_tokens == 6


def test_shutdown_cancels_running_and_waiting(chatty):
    sched = Scheduler(chatty, max_batch=1)
    sched.start()
    prompt = chatty.encode_chat([{"role": "user", "content": "How much is the lamp?"}])
    running_req = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    next(running_req.iter_sync())
    waiting_req = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    sched.shutdown()
    assert running_req.finish_reason == "cancelled"
    assert waiting_req.finish_reason == "cancelled"
    assert sched.num_running == 0 and sched.num_waiting == 0


def test_bad_requests_are_user_errors_at_submit(engine, prompts):
    sched = Scheduler(engine)
    with pytest.raises(UserError, match="temperature"):
        sched.submit(prompts[0], SamplingParams(temperature=-0.5))
    with pytest.raises(UserError, match="seed"):
        sched.submit(prompts[0], SamplingParams(temperature=1.0, seed=2**64))
    with pytest.raises(UserError, match="empty"):
        sched.submit([], SamplingParams())
    assert sched.num_waiting == 0


def test_requests_admitted_together_share_a_prefill_and_a_broken_one_fails_alone(engine, prompts):
    # Three prompts of one length (so one prefill takes them all), one of them poisoned.
    base = prompts[0]
    trio = [base, [base[1], *base[1:]], [base[0], base[0], *base[2:]]]
    poison = trio[1]
    forwards: list[int] = []

    def hook(_module, _args, kw):
        ids = kw["input_ids"]
        forwards.append(ids.shape[0])
        if any(row.tolist() == poison for row in ids):
            raise RuntimeError("this prompt breaks the model")

    expected = [engine.generate([p], SamplingParams(max_new_tokens=6))[0] for p in trio]
    sched = Scheduler(engine, max_batch=4)
    # Queued before the decode thread starts, so all three are admitted at once.
    requests = [sched.submit(p, SamplingParams(max_new_tokens=6)) for p in trio]
    handle = engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sched.start()
        results = [list(r.iter_sync()) for r in requests]
    finally:
        handle.remove()
        sched.shutdown()
    assert forwards[0] == 3  # the first prefill took all three prompts together
    assert results[1][-1].finish_reason == "error"
    assert "breaks the model" in results[1][-1].error
    for i in (0, 2):
        assert requests[i].text == expected[i].text
        assert results[i][-1].finish_reason == expected[i].finish_reason


class _RecordingLoop:
    """Stands in for an event loop: records the callbacks handed to it from another thread."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def call_soon_threadsafe(self, callback, *args) -> None:
        self.calls.append((callback, *args))


def test_one_send_hands_each_loop_its_events_in_one_call():
    """A decode step wakes all its rows' listeners with one thread-safe call per event loop."""
    loops = [_RecordingLoop(), _RecordingLoop()]
    events = [asyncio.Event() for _ in range(3)]
    wakeups = Wakeups()
    wakeups.add(loops[0], events[0])
    wakeups.add(loops[1], events[1])
    wakeups.add(loops[0], events[2])
    wakeups.send()
    assert [len(loop.calls) for loop in loops] == [1, 1]
    for loop in loops:
        callback, *args = loop.calls[0]
        callback(*args)
    assert all(event.is_set() for event in events)
    wakeups.send()  # sent events are forgotten: nothing is handed over twice
    assert [len(loop.calls) for loop in loops] == [1, 1]


def test_deltas_pushed_from_a_thread_reach_their_async_streams(prompts):
    async def main() -> list[list[str]]:
        jobs = [Job(f"r{i}", prompts[i], SamplingParams(), lambda _j: None) for i in range(3)]
        streams = [job.stream() for job in jobs]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0)  # every stream registers its loop and waits

        def decode_step() -> None:
            wakeups = Wakeups()
            for i, job in enumerate(jobs):
                job._push(Delta(f"tok{i}", [i], "stop"), wakeups)
            wakeups.send()

        await asyncio.to_thread(decode_step)
        return [[(await f).text] for f in firsts]

    assert asyncio.run(main()) == [["tok0"], ["tok1"], ["tok2"]]


def test_a_request_that_cannot_start_fails_alone_and_the_thread_goes_on(engine, prompts):
    """A seed the generator refuses (validation bypassed, as any unforeseen per-request failure
    would be) ends that request with an error; its neighbours and later requests are served."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
    sched = Scheduler(engine, max_batch=4)
    jobs = [sched.submit(p, params) for p in prompts[:3]]
    jobs[1].params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=2**64)
    sched.start()
    try:
        ends = [_ended(job)[-1] for job in jobs]
        later = _ended(sched.submit(prompts[3], SamplingParams(max_new_tokens=3)))
        assert sched.healthy
    finally:
        sched.shutdown()
    assert ends[1].finish_reason == "error" and "Overflow" in ends[1].error
    assert {ends[0].finish_reason, ends[2].finish_reason, later[-1].finish_reason} <= {
        "stop",
        "length",
    }


class _Fatal(BaseException):
    """Something no `except Exception` catches, to kill the decode thread."""


def test_a_dead_decode_thread_ends_every_request_and_refuses_new_ones(chatty):
    prompt = chatty.encode_chat([{"role": "user", "content": "Is the lamp in stock?"}])
    sched = Scheduler(chatty, max_batch=1)
    sched.start()
    running_job = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    next(running_job.iter_sync())
    waiting_job = sched.submit(prompt, SamplingParams(max_new_tokens=8000))
    assert sched.healthy

    def die(*_args, **_kw):
        raise _Fatal("the device is gone")

    handle = chatty.model.register_forward_pre_hook(die, with_kwargs=True)
    try:
        assert _ended(running_job)[-1].finish_reason == "error"
        assert _ended(waiting_job)[-1].finish_reason == "error"
        assert "the device is gone" in running_job.error
        assert not sched.healthy and "the device is gone" in sched.failure
        with pytest.raises(SchedulerDownError, match="the device is gone"):
            sched.submit(prompt, SamplingParams(max_new_tokens=2))
    finally:
        handle.remove()
        sched.shutdown()
