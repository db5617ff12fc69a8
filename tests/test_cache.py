import inspect
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from chatdistill.cli import main
from chatdistill.config import load_distill_config
from chatdistill.data import build_dataset, collate, load_rows
from chatdistill.distill import cache as cache_mod
from chatdistill.distill.cache import CachedTeacher, write_cache
from chatdistill.distill.divergences import SparseLogprobs
from chatdistill.distill.losses import per_token_divergence
from chatdistill.distill.teacher import LiveTeacher
from chatdistill.distill.train import train
from chatdistill.errors import UserError
from chatdistill.models import load_model
from chatdistill.models.tokenizer import train_bpe_tokenizer

from conftest import build_tiny_model, make_conversations, write_jsonl

VOCAB = 400  # the test tokenizer's size (conftest)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer_dir):
    # Larger initial weights make the random teacher's distributions peaked, as a trained one's.
    return build_tiny_model(
        tmp_path_factory.mktemp("t") / "teacher", tokenizer_dir, "llama", 1, initializer_range=0.2
    )


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher, chat_file):
    out = tmp_path_factory.mktemp("c") / "full"
    write_cache(str(teacher), str(chat_file), str(out), top_k=VOCAB, progress=False,
                min_mass=1.0, logprob_bits=16)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, teacher, chat_file):
    out = tmp_path_factory.mktemp("c") / "k8"
    write_cache(str(teacher), str(chat_file), str(out), top_k=8, shard_positions=400)
    return out


def _cfg(out, data, **over):
    base = {
        "student_config": None,
        "data.train": str(data),
        "output": str(out),
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.warmup_steps": 1,
    }
    base.update(over)
    return load_distill_config(None, {k: v for k, v in base.items() if v is not None})


def _batch(tokenizer_dir, chat_file, n=6):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = build_dataset(load_rows(chat_file)[:n], tok, 512, "t")
    return data, collate(data.examples, tok.pad_token_id)


@pytest.fixture(scope="module")
def fixed_cache(tmp_path_factory, teacher, chat_file):
    """Every position all k slots, float16 log-probs: what version 1 stored."""
    out = tmp_path_factory.mktemp("c") / "k8-fixed"
    write_cache(str(teacher), str(chat_file), str(out), top_k=8, shard_positions=400,
                min_mass=1.0, logprob_bits=16)  # fmt: skip
    return out


def _live_logits(teacher, batch, examples):
    return LiveTeacher(load_model(str(teacher)), VOCAB).targets(batch, examples)(slice(None))


@pytest.mark.parametrize(("cache", "tolerance"), [("fixed_cache", 2e-3), ("small_cache", 1 / 16)])
def test_cached_top_k_equals_the_live_teachers_top_k(
    teacher, tokenizer_dir, chat_file, request, cache, tolerance
):
    """Float16 log-probs within float16's rounding; 8-bit ones within one code (1/16 nat)."""
    data, batch = _batch(tokenizer_dir, chat_file)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = request.getfixturevalue(cache)
    cached = CachedTeacher.open(path, tok, data, temperature=1.0, max_length=512)
    sparse = cached.targets(batch, data.examples)(slice(None))
    top = torch.log_softmax(_live_logits(teacher, batch, data.examples).float(), -1).topk(8, -1)
    kept = torch.isfinite(sparse.logprobs)
    assert kept.all() if cache == "fixed_cache" else kept[:, 0].all()
    assert torch.equal(sparse.ids[kept], top.indices[kept])
    torch.testing.assert_close(sparse.logprobs[kept], top.values[kept], rtol=0, atol=tolerance)


