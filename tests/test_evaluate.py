import json
import shutil
from dataclasses import asdict

import pytest

from chatdistill.cli import main
from chatdistill.data import render_example
from chatdistill.errors import UserError
from chatdistill.evaluate.config import EvalConfig
from chatdistill.evaluate.items import prepare_items
from chatdistill.evaluate.probes import speed_probe, weights_size
from chatdistill.evaluate.result import EvalResult, ModelResult
from chatdistill.evaluate.run import evaluate, model_names
from chatdistill.inference.engine import Completion
from chatdistill.models.tokenizer import train_bpe_tokenizer

from conftest import build_tiny_model, make_conversations, write_jsonl

FAST = dict(
    max_samples=4,
    max_new_tokens=6,
    batch_size=4,
    speed_prompts=1,
    speed_new_tokens=3,
    num_samples=2,
    memory=False,
)


def _rows_with_answers(n: int) -> list[dict]:
    rows = make_conversations(n, seed=3)
    for r in rows[::2]:
        r["answer"] = r["messages"][-1]["content"].split()[-1]
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval")
    teacher = tiny_models["llama"]
    small = build_tiny_model(root / "small", tokenizer_dir, "llama", seed=1, num_hidden_layers=1)
    twin = root / "twin"  # the teacher under another name: a student that keeps everything
    shutil.copytree(teacher, twin)
    (twin / "README.md").write_text(TWIN_README)  # as a model from elsewhere brings its own
    data = write_jsonl(root / "test.jsonl", _rows_with_answers(6))
    return {"root": root, "teacher": teacher, "small": small, "twin": twin, "data": data}


TWIN_README = "# Twin\n\nWritten by hand; eval must leave it alone.\n"


@pytest.fixture(scope="module")
def said() -> list[str]:
    return []


@pytest.fixture(scope="module")
def run(setup, said):
    cfg = EvalConfig(
        teacher=str(setup["teacher"]),
        students=[str(setup["small"]), str(setup["twin"])],
        data=str(setup["data"]),
        output=str(setup["root"] / "out"),
        **FAST,
    )
    return evaluate(cfg, say=said.append)


def _by_name(results: EvalResult) -> dict[str, ModelResult]:
    return {m.name: m for m in results.models}


def test_eval_writes_results_summary_and_report(run, setup):
    out = setup["root"] / "out"
    assert EvalResult.from_json(json.loads((out / "results.json").read_text())) == run
    assert "## Teacher quality kept" in (out / "summary.md").read_text()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    assert [m.role for m in run.models] == ["teacher", "student", "student"]
    assert run.data.conversations == 4 and run.data.with_answer == 2
    assert run.kept_mode == "ratio"


def test_teacher_copy_as_student_matches_teacher_exactly(run):
    m = _by_name(run)
    teacher, twin = m["llama"], m["twin"]
    assert twin.fidelity.kl == pytest.approx(0.0, abs=1e-6)
    assert twin.fidelity.top1_agreement == 100.0
    assert twin.fidelity.rouge_l_vs_teacher == pytest.approx(100.0)
    assert asdict(twin.quality) == pytest.approx(asdict(teacher.quality))
    for key in ("ce", "perplexity", "chrf"):
        assert getattr(twin.kept, key) == pytest.approx(100.0)


def test_smaller_student_differs_and_costs_less(run):
    m = _by_name(run)
    teacher, small = m["llama"], m["small"]
    assert small.fidelity.kl > 0.001
    assert small.quality.ce != pytest.approx(teacher.quality.ce)
    expected = 100 * teacher.quality.ce / small.quality.ce
    assert small.kept.ce == pytest.approx(expected)
    assert small.cost.parameters < teacher.cost.parameters
    assert small.cost.size_on_disk_bytes < teacher.cost.size_on_disk_bytes
    assert teacher.fidelity is None and teacher.kept is None


def test_quality_and_speed_fields_are_measured(run):
    for m in run.models:
        q, c = m.quality, m.cost
        assert q.perplexity > 1 and 0 <= q.rouge_l <= 100 and 0 <= q.chrf <= 100
        assert 0 <= q.accuracy <= 100
        assert c.prefill_tokens_per_s > 0 and c.time_to_first_token_s > 0
        assert c.decode_tokens_per_s_batch1 > 0 and c.decode_tokens_per_s_batch8 > 0
        assert c.peak_memory_mb is None  # memory=False


