"""Speculative decoding with a draft: the teacher's greedy answers token for token, its sampling
distribution, caches rolled back, streaming/stop/EOS, batching, metrics and bad drafts."""

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import metric_value

from chatdistill.cli import main
from chatdistill.errors import UserError
from chatdistill.inference.engine import (
    DecodeBatch,
    Engine,
    SamplingParams,
    Sequence,
    cache_argument,
)
from chatdistill.inference.kv_cache import GrowingCache
from chatdistill.inference.scheduler import Scheduler
from chatdistill.inference.speculative import (
    accept_drafted,
    attach_draft,
    filtered_probs,
    int8_linears,
    load_draft,
)
from chatdistill.models import cut_student
from chatdistill.models.tokenizer import train_bpe_tokenizer
from chatdistill.serve.app import create_app
from chatdistill.serve.config import ServeConfig

from conftest import build_tiny_model, make_conversations


def chi2_critical(df: int) -> float:
    """The chi-square value a correct sampler exceeds one time in a thousand (Wilson-Hilferty
    approximation, within 2% of the table for df >= 2)."""
    z = 3.09  # the standard normal's 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run thousands of forwards of tiny models, where handing work between threads
    costs more than the matrix products (many times more on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def teachers(tiny_models) -> dict[str, Engine]:
    return {arch: Engine.load(str(tiny_models[arch])) for arch in ("llama", "gpt2", "qwen2")}


@pytest.fixture(scope="module")
def drafts(teachers, tmp_path_factory, tokenizer_dir) -> dict[tuple[str, str], Engine]:
    """Per (teacher arch, kind): "self" (the teacher itself: every draft is accepted), "cut" (two of
    its four layers: often accepted), "int8" (that cut with int8 linear layers) and "other" (a
    smaller model initialised apart: rarely)."""
    out = {}
    for arch, t in teachers.items():
        out[arch, "self"] = Engine(t.model, t.tokenizer)
        out[arch, "cut"] = Engine(cut_student(t.model, [0, 3]).eval(), t.tokenizer)
        out[arch, "int8"] = Engine(cut_student(t.model, [0, 3]).eval(), t.tokenizer)
    other = build_tiny_model(
        tmp_path_factory.mktemp("other"), tokenizer_dir, "llama", seed=1, num_hidden_layers=2
    )
    out["llama", "other"] = Engine.load(str(other))
    return out


def speculative(teacher: Engine, draft: Engine, tokens: int) -> Engine:
    """A second engine on the teacher's model with `draft` attached (the teacher stays plain)."""
    engine = Engine(teacher.model, teacher.tokenizer)
    attach_draft(engine, draft, tokens)
    return engine


@pytest.fixture(scope="module")
def prompts(teachers) -> list[list[int]]:
    rows = make_conversations(6, seed=1)
    return [teachers["llama"].encode_chat(r["messages"][:-1]) for r in rows]


@pytest.mark.parametrize(
    ("arch", "kind", "k"),
    [
        ("llama", "cut", 3),
        ("llama", "self", 4),
        ("llama", "other", 2),
        ("llama", "cut", 1),
        ("gpt2", "cut", 3),
        ("qwen2", "cut", 5),
        ("llama", "int8", 3),
        ("qwen2", "int8", 2),
    ],
)
def test_greedy_output_is_the_teachers_token_for_token(teachers, drafts, prompts, arch, kind, k):
    teacher = teachers[arch]
    params = SamplingParams(max_new_tokens=12)
    alone = teacher.generate(prompts[:4], params, batch_size=1)
    engine = speculative(teacher, drafts[arch, kind], k)
    if kind == "int8":  # as load_draft does it: after attach_draft's checks
        engine.draft.engine.model = int8_linears(engine.draft.engine.model)
    got = engine.generate(prompts[:4], params, batch_size=1)
    for a, b in zip(alone, got, strict=True):
        assert b.token_ids == a.token_ids
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
    drafted, accepted = engine.draft.counts()
    assert drafted > 0
    if kind == "self":
        assert accepted == drafted  # also exercises the bonus token after k accepted
    if kind == "other":
        assert accepted < drafted  # and the teacher's correction after a rejection


@pytest.mark.parametrize("confidence", [0.0, 1.01])
def test_a_draft_stops_after_a_token_it_is_unsure_of(teachers, drafts, prompts, confidence):
    """Above 1 every drafted token is unsure: one per step. At 0 the draft proposes all k."""
    teacher = teachers["llama"]
    params = SamplingParams(max_new_tokens=12)
    alone = teacher.generate(prompts[:2], params, batch_size=1)
    engine = speculative(teacher, drafts["llama", "other"], 4)
    engine.draft.min_confidence = confidence
    steps = []
    original = engine.draft.decoder

    def counting_decoder():
        decoder = original()
        propose = decoder._propose

        def counted(*args):
            out = propose(*args)
            steps.append(len(out[0]))
            return out

        decoder._propose = counted
        return decoder

    engine.draft.decoder = counting_decoder
    got = engine.generate(prompts[:2], params, batch_size=1)
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    drafted = [n for n in steps if n]  # (0: the answer's budget left no room to draft)
    if confidence > 1:
        assert drafted and set(drafted) == {1}
    else:  # all k, but for a few steps near each answer's budget (2 answers here)
        assert len(drafted) - drafted.count(4) <= 2 * 3


def test_load_draft_int8_quantizes_the_drafts_linears_and_keeps_the_answers(
    teachers, tiny_models, prompts
):
    teacher = teachers["llama"]
    engine = Engine(teacher.model, teacher.tokenizer)
    draft = load_draft(engine, str(tiny_models["llama"]), 3, int8=True)
    kinds = {type(m).__module__ for m in draft.engine.model.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert not any(type(m) is torch.nn.Linear for m in draft.engine.model.modules())
    params = SamplingParams(max_new_tokens=10)
    alone = teacher.generate(prompts[:3], params, batch_size=1)
    got = engine.generate(prompts[:3], params, batch_size=1)
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert draft.counts()[0] > 0


def test_rows_batched_first_finish_alone_speculatively_and_identically(teachers, drafts, prompts):
    """A row left alone after decoding in a batch switches to speculation: its draft catches up
    on the tokens it missed, and every answer is still the teacher's."""
    teacher = teachers["llama"]
    params = [SamplingParams(max_new_tokens=n) for n in (4, 24, 6, 8, 5, 7)]
    alone = [teacher.generate([p], sp, batch_size=1)[0] for p, sp in zip(prompts, params)]
    engine = speculative(teacher, drafts["llama", "cut"], 3)
    got = engine.generate(prompts, params, batch_size=3)
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert engine.draft.drafted > 0


def test_caches_hold_exactly_the_kept_tokens_after_each_step(teachers, drafts, prompts):
    teacher = teachers["llama"]
    engine = speculative(teacher, drafts["llama", "cut"], 4)
    batch = DecodeBatch(engine)
    with torch.inference_mode():
        seq = Sequence(engine, prompts[0], SamplingParams(max_new_tokens=30))
        batch.add(seq)
        for _ in range(4):
            batch.step()
            context = seq.prompt_ids + seq.token_ids
            assert batch.cache.get_seq_length() == int(batch.positions[0]) == len(context) - 1
            assert batch.mask.shape == (1, len(context) - 1) and int(batch.pending) == context[-1]
            spec = batch.speculative
            assert spec._cache.get_seq_length() == len(spec._tokens) <= len(context) + 3
            feed = spec._catch_up(context)  # what the next step feeds the draft
            assert spec._tokens + feed == context and feed and len(feed) <= 2
            assert spec._cache.get_seq_length() == len(spec._tokens)
        fresh = GrowingCache()
        kw = {cache_argument(teacher.model): fresh}
        teacher.model(input_ids=torch.tensor([context[:-1]]), use_cache=True, **kw)
        for kept, want in zip(batch.cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys, want.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(kept.values, want.values, rtol=1e-4, atol=1e-5)


def test_the_draft_reads_a_lone_rows_prompt_during_prefill_only(teachers, drafts, prompts):
    teacher = teachers["llama"]
    engine = speculative(teacher, drafts["llama", "cut"], 3)
    with torch.inference_mode():
        batch = DecodeBatch(engine)
        batch.add(Sequence(engine, prompts[0], SamplingParams(max_new_tokens=8)))
        assert batch.speculative._tokens == prompts[0]  # read before the first token
        assert batch.speculative._cache.get_seq_length() == len(prompts[0])
        pair = DecodeBatch(engine)  # rows that decode together: no speculation, no draft prefill
        held = list(pair.speculative._tokens)
        pair.add_many([Sequence(engine, p, SamplingParams(max_new_tokens=8)) for p in prompts[1:3]])
        assert pair.speculative._tokens == held


def test_a_new_row_reuses_the_drafts_cache_for_the_prefix_it_shares(teachers, drafts, prompts):
    """The second turn of a chat (the first turn, its answer, a new question) feeds the draft only
    what follows the tokens it already holds, and the answers stay the teacher's."""
    teacher = teachers["llama"]
    params = SamplingParams(max_new_tokens=10)
    first = teacher.generate(prompts[:1], params, batch_size=1)[0]
    second = prompts[0] + first.token_ids + prompts[1][-6:]
    engine = speculative(teacher, drafts["llama", "cut"], 3)
    decoder = engine.draft.decoder()
    fed = []
    forward = decoder._forward
    decoder._forward = lambda feed: fed.append(len(feed)) or forward(feed)
    got = [engine.generate([p], params, batch_size=1)[0] for p in (prompts[0], second)]
    want = teacher.generate([second], params)[0]
    assert [c.token_ids for c in got] == [first.token_ids, want.token_ids]
    prefills = [n for n in fed if n > 2]  # every other feed is one or two tokens
    assert prefills[0] == len(prompts[0])
    # The draft never read its last one or two tokens of the first answer (the teacher's last).
    new_question = len(second) - len(prompts[0]) - len(first.token_ids)
    assert len(prefills) == 2 and new_question <= prefills[1] <= new_question + 2


def test_growing_cache_crop_drops_the_tail_and_keeps_appending():
    cache = GrowingCache()
    k = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(1, 2, 6, 4)
    cache.update(k[:, :, :5], k[:, :, :5], 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 3
    keys, values = cache.update(k[:, :, 5:], k[:, :, 5:], 0)
    torch.testing.assert_close(keys, torch.cat([k[:, :, :3], k[:, :, 5:]], dim=2))
    torch.testing.assert_close(values, keys)
    with pytest.raises(ValueError):
        cache.crop(2)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of `counts` against `probs`; counts where probs is 0 fail at once."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "drew a token the target gives no probability"
    expected = n * probs[probs > 0]
    return float(((counts[probs > 0] - expected) ** 2 / expected).sum())


def test_accept_step_emits_tokens_distributed_as_the_teacher():
    """Hand-made p and q over 5 tokens that disagree (each puts mass where the other has none):
    the first, second and bonus tokens follow p[0], p[1], p[2], not q."""
    p = torch.tensor(
        [[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.3, 0.4]]
    )
    q = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2], [0.25, 0.05, 0.3, 0.4, 0.0]])
    draws = 20000
    g = torch.Generator().manual_seed(0)
    xs = torch.stack([torch.multinomial(row, draws, replacement=True, generator=g) for row in q])
    counts = torch.zeros(3, 5)
    first_kept = 0
    for d in range(draws):
        drafted = xs[:, d].tolist()
        out = accept_drafted(p, q, drafted, g)
        first_kept += len(out) > 1
        for i, token in enumerate(out):
            counts[i, token] += 1
    for i in range(3):
        support = int((p[i] > 0).sum())
        assert _chi2(counts[i], p[i]) < chi2_critical(support - 1), (i, counts[i])
    for i in range(2):  # emitting the drafts unchecked would have given q: far from it
        assert (counts[i] / counts[i].sum() - q[i]).abs().sum() / 2 > 0.2
    # a drafted token is kept with probability sum(min(p, q)) = 1 - TV(p, q)
    assert abs(first_kept / draws - float(torch.minimum(p[0], q[0]).sum())) < 0.015


def test_accept_step_keeps_every_token_when_draft_and_teacher_agree():
    p = torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(1)
    for drafted in ([0, 1], [1, 2], [1, 0]):
        assert accept_drafted(p, p[:2], drafted, g) == [*drafted, 2]


def test_filtered_probs_are_the_samplers_in_vocabulary_order():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    e = torch.tensor([1.0, torch.e]) / (1 + torch.e)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, e[1], 0.0, e[0]]))
    hot = filtered_probs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(hot[0], torch.softmax(logits[0] / 2, -1))