def test_sparse_fkl_approaches_the_dense_fkl_as_k_reaches_the_vocabulary(
    teacher, tokenizer_dir, chat_file
):
    data, batch = _batch(tokenizer_dir, chat_file)
    dense = LiveTeacher(load_model(str(teacher)), VOCAB).targets(batch, data.examples)(slice(None))
    torch.manual_seed(0)
    student = dense + 2.0 * torch.randn_like(dense)
    exact = per_token_divergence(student, dense, "fkl").mean()
    errors = []
    for k in (4, 32, VOCAB):
        top = torch.log_softmax(dense, -1).topk(k, -1)
        sparse = SparseLogprobs(top.indices, top.values.half().float())  # as stored: float16
        errors.append((per_token_divergence(student, sparse, "fkl").mean() - exact).abs().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * exact.item()


@pytest.mark.slow
def test_training_from_a_full_vocabulary_cache_matches_the_live_teacher(
    tmp_path, teacher, full_cache, tokenizer_dir, chat_file
):
    common = {"student_num_layers": 2, "teacher": str(teacher), "loss.kind": "fkl"}
    train(_cfg(tmp_path / "live", chat_file, **common))
    train(_cfg(tmp_path / "cached", chat_file, **common, teacher_cache=str(full_cache)))

    def log(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    live, cached = log("live"), log("cached")
    assert [r["step"] for r in live] == [r["step"] for r in cached]
    for a, b in zip(live, cached):
        for key in ("kd", "val_kd", "val_ce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-3), key


def test_distill_from_cache_needs_no_teacher_and_reports_val_kd(
    tmp_path, small_cache, tokenizer_dir, chat_file
):
    student = build_tiny_model(tmp_path / "student", tokenizer_dir, "llama", 2)
    code = main(
        ["distill", "--teacher-cache", str(small_cache), "--student", str(student), "--data"]
        + [str(chat_file), "--output", str(tmp_path / "out"), "--max-steps", "2"]
    )
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r for r in lines) and any("val_kd" in r for r in lines)


def test_killed_cache_write_resumes_and_equals_an_uninterrupted_one(
    tmp_path, teacher, small_cache, chat_file, monkeypatch
):
    real_write, real_arrays, calls = cache_mod._write_shard, cache_mod._shard_arrays, []

    def die_on_second_shard(path, arrays):
        if path.name == "shard-00001.safetensors":
            raise KeyboardInterrupt
        real_write(path, arrays)

    def counting(exs, *args):
        calls.append(len(exs))
        return real_arrays(exs, *args)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cache_mod, "_write_shard", die_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_cache(str(teacher), str(chat_file), str(out), top_k=8, shard_positions=400)
    assert json.loads((out / "cache.json").read_text())["completed"] == ["shard-00000.safetensors"]
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    monkeypatch.setattr(cache_mod, "_shard_arrays", counting)
    meta = write_cache(str(teacher), str(chat_file), str(out), top_k=8, shard_positions=400)
    assert len(calls) == len(meta["shards"]) - 1  # the finished shard was not recomputed
    for shard in meta["shards"]:
        assert (out / shard["file"]).read_bytes() == (small_cache / shard["file"]).read_bytes()


def test_bytes_per_token_stay_small_with_uint16_ids(small_cache):
    meta = json.loads((small_cache / "cache.json").read_text())
    positions = sum(s["positions"] for s in meta["shards"])
    size = sum((small_cache / s["file"]).stat().st_size for s in meta["shards"])
    assert meta["id_dtype"] == "uint16"
    assert size / positions < 8 * (2 + 2) + 40  # k · (uint16 id + float16 log-prob) + overhead


def _distill_error(capsys, args):
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_cache_from_another_teacher_is_refused(
    tmp_path, small_cache, tokenizer_dir, chat_file, capsys
):
    other = build_tiny_model(tmp_path / "other", tokenizer_dir, "llama", 7)
    args = ["--teacher-cache", str(small_cache), "--teacher", str(other), "--student-num-layers"]
    err = _distill_error(capsys, [*args, "2", "--data", str(chat_file), "--output", "x"])
    assert "another teacher" in err


def test_cache_from_another_tokenizer_is_refused(tmp_path, small_cache, chat_file, capsys):
    texts = [m["content"] for r in make_conversations(32, 5) for m in r["messages"]]
    train_bpe_tokenizer(texts, vocab_size=350).save_pretrained(tmp_path / "tok")
    student = build_tiny_model(tmp_path / "s", tmp_path / "tok", "llama")
    args = ["--teacher-cache", str(small_cache), "--student", str(student), "--data"]
    err = _distill_error(capsys, [*args, str(chat_file), "--output", str(tmp_path / "o")])
    assert "another tokenizer" in err


def test_cache_from_another_dataset_is_refused(
    tmp_path, small_cache, tiny_models, chat_file, capsys
):
    other = write_jsonl(tmp_path / "other.jsonl", make_conversations(20, seed=9))
    args = ["--teacher-cache", str(small_cache), "--student", str(tiny_models["llama"])]
    err = _distill_error(capsys, [*args, "--data", str(other), "--output", str(tmp_path / "o")])
    assert "not in the cache" in err and "--data" in err


@pytest.mark.parametrize(
    ("setting", "word"),
    [("loss.temperature=2.0", "temperature"), ("data.max_length=256", "max_length")],
)
def test_cache_with_other_settings_is_refused(
    tmp_path, small_cache, tiny_models, chat_file, capsys, setting, word
):
    args = ["--teacher-cache", str(small_cache), "--student", str(tiny_models["llama"])]
    args += ["--data", str(chat_file), "--output", str(tmp_path / "o"), "--set", setting]
    assert word in _distill_error(capsys, args)


def test_truncated_shard_is_named_in_the_error(
    tmp_path, small_cache, tiny_models, chat_file, capsys
):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_cache.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = broken / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    args = ["--teacher-cache", str(broken), "--student", str(tiny_models["llama"])]
    err = _distill_error(capsys, [*args, "--data", str(chat_file), "--output", str(tmp_path / "o")])
    assert "shard-00001.safetensors" in err and "truncated" in err


def test_on_policy_with_a_teacher_cache_is_refused(tmp_path, small_cache, tiny_models, capsys):
    args = ["--teacher-cache", str(small_cache), "--student", str(tiny_models["llama"])]
    args += ["--output", str(tmp_path / "o")]
    err = _distill_error(capsys, [*args, "--on-policy-fraction", "0.5", "--data", "x.jsonl"])
    assert "--on-policy-fraction" in err and "--teacher" in err


def _cache_error(capsys, args):
    assert main(["cache-teacher", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_top_k_larger_than_the_vocabulary_is_refused(tmp_path, teacher, chat_file, capsys):
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(tmp_path / "c")]
    err = _cache_error(capsys, [*args, "--top-k", str(VOCAB + 1)])
    assert "vocabulary" in err and f"--top-k {VOCAB}" in err


def test_prompt_only_rows_are_refused_naming_the_modes_that_take_them(tmp_path, teacher, capsys):
    rows = [{"messages": [{"role": "user", "content": "How much is the lamp?"}]}]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = ["--teacher", str(teacher), "--data", str(data), "--output", str(tmp_path / "c")]
    err = _cache_error(capsys, args)
    assert "no assistant answer" in err and "generate-data" in err


def test_resuming_into_a_cache_with_other_settings_is_refused(
    tmp_path, teacher, small_cache, chat_file, capsys
):
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(small_cache)]
    assert "top_k" in _cache_error(capsys, [*args, "--top-k", "4"])


def test_cache_teacher_cli_writes_a_complete_cache(tmp_path, teacher, chat_file, capsys):
    out = tmp_path / "c"
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(out)]
    assert main(["cache-teacher", *args, "--top-k", "4", "--batch-size", "16"]) == 0
    meta = json.loads((out / "cache.json").read_text())
    assert meta["completed"] == [s["file"] for s in meta["shards"]]
    shard = cache_mod.Shard(out / meta["shards"][0]["file"])
    assert shard.arrays["counts"].max() <= 4 and isinstance(shard.arrays["ids"], np.memmap)
    assert shard.positions(0, 4)[0].shape[1] == 4
    assert "cached 64 conversations" in capsys.readouterr().out


def test_cached_teacher_rejects_a_conversation_it_does_not_hold(small_cache, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cached = CachedTeacher.open(small_cache, tok, None, temperature=1.0, max_length=512)
    new = build_dataset(make_conversations(3, seed=42), tok, 512, "new")
    assert not cached.covers(new)
    with pytest.raises(UserError, match="not in the cache"):
        cached.targets(collate(new.examples, tok.pad_token_id), new.examples)


def _sampled(logits, k, m, seed):
    return cache_mod.sparse_targets(logits, k, m, torch.Generator().manual_seed(seed))


def test_tail_samples_keep_the_top_and_sum_to_one_without_duplicates():
    logits = torch.randn(5, 30) * 3
    ids, lps = _sampled(logits, 8, 4, 0)
    top = torch.log_softmax(logits, -1).topk(4, -1)
    assert torch.equal(ids[:, :4], top.indices)
    torch.testing.assert_close(lps[:, :4], top.values)
    torch.testing.assert_close(lps.exp().sum(-1), torch.ones(5))
    for row_ids, row_lps in zip(ids, lps):
        used = row_ids[torch.isfinite(row_lps)].tolist()
        assert len(used) == len(set(used))


def test_tail_samples_make_the_forward_kl_gradient_unbiased():
    """Averaged over draws, the cache's sparse forward-KL gradient is the full-vocabulary one;
    top-k alone is off by the tail's shape."""
    torch.manual_seed(0)
    teacher = torch.randn(3, 40) * 1.5
    student = torch.randn(3, 40, requires_grad=True)

    def grad(target) -> torch.Tensor:
        (g,) = torch.autograd.grad(per_token_divergence(student, target, "fkl").sum(), student)
        return g

    dense = grad(teacher)
    mean = sum(grad(SparseLogprobs(*_sampled(teacher, 8, 4, s))) for s in range(3000)) / 3000
    top = torch.log_softmax(teacher, -1).topk(8, -1)
    topk_only = grad(SparseLogprobs(top.indices, top.values))
    assert (mean - dense).abs().max() < 0.01
    assert (topk_only - dense).abs().max() > 5 * (mean - dense).abs().max()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_training_from_a_cache_with_tail_samples_stays_finite(
    tmp_path_factory, teacher, tokenizer_dir, chat_file, kind
):
    out = tmp_path_factory.getbasetemp() / "tail_cache"
    if not (out / "cache.json").is_file():
        write_cache(str(teacher), str(chat_file), str(out), top_k=8, tail_samples=4)
    run = tmp_path_factory.mktemp("run")
    student = build_tiny_model(run / "student", tokenizer_dir, "llama", 1)
    cfg = _cfg(run / "out", chat_file, student=str(student), teacher_cache=str(out))
    cfg.loss.kind = kind
    train(cfg)
    lines = [json.loads(x) for x in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    assert all(np.isfinite(r["val_kd"]) for r in lines if "val_kd" in r)


def test_tail_samples_not_below_top_k_are_refused(tmp_path, teacher, chat_file, capsys):
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(tmp_path / "c")]
    err = _cache_error(capsys, [*args, "--top-k", "8", "--tail-samples", "8"])
    assert "--tail-samples 8" in err and "--top-k (8)" in err


def test_cache_teacher_takes_its_settings_from_the_recipe(tmp_path, teacher, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(6, seed=3))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"teacher: {teacher}\nteacher_cache: {tmp_path / 'cache'}\n"
        f"data: {{train: {data}, max_length: 64}}\nloss: {{temperature: 2.0}}\n"
    )
    assert main(["cache-teacher", "--config", str(recipe), "--top-k", "4"]) == 0
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert (meta["temperature"], meta["max_length"], meta["data"]) == (2.0, 64, str(data))
    # A flag wins over the recipe's field.
    args = ["--config", str(recipe), "--output", str(tmp_path / "c2"), "--max-length", "96"]
    assert main(["cache-teacher", *args, "--top-k", "4"]) == 0
    meta = json.loads((tmp_path / "c2" / "cache.json").read_text())
    assert (meta["temperature"], meta["max_length"]) == (2.0, 96)
    capsys.readouterr()
    recipe.write_text(f"data: {{train: {data}}}\n")
    err = _cache_error(capsys, ["--config", str(recipe), "--output", str(tmp_path / "c3")])
    assert f"needs --teacher: {recipe} has no teacher" in err


def test_cache_teacher_defaults_are_the_recipe_defaults():
    defaults = inspect.signature(write_cache).parameters
    recipe = load_distill_config(None)
    assert defaults["temperature"].default == recipe.loss.temperature
    assert defaults["max_length"].default == recipe.data.max_length


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature nan: Input should be a finite number"),
        (["--temperature", "inf"], "--temperature inf: Input should be a finite number"),
        (["--temperature", "-1"], "--temperature -1.0: Input should be greater than 0"),
        (["--max-length", "0"], "--max-length 0: Input should be greater than or equal to 8"),
        (["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
        (["--min-mass", "0"], "--min-mass 0.0: must be above 0 and at most 1"),
        (["--min-mass", "1.5"], "--min-mass 1.5: must be above 0 and at most 1"),
        (["--min-mass", "nan"], "--min-mass nan: must be above 0 and at most 1"),
    ],
)
def test_cache_teacher_numbers_are_checked_like_the_recipes(
    tmp_path, teacher, chat_file, capsys, monkeypatch, flags, message
):
    monkeypatch.setattr(cache_mod, "load_model", lambda *_: pytest.fail("loaded the teacher"))
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(tmp_path / "c")]
    assert _cache_error(capsys, [*args, *flags]).startswith(f"error: {message}")
    assert not (tmp_path / "c").exists()