def test_speed_is_measured_once_per_shape(run, setup):
    """The twin has the teacher's architecture, size and dtype: its speed is the teacher's, said
    so in the results and the report; the smaller student is timed itself."""
    m = _by_name(run)
    teacher, twin, small = m["llama"], m["twin"], m["small"]
    assert twin.cost.same_shape_as == "llama" and small.cost.same_shape_as is None
    assert teacher.cost.same_shape_as is None
    assert twin.cost.decode_tokens_per_s_batch1 == teacher.cost.decode_tokens_per_s_batch1
    assert small.cost.decode_tokens_per_s_batch1 != teacher.cost.decode_tokens_per_s_batch1
    summary = (setup["root"] / "out" / "summary.md").read_text()
    assert "twin: speed and memory measured on llama" in summary


def test_samples_show_every_models_answer(run):
    assert len(run.samples) == 2
    assert set(run.samples[0].answers) == {"llama", "small", "twin"}
    assert run.samples[0].answers["twin"] == run.samples[0].answers["llama"]


def test_model_card_written_into_each_student(run, setup):
    for card in (setup["small"] / "README.md", setup["twin"] / "MODEL_CARD.md"):
        text = card.read_text()
        assert "## Evaluation" in text and "| KL(teacher‖model) ↓ |" in text
    assert not (setup["teacher"] / "README.md").exists()
    assert not (setup["small"] / "MODEL_CARD.md").exists()


def test_model_card_leaves_a_readme_it_did_not_write(run, setup, said):
    assert (setup["twin"] / "README.md").read_text() == TWIN_README
    notice = f"twin: its README.md is not chatdistill's; model card in {setup['twin']}"
    assert any(line.startswith(notice) for line in said)


def test_baseline_turns_kept_into_gap_closed(setup):
    cfg = EvalConfig(
        teacher=str(setup["teacher"]),
        students=[str(setup["twin"])],
        baseline=str(setup["small"]),
        data=str(setup["data"]),
        output=str(setup["root"] / "out-baseline"),
        model_cards=False,
        **{**FAST, "max_samples": 2},
    )
    results = evaluate(cfg)
    assert results.kept_mode == "gap_closed"
    twin = _by_name(results)["twin"]
    assert twin.kept.ce == pytest.approx(100.0)
    assert _by_name(results)["small"].kept is None


def _cfg(setup, **kw) -> EvalConfig:
    base = dict(
        teacher=str(setup["teacher"]),
        students=[str(setup["small"])],
        data=str(setup["data"]),
        output=str(setup["root"] / "bad"),
    )
    return EvalConfig(**{**base, **kw, **FAST})


def test_missing_model_dir_is_a_user_error(setup):
    with pytest.raises(UserError, match=r"--student .*nope: no such file or directory"):
        evaluate(_cfg(setup, students=[str(setup["root"] / "nope")]))


def test_missing_data_file_is_a_user_error(setup):
    with pytest.raises(UserError, match="data file not found"):
        evaluate(_cfg(setup, data=str(setup["root"] / "missing.jsonl")))


def test_data_without_assistant_turns_is_a_user_error(setup):
    path = write_jsonl(setup["root"] / "prompts.jsonl", [{"prompt": "Hi?"}, {"prompt": "Yo?"}])
    with pytest.raises(UserError, match="no conversation has an assistant turn to score"):
        evaluate(_cfg(setup, data=str(path)))


def test_student_with_other_vocabulary_is_a_user_error(setup, chat_rows):
    texts = [m["content"] for r in chat_rows for m in r["messages"]]
    tok_dir = setup["root"] / "other-tok"
    train_bpe_tokenizer(texts * 4, vocab_size=300).save_pretrained(tok_dir)
    other = build_tiny_model(setup["root"] / "other", tok_dir, "llama")
    with pytest.raises(UserError, match=r"--student .*other: .*vocab \d+ vs \d+"):
        evaluate(_cfg(setup, students=[str(other)]))


