import json

import pytest

from chatdistill.cli import main
from chatdistill.config import load_distill_config
from chatdistill.data import load_rows
from chatdistill.distill import teacher_answers as answers_mod
from chatdistill.distill.teacher_answers import generate_data
from chatdistill.distill.train import train
from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine, SamplingParams

from conftest import make_conversations, write_jsonl


def _prompt_rows(n=12):
    rows = make_conversations(n, seed=4)
    return [{"messages": r["messages"][:-1], "id": i} for i, r in enumerate(rows)]


def test_generate_data_writes_the_teachers_greedy_answers_and_keeps_fields(tmp_path, tiny_models):
    rows = make_conversations(5, seed=2)
    rows[0]["answer"] = "kept"
    rows[1] = {"prompt": "How much is the lamp?", "completion": "old", "answer": "ten"}
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "seqkd.jsonl"
    summary = generate_data(
        str(tiny_models["llama"]), str(prompts), str(out), max_new_tokens=6, progress=False
    )
    got = load_rows(out)
    assert summary["rows"] == 5 and len(got) == 5
    engine = Engine.load(str(tiny_models["llama"]), device="cpu")
    for src, row in zip(load_rows(prompts), got):
        assert row["messages"][:-1] == src["messages"][:-1]
        expect = engine.chat(src["messages"][:-1], SamplingParams(max_new_tokens=6))
        assert row["messages"][-1] == {"role": "assistant", "content": expect.text}
    assert got[0]["answer"] == "kept" and got[1]["answer"] == "ten"


def test_generate_data_samples_several_seeded_answers_per_prompt(tmp_path, tiny_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(3))
    kw = dict(max_new_tokens=6, temperature=1.0, samples_per_prompt=2, progress=False)
    generate_data(str(tiny_models["llama"]), str(prompts), str(tmp_path / "a.jsonl"), **kw)
    generate_data(str(tiny_models["llama"]), str(prompts), str(tmp_path / "b.jsonl"), **kw)
    a = load_rows(tmp_path / "a.jsonl")
    assert [r["id"] for r in a] == [0, 0, 1, 1, 2, 2]
    assert a == load_rows(tmp_path / "b.jsonl")
    assert a[0]["messages"][-1] != a[1]["messages"][-1]


