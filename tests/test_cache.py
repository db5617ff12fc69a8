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
    write_cache(str(teacher), str(chat_file), str(out), top_k=VOCAB, progress=False)
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


def test_cached_top_k_equals_the_live_teachers_top_k(
    teacher, small_cache, tokenizer_dir, chat_file
):
    data, batch = _batch(tokenizer_dir, chat_file)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cached = CachedTeacher.open(small_cache, tok, data, temperature=1.0, max_length=512)
    sparse = cached.targets(batch, data.examples)(slice(None))
    live = LiveTeacher(load_model(str(teacher)), VOCAB).targets(batch, data.examples)(slice(None))
    top = torch.log_softmax(live.float(), -1).topk(8, -1)
    assert torch.equal(sparse.ids, top.indices)
    torch.testing.assert_close(sparse.logprobs, top.values, rtol=2e-3, atol=2e-3)


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
    assert shard.arrays["ids"].shape[1] == 4 and isinstance(shard.arrays["ids"], np.memmap)
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
    ],
)
def test_cache_teacher_numbers_are_checked_like_the_recipes(
    tmp_path, teacher, chat_file, capsys, monkeypatch, flags, message
):
    monkeypatch.setattr(cache_mod, "load_model", lambda *_: pytest.fail("loaded the teacher"))
    args = ["--teacher", str(teacher), "--data", str(chat_file), "--output", str(tmp_path / "c")]
    assert _cache_error(capsys, [*args, *flags]) == f"error: {message}\n"
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