def test_cache_teacher_refuses_an_output_holding_a_model(tmp_path, teacher, chat_file, capsys):
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(teacher)]
    err = _cache_error(capsys, [*args, "--top-k", "4"])
    assert f"--output {teacher} holds a model (config.json, model.safetensors" in err
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before


def test_cache_teacher_removes_a_half_written_shard_and_says_so(
    tmp_path, teacher, chat_file, capsys
):
    out = tmp_path / "c"
    out.mkdir()
    (out / ".shard-00003.safetensors.tmp").write_bytes(b"half")
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(out)]
    assert main(["cache-teacher", *args, "--top-k", "4"]) == 0
    said = capsys.readouterr().out
    assert f"removed .shard-00003.safetensors.tmp from {out}, left half-written" in said
    assert not (out / ".shard-00003.safetensors.tmp").exists()


# ------------------------------------------------------------------ compact format (version 2)


def _bytes_per_position(cache) -> float:
    meta = json.loads((cache / "cache.json").read_text())
    positions = sum(s["positions"] for s in meta["shards"])
    return sum((cache / s["file"]).stat().st_size for s in meta["shards"]) / positions


SHARP = 0.25  # the random teacher at this temperature is about as peaked as a trained one


@pytest.fixture(scope="module")
def k64_caches(tmp_path_factory, teacher, chat_file):
    """k=64 caches: every slot in float16 (what version 1 stored), and the default format."""
    out = tmp_path_factory.mktemp("k64")
    common = {"top_k": 64, "temperature": SHARP, "progress": False}
    write_cache(str(teacher), str(chat_file), str(out / "fixed"), **common, min_mass=1.0,
                logprob_bits=16)  # fmt: skip
    write_cache(str(teacher), str(chat_file), str(out / "compact"), **common)
    return out / "fixed", out / "compact"