def test_killed_generate_data_resumes_to_the_same_file(tmp_path, tiny_models, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(12))
    teacher = str(tiny_models["gpt2"])
    kw = dict(max_new_tokens=5, temperature=0.8, batch_size=2, progress=False)
    generate_data(teacher, str(prompts), str(tmp_path / "full.jsonl"), **kw)
    real, calls = Engine.generate, []

    def die_on_second_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    out = tmp_path / "cut.jsonl"
    monkeypatch.setattr(answers_mod.Engine, "generate", die_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        generate_data(teacher, str(prompts), str(out), **kw)
    with out.open("a") as f:
        f.write('{"messages": [{"role": "us')  # a line cut off by the kill
    monkeypatch.setattr(answers_mod.Engine, "generate", real)
    summary = generate_data(teacher, str(prompts), str(out), **kw)
    assert summary["rows"] == 12
    assert out.read_text() == (tmp_path / "full.jsonl").read_text()


def _gen_error(capsys, args):
    assert main(["generate-data", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_generate_data_refuses_to_resume_with_other_settings(tmp_path, tiny_models, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(2))
    args = ["--teacher", str(tiny_models["llama"]), "--prompts", str(prompts), "--output"]
    args += [str(tmp_path / "o.jsonl"), "--max-new-tokens", "4"]
    assert main(["generate-data", *args]) == 0
    assert "o.jsonl: 2 rows" in capsys.readouterr().out
    assert "max_new_tokens" in _gen_error(capsys, [*args[:-1], "5"])
    # The demo's way: settings changed since the last run, so answer again from scratch.
    summary = generate_data(str(tiny_models["llama"]), str(prompts), str(tmp_path / "o.jsonl"),
                            max_new_tokens=5, progress=False, replace_stale=True)  # fmt: skip
    assert summary["rows"] == 2 and "another max_new_tokens" in capsys.readouterr().out
    side = json.loads((tmp_path / "o.jsonl.generate.json").read_text())
    assert side["max_new_tokens"] == 5 and side["precision"] == "auto"
    with pytest.raises(UserError, match="precision 'fp8': use one of auto, fp32, bf16"):
        generate_data(str(tiny_models["llama"]), str(prompts), str(tmp_path / "x.jsonl"),
                      precision="fp8")  # fmt: skip


def test_generate_data_refuses_greedy_repeats_and_foreign_outputs(tmp_path, tiny_models, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(2))
    args = ["--teacher", str(tiny_models["llama"]), "--prompts", str(prompts), "--output"]
    assert "--temperature" in _gen_error(
        capsys, [*args, str(tmp_path / "o.jsonl"), "--samples-per-prompt", "2"]
    )
    foreign = write_jsonl(tmp_path / "mine.jsonl", _prompt_rows(1))
    assert "not written by generate-data" in _gen_error(capsys, [*args, str(foreign)])


def test_generated_data_trains_a_student_with_sft(tmp_path, tiny_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(12))
    data = tmp_path / "seqkd.jsonl"
    generate_data(str(tiny_models["llama"]), str(prompts), str(data), 8, progress=False)
    cfg = load_distill_config(
        None,
        {
            "student_config": str(tiny_models["llama"]),
            "tokenizer": str(tiny_models["llama"]),
            "loss.kind": "sft",
            "data.train": str(data),
            "output": str(tmp_path / "sft"),
            "train.max_steps": 2,
            "train.save_every": 0,
        },
    )
    assert (train(cfg) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature nan: Input should be a finite number"),
        (["--top-p", "inf"], "--top-p inf: Input should be a finite number"),
        (["--seed", "-1"], "--seed -1: Input should be greater than or equal to 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: Input should be greater than or equal"),
    ],
)
def test_generate_data_numbers_are_checked_like_the_recipes(
    tmp_path, tiny_models, capsys, flags, message
):
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(2))
    args = ["--teacher", str(tiny_models["llama"]), "--prompts", str(prompts)]
    err = _gen_error(capsys, [*args, "--output", str(tmp_path / "o.jsonl"), *flags])
    assert err.startswith(f"error: {message}")
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_data_never_writes_into_a_model_directory(tmp_path, tiny_models, capsys):
    teacher = tiny_models["llama"]
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(2))
    args = ["--teacher", str(teacher), "--prompts", str(prompts), "--output", str(teacher)]
    assert str(teacher) in _gen_error(capsys, args)
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before


def test_answers_cut_at_the_budget_are_marked_so_they_teach_no_ending(tmp_path, tiny_models):
    from chatdistill.data import TRUNCATED

    prompts = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(4))
    out = tmp_path / "a.jsonl"
    generate_data(
        str(tiny_models["llama"]), str(prompts), str(out), max_new_tokens=3, progress=False
    )
    engine = Engine.load(str(tiny_models["llama"]), device="cpu")
    for src, row in zip(load_rows(prompts), load_rows(out)):
        done = engine.chat(src["messages"], SamplingParams(max_new_tokens=3))
        assert row.get(TRUNCATED, False) == (done.finish_reason == "length")


def test_a_run_that_fails_before_its_first_answer_leaves_nothing_behind(tmp_path, tiny_models):
    long = [{"messages": [{"role": "user", "content": "lamp " * 2000}]}]
    prompts = write_jsonl(tmp_path / "p.jsonl", long)
    out = tmp_path / "a.jsonl"
    with pytest.raises(UserError, match="more than the teacher's context"):
        generate_data(str(tiny_models["llama"]), str(prompts), str(out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