def test_sampled_answers_follow_the_teachers_distribution_end_to_end(teachers, drafts, prompts):
    """Tokens 2 and 3 of a sampled answer (the first speculative step, top-k 3 so few outcomes):
    their joint frequencies match the teacher's exact probabilities."""
    teacher = teachers["llama"]
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=3)
    prompt = prompts[0][:8]  # short: each of the answers prefills it
    with torch.inference_mode():

        def dist(ids: list[int]) -> torch.Tensor:
            logits = teacher.model(input_ids=torch.tensor([ids])).logits[0, -1:].float()
            return filtered_probs(logits, params)[0]

        p1 = dist(prompt)
        # joint of (token 2, token 3) given token 1, averaged over token 1
        joint: dict[tuple[int, int], float] = {}
        for t1 in p1.nonzero()[:, 0].tolist():
            p2 = dist([*prompt, t1])
            for t2 in p2.nonzero()[:, 0].tolist():
                p3 = dist([*prompt, t1, t2])
                for t3 in p3.nonzero()[:, 0].tolist():
                    key = (t2, t3)
                    joint[key] = joint.get(key, 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    engine = speculative(teacher, drafts["llama", "cut"], 2)
    runs = 400
    answers = engine.generate(
        [prompt] * runs,
        [SamplingParams(3, temperature=1.0, top_k=3, seed=s) for s in range(runs)],
        batch_size=1,
    )
    drafted, accepted = engine.draft.counts()
    assert 0 < accepted < drafted  # both the kept and the rejected paths ran
    keys = sorted(joint)
    counts = torch.zeros(len(keys))
    for c in answers:
        pair = tuple(c.token_ids[1:3])
        assert pair in joint, f"{pair} has no probability under the teacher"
        counts[keys.index(pair)] += 1
    probs = torch.tensor([joint[k] for k in keys])
    # merge the rarest outcomes so every expected count is at least 5 (the chi-square rule)
    order = probs.argsort()
    small = order[: int((probs[order].cumsum(0) * runs < 5).sum()) + 1]
    big = order[len(small) :]
    merged_p = torch.cat([probs[big], probs[small].sum()[None]])
    merged_c = torch.cat([counts[big], counts[small].sum()[None]])
    assert _chi2(merged_c, merged_p) < chi2_critical(len(merged_p) - 1), (keys, counts, probs)


def test_seeded_sampling_repeats_with_a_draft(teachers, drafts, prompts):
    engine = speculative(teachers["llama"], drafts["llama", "cut"], 3)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    a, b = (engine.generate(prompts[:2], params, batch_size=1) for _ in range(2))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_stop_string_inside_an_accepted_run_ends_it_there(teachers, drafts, prompts):
    teacher = teachers["llama"]
    full = teacher.generate(prompts[:1], SamplingParams(max_new_tokens=24))[0]
    text = full.text
    stop = next(text[i : i + 2] for i in range(5, len(text)) if "\ufffd" not in text[i : i + 2])
    params = SamplingParams(max_new_tokens=24, stop=[stop])
    want = teacher.generate(prompts[:1], params)[0]
    engine = speculative(teacher, drafts["llama", "self"], 4)  # runs of 5 tokens
    pieces: list[str] = []
    got = engine.generate(prompts[:1], params, on_text=lambda _r, t: pieces.append(t))[0]
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.text == want.text == "".join(pieces)
    assert got.token_ids == want.token_ids


def test_eos_inside_an_accepted_run_ends_it_there(teachers, drafts, prompts):
    teacher = teachers["gpt2"]
    full = teacher.generate(prompts[:1], SamplingParams(max_new_tokens=16))[0]
    engine = speculative(teacher, drafts["gpt2", "self"], 4)
    eos = full.token_ids[6]
    for e in (teacher, engine):
        e.eos_token_ids = {*e.eos_token_ids, eos}
    try:
        want = teacher.generate(prompts[:1], SamplingParams(max_new_tokens=16))[0]
        got = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16))[0]
    finally:
        teacher.eos_token_ids.discard(eos)
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.token_ids == want.token_ids == full.token_ids[: full.token_ids.index(eos)]