def test_compact_cache_takes_fewer_bytes_and_reads_back_the_writers_targets(
    teacher, k64_caches, tokenizer_dir, chat_file
):
    fixed, compact = k64_caches
    meta = json.loads((compact / "cache.json").read_text())
    assert (meta["version"], meta["min_mass"], meta["logprob_dtype"]) == (2, 0.999, "uint8")
    assert _bytes_per_position(fixed) > 64 * (2 + 2)
    assert _bytes_per_position(compact) < 0.5 * _bytes_per_position(fixed)

    data, batch = _batch(tokenizer_dir, chat_file, n=16)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    logits = _live_logits(teacher, batch, data.examples) / SHARP
    want_ids, want = cache_mod.sparse_targets(logits, 64, min_mass=0.999)
    for cache, tolerance in ((fixed, 2e-3), (compact, 1 / 16)):
        cached = CachedTeacher.open(cache, tok, data, temperature=SHARP, max_length=512)
        got = cached.targets(batch, data.examples)(slice(None))
        assert got.ids.shape == got.logprobs.shape == (want.shape[0], 64)
        kept = torch.isfinite(got.logprobs)
        if cache == fixed:
            assert kept.all()
            continue
        # The writer's kept prefix, then -inf and token 0 in the slots it dropped.
        assert torch.equal(kept, torch.isfinite(want)) and 1 < kept.sum(-1).float().mean() < 48
        assert torch.equal(got.ids[kept], want_ids[kept]) and (got.ids[~kept] == 0).all()
        torch.testing.assert_close(got.logprobs[kept], want[kept], rtol=0, atol=tolerance)
        assert torch.isneginf(got.logprobs[~kept]).all()
        # Dropping only the slots past 99.9% of the top-k mass: what a position keeps holds
        # at least 99.9% of what it held.
        top_mass = torch.log_softmax(logits, -1).topk(64, -1).values.exp().sum(-1)
        assert (got.logprobs.exp().sum(-1) / top_mass).min() > 0.999 - 0.01