def test_cli_prints_one_line_error_and_exits_2(setup, capsys):
    argv = ["eval", "--teacher", str(setup["root"] / "gone"), "--student", str(setup["small"])]
    argv += ["--data", str(setup["data"]), "--output", str(setup["root"] / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --teacher") and err.count("\n") == 1


def test_cli_prints_whole_tables_into_a_file_or_pipe(setup, capsys):
    argv = ["eval", "--teacher", str(setup["teacher"]), "--student", str(setup["small"])]
    argv += ["--data", str(setup["data"]), "--output", str(setup["root"] / "piped")]
    argv += ["--max-samples", "2", "--max-new-tokens", "2", "--speed-prompts", "1"]
    argv += ["--speed-new-tokens", "2", "--no-memory", "--no-model-card"]
    assert main(argv) == 0
    out = capsys.readouterr().out  # captured: not a terminal
    header = next(line for line in out.splitlines() if "Decode tok/s (b=8)" in line)
    assert "TTFT (ms)" in header and len(header) > 80
    assert "…" not in out


@pytest.mark.slow
def test_cli_eval_measures_memory_and_prints_tables(setup, capsys):
    out = setup["root"] / "cli-out"
    argv = ["eval", "--teacher", str(setup["teacher"]), "--student", str(setup["small"])]
    argv += ["--student", str(setup["twin"])]
    argv += ["--data", str(setup["data"]), "--output", str(out), "--max-samples", "2"]
    argv += ["--max-new-tokens", "4", "--speed-prompts", "1", "--speed-new-tokens", "2"]
    argv += ["--no-model-card"]
    assert main(argv) == 0
    assert "Cost and speed" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    mem = {m["name"]: m["cost"]["peak_memory_mb"] for m in results["models"]}
    assert all(v > 0 for v in mem.values())
    assert mem["twin"] == mem["llama"] != mem["small"]  # measured once per shape
    assert "fresh process per model" in results["settings"]["memory_method"]


def test_prepare_items_keeps_prompt_reference_and_answer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": 4},
    ]
    items = prepare_items(rows, tok, 64, "x.jsonl")
    assert items[0].prompt == rows[0]["messages"][:1] and items[0].reference == "Yo"
    assert items[0].example == render_example(tok, rows[0]["messages"], 64)
    assert items[1].reference is None and items[1].answer == "4" and items[1].example is None


def test_names_are_unique_and_readable():
    assert model_names(["a/x", "b/x", "c/y"]) == ["a/x", "b/x", "y"]
    assert model_names(["a/x", "a/x"]) == ["a/x#1", "a/x#2"]


def test_weights_size_counts_only_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    assert weights_size(tmp_path) == 100


class ScriptedEngine:
    """Completions with set timings, as `Engine.generate` measures them. Batch 1: 0.1 s to the
    first token, 0.05 s per token after it. Batch 8: rows get their first token 0.01 s apart as
    their prefills finish, then step together, 0.08 s per step, and finish on the same step."""

    def __init__(self) -> None:
        self.eos_token_ids = {0}
        self.eos_while_generating: list[set] = []

    def generate(self, prompts, params, batch_size):
        self.eos_while_generating.append(self.eos_token_ids)
        n, out = params.max_new_tokens, []
        for i, p in enumerate(prompts):
            if batch_size == 1:
                first, elapsed = 0.1, 0.1 + 0.05 * (n - 1)
            else:
                first = 0.2 + 0.01 * i
                elapsed = 0.2 + 0.01 * (len(prompts) - 1) + 0.08 * (n - 1)
            out.append(Completion(p, [7] * n, "", "length", first, elapsed))
        return out


def test_speed_probe_rates_come_from_the_runs_own_timings():
    engine = ScriptedEngine()
    speed = speed_probe(engine, [[1, 2, 3, 4], [5, 6, 7, 8]], new_tokens=5, repeats=2)
    assert speed["prefill_tokens_per_s"] == pytest.approx(8 / 0.2)
    assert speed["time_to_first_token_s"] == pytest.approx(0.1)
    assert speed["decode_tokens_per_s_batch1"] == pytest.approx(8 / 0.4)
    # Eight rows decode 4 tokens each in the 4 steps after the last row's first token.
    assert speed["decode_tokens_per_s_batch8"] == pytest.approx(32 / (4 * 0.08))
    assert all(eos == set() for eos in engine.eos_while_generating)  # every row decodes n
    assert engine.eos_token_ids == {0}