def test_answer_budget_and_context_end_like_the_teacher(teachers, drafts, prompts):
    teacher = teachers["llama"]
    engine = speculative(teacher, drafts["llama", "self"], 4)
    for prompt, n in ((prompts[0], 7), ((prompts[0] * 100)[: teacher.context_length - 6], 50)):
        want = teacher.generate([prompt], SamplingParams(max_new_tokens=n))[0]
        got = engine.generate([prompt], SamplingParams(max_new_tokens=n))[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason


def test_scheduler_with_a_draft_answers_concurrent_requests_as_the_teacher(
    teachers, drafts, prompts
):
    teacher = teachers["qwen2"]
    lengths = [5, 20, 9, 14]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    want = [teacher.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = speculative(teacher, drafts["qwen2", "cut"], 3)
    sched = Scheduler(engine, max_batch=2)
    sched.start()
    try:
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts[:4], params, strict=True)]
        for req, w in zip(reqs, want, strict=True):
            deltas = list(req.iter_sync())
            assert [t for d in deltas for t in d.token_ids] == w.token_ids
            assert req.text == w.text and deltas[-1].finish_reason == w.finish_reason
    finally:
        sched.shutdown()
    assert engine.draft.drafted > 0


def test_metrics_report_drafted_and_accepted_tokens(teachers, drafts):
    engine = speculative(teachers["llama"], drafts["llama", "cut"], 3)
    app = create_app(engine, ServeConfig(model_name="tiny"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"model": "tiny", "prompt": "How much is the kettle?", "max_tokens": 12}
        assert client.post("/v1/completions", json=body).status_code == 200
        text = client.get("/metrics").text
    drafted = metric_value(text, "chatdistill_spec_decode_draft_tokens_total")
    accepted = metric_value(text, "chatdistill_spec_decode_accepted_tokens_total")
    assert (drafted, accepted) == engine.draft.counts() and drafted > 0


@pytest.fixture(scope="module")
def bad_drafts(tmp_path_factory, tokenizer_dir, chat_rows) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-drafts")
    texts = [m["content"] for r in chat_rows for m in r["messages"]]
    train_bpe_tokenizer(texts * 4, vocab_size=300).save_pretrained(root / "tok")
    return {
        "other_tokenizer": str(build_tiny_model(root / "other-tok", root / "tok", "llama")),
        "larger": str(build_tiny_model(root / "larger", tokenizer_dir, "llama", hidden_size=96)),
    }


def test_draft_with_another_tokenizer_or_more_parameters_is_a_user_error(teachers, bad_drafts):
    teacher = teachers["llama"]
    with pytest.raises(UserError, match=r"this teacher's draft: .*vocab \d+ vs \d+"):
        speculative(teacher, Engine.load(bad_drafts["other_tokenizer"]), 4)
    with pytest.raises(UserError, match=r"more than the teacher's"):
        speculative(teacher, Engine.load(bad_drafts["larger"]), 4)
    with pytest.raises(UserError, match="--draft-tokens 0"):
        speculative(teacher, teacher, 0)


@pytest.mark.parametrize(("bad", "message"), [("other_tokenizer", "vocab"), ("larger", "more")])
def test_cli_bad_draft_is_one_line_and_exit_2(tiny_models, bad_drafts, capsys, bad, message):
    argv = ["serve", str(tiny_models["llama"]), "--port", "0", "--draft", bad_drafts[bad]]
    assert main(argv) == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # after the teacher's loading bar
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --draft ") and message in last and "Traceback" not in err


def test_cli_draft_tokens_below_one_fails_before_loading(capsys):
    assert main(["chat", "no-such-model", "--draft", "no-such-draft", "--draft-tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: --draft-tokens 0: must be at least 1\n"


def test_cli_chat_with_a_draft_answers(tiny_models, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("How much is the kettle?\n/exit\n"))
    argv = ["chat", str(tiny_models["llama"]), "--draft", str(tiny_models["llama"])]
    assert main([*argv, "--draft-tokens", "2", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert "chatting with" in capsys.readouterr().out


def test_cli_eval_with_a_draft_reports_its_speed_and_identical_answers(
    tiny_models, tokenizer_dir, chat_file, tmp_path, capsys
):
    small = build_tiny_model(tmp_path / "small", tokenizer_dir, "llama", num_hidden_layers=2)
    out = tmp_path / "out"
    argv = ["eval", "--teacher", str(tiny_models["llama"]), "--student", str(small)]
    argv += ["--data", str(chat_file), "--output", str(out), "--max-samples", "2"]
    argv += ["--max-new-tokens", "4", "--speed-prompts", "2", "--speed-new-tokens", "8"]
    argv += ["--no-memory", "--no-model-card", "--draft", str(small), "--draft-tokens", "3"]
    assert main(argv) == 0
    assert f"teacher with --draft {small}: " in capsys.readouterr().out
    spec = json.loads((out / "results.json").read_text())["speculative"]
    assert spec["identical_greedy_answers"] == spec["answers_compared"] == 2
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["draft_tokens"] == 3
    assert spec["decode_tokens_per_s_batch1"] > 0 and spec["speedup"] > 0