def _sparse_rows(ids: torch.Tensor, logprobs: torch.Tensor) -> list[dict[int, float]]:
    """Each position's {token: log-prob} over its used (finite) slots."""
    return [
        {int(i): float(lp) for i, lp in zip(r_ids, r_lps) if torch.isfinite(lp)}
        for r_ids, r_lps in zip(ids, logprobs)
    ]


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize(("min_mass", "tail"), [(1.0, 0), (0.9, 0), (0.9, 4)])
def test_shard_round_trip_pads_what_a_position_does_not_keep(tmp_path, bits, min_mass, tail):
    """pack_slots -> shard file -> Shard.positions gives back each position's used slots (tail
    samples after its kept top prefix), padded to k with token 0 and log-prob -inf."""
    k = 12
    logits = torch.randn(40, 300) * torch.linspace(0.5, 6, 40)[:, None]  # flat to peaked
    ids, lps = cache_mod.sparse_targets(logits, k, tail, torch.Generator().manual_seed(0), min_mass)
    packed = cache_mod.pack_slots(ids, lps, 300, bits)
    assert packed["counts"].dtype == np.uint8 and packed["ids"].dtype == np.uint16
    assert packed["logprobs"].dtype == (np.uint8 if bits == 8 else np.float16)
    assert len(packed["ids"]) == int(torch.isfinite(lps).sum()) == packed["counts"].sum()
    keys = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16)
    ends = np.cumsum(packed["counts"], dtype=np.int64)
    arrays = {"keys": keys, "offsets": np.array([0, 15, 40]), **packed}
    arrays["slot_offsets"] = np.array([0, ends[14], ends[-1]])
    cache_mod._write_shard(tmp_path / "s.safetensors", arrays)
    shard = cache_mod.Shard(tmp_path / "s.safetensors")
    parts = [shard.positions(e, k) for e in (0, 1)]
    got_ids = np.concatenate([p[0] for p in parts])
    got = np.concatenate([p[1] for p in parts])
    assert got_ids.shape == got.shape == (40, k) and got_ids.dtype == np.int64
    used = np.isfinite(got)
    assert (used == (np.arange(k) < packed["counts"][:, None])).all()  # the used slots first
    assert (got_ids[~used] == 0).all() and np.isneginf(got[~used]).all()
    rows = _sparse_rows(torch.from_numpy(got_ids), torch.from_numpy(got))
    for row, want in zip(rows, _sparse_rows(ids, lps), strict=True):
        assert row.keys() == want.keys()
        for t in row:  # 8 bits: within a code; float16: within its rounding
            assert abs(row[t] - want[t]) <= (1 / 16 if bits == 8 else 1e-3 * abs(want[t]) + 1e-6)
    if min_mass == 1.0 and tail == 0:
        assert used.all()
    if tail:  # the tail draws are all still there, after the top prefix
        for r in range(40):
            draws = {int(i) for i, lp in zip(ids[r, k - tail :], lps[r, k - tail :]) if lp > -1e9}
            assert draws <= set(got_ids[r, used[r]][-len(draws) :].tolist())


def test_eight_bit_log_probs_keep_the_mass_that_leaves_the_tail_bucket():
    """Rounding each log-prob alone to the nearest code can push a position's kept mass past 1
    (no tail left); the codes' error diffusion keeps each within a code and the sum right."""
    torch.manual_seed(0)
    lps = torch.log_softmax(torch.randn(500, 2000) * 2.5, -1).topk(64, -1).values
    ref, codes = cache_mod.encode_logprobs(lps)
    got = torch.from_numpy(cache_mod.decode_logprobs(codes.numpy(), ref.numpy()))
    assert (got - lps).abs().max() <= 1 / 16 + 1e-3
    nearest = ref.float()[:, None] - ((ref.float()[:, None] - lps) * 16).round() / 16
    true_mass = lps.exp().sum(-1)
    diffused = (got.exp().sum(-1) - true_mass).abs()
    assert diffused.max() < 0.2 * (nearest.exp().sum(-1) - true_mass).abs().max()
    assert diffused.max() < 1e-3


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"])
def test_padded_slots_are_the_same_loss_and_gradient_as_no_slots(kind):
    """The reader pads a position's dropped slots with token 0 at log-prob -inf: the loss and its
    closed-form gradient equal those of the position's kept slots alone, also where token 0 is
    one of them."""
    from chatdistill.distill.loss_grads import loss_and_logit_grad

    torch.manual_seed(3)
    n, v, k = 6, 50, 8
    z, t = torch.randn(n, v) * 3, torch.log_softmax(torch.randn(n, v) * 3, -1)
    t[1, 0] = t[1].max() + 1  # token 0 is a kept token of position 1
    top = torch.log_softmax(t, -1).topk(k, -1)
    counts = [1, 3, 8, 5, 2, 7]
    kept = torch.arange(k)[None] < torch.tensor(counts)[:, None]
    padded = SparseLogprobs(
        top.indices.masked_fill(~kept, 0), top.values.masked_fill(~kept, -torch.inf)
    )
    targets = torch.randint(0, v, (n,))
    kw = {"weights": (0.3, 0.7), "beta": 0.4, "skew": 0.1, "temperature": 2.0}
    got = loss_and_logit_grad(z, targets, padded, kind, **kw)
    for r, c in enumerate(counts):
        alone = SparseLogprobs(top.indices[r : r + 1, :c], top.values[r : r + 1, :c])
        want = loss_and_logit_grad(z[r : r + 1], targets[r : r + 1], alone, kind, **kw)
        torch.testing.assert_close(got[3][r], want[3][0], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(got[3][r]).all()
    rows = per_token_divergence(z, padded, kind, beta=0.4, skew=0.1, temperature=2.0)
    for r, c in enumerate(counts):
        alone = SparseLogprobs(top.indices[r : r + 1, :c], top.values[r : r + 1, :c])
        want = per_token_divergence(z[r : r + 1], alone, kind, beta=0.4, skew=0.1, temperature=2.0)
        torch.testing.assert_close(rows[r], want[0], rtol=1e-5, atol=1e-6)


def _as_version_1(src, dst):
    """The same cache in the version-1 layout: (P, k) ids and float16 log-probs per shard."""
    from safetensors.numpy import save_file

    dst.mkdir()
    meta = json.loads((src / "cache.json").read_text())
    k = meta["top_k"]
    for s in meta["shards"]:
        shard = cache_mod.Shard(src / s["file"])
        ids, lps = zip(*(shard.positions(e, k) for e in range(len(shard.keys))))
        save_file(
            {
                "keys": np.asarray(shard.arrays["keys"]),
                "offsets": np.asarray(shard.arrays["offsets"]),
                "ids": np.concatenate(ids).astype(np.uint16),
                "logprobs": np.concatenate(lps).astype(np.float16),
            },
            str(dst / s["file"]),
            metadata={"format": cache_mod.FORMAT},
        )
    meta["version"], meta["logprob_dtype"] = 1, "float16"
    del meta["min_mass"]
    (dst / "cache.json").write_text(json.dumps(meta))


def test_a_version_1_cache_is_still_read(tmp_path, fixed_cache, tokenizer_dir, chat_file):
    old = tmp_path / "v1"
    _as_version_1(fixed_cache, old)
    assert "counts" not in cache_mod.Shard(old / "shard-00000.safetensors").arrays
    data, batch = _batch(tokenizer_dir, chat_file)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    got = [
        CachedTeacher.open(c, tok, data, temperature=1.0, max_length=512).targets(
            batch, data.examples
        )(slice(None))
        for c in (old, fixed_cache)
    ]
    assert torch.equal(got[0].ids, got[1].ids) and torch.equal(got[0].logprobs, got[1].logprobs)


def test_cache_teacher_refuses_to_resume_a_version_1_cache(
    tmp_path, teacher, fixed_cache, chat_file, capsys
):
    old = tmp_path / "v1"
    _as_version_1(fixed_cache, old)
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(old)]
    err = _cache_error(capsys, [*args, "--top-k", "8", "--min-mass", "1", "--logprob-bits", "16"])
    assert "version-1 cache" in err and "choose a new --output or delete" in err


@pytest.mark.parametrize(
    ("setting", "word"), [({"min_mass": 0.99}, "min_mass"), ({"logprob_bits": 16}, "logprob")]
)
def test_resuming_with_another_compact_setting_is_refused(
    teacher, small_cache, chat_file, setting, word
):
    with pytest.raises(UserError, match=f"holds a cache with another {word}"):
        write_cache(str(teacher), str(chat_file), str(small_cache), top_k=8, shard_positions=400,
                    **setting)  # fmt: skip


def test_cache_teacher_help_states_write_caches_defaults():
    from chatdistill.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "cache-teacher" in a.choices)
    helps = {a.dest: a.help for a in sub.choices["cache-teacher"]._actions}
    defaults = inspect.signature(write_cache).parameters
    assert f"default: {defaults['min_mass'].default:g}" in helps["min_mass"]
    assert f"default: {defaults['logprob_bits'].default})" in helps["logprob_bits"]
