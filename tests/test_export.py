"""Export to ONNX Runtime GenAI: the real builder and runtime on tiny Llama and Qwen2 models."""

import json

import pytest

from chatdistill.cli import main
from chatdistill.errors import UserError
from chatdistill.export.onnx import check_export, export_onnx

from conftest import SHOP_CHATS as CHATS
from conftest import build_tiny_model, make_conversations, write_jsonl


@pytest.fixture(scope="module")
def decisive_models(tmp_path_factory, tokenizer_dir):
    """Tiny models with a wide initialisation: their logits are far apart, so float32 rounding
    differences between runtimes cannot flip a greedy choice."""
    root = tmp_path_factory.mktemp("export_models")
    return {
        arch: build_tiny_model(root / arch, tokenizer_dir, arch, initializer_range=0.4)
        for arch in ("llama", "qwen2")
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_export_answers_exactly_like_the_model(decisive_models, tmp_path, arch):
    out = export_onnx(decisive_models[arch], tmp_path / "onnx", precision="fp32")
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert (out / "chat_template.jinja").is_file()
    info = json.loads((out / "chatdistill_export.json").read_text())
    assert info["precision"] == "fp32" and info["format"] == "onnxruntime-genai"
    c = check_export(decisive_models[arch], out, CHATS, max_new_tokens=24)
    assert c.chats == 3 and c.compared_tokens > 0
    assert c.identical_answers == 3, c.first_difference
    assert c.token_agreement == 1.0
    assert c.export_tokens_per_s > 0 and c.model_tokens_per_s > 0
    # the same float32 weights, plus the graph
    assert abs(c.export_bytes - c.model_bytes) < 0.2 * c.model_bytes


def test_int4_export_is_smaller_and_is_compared_token_by_token(decisive_models, tmp_path):
    model = decisive_models["llama"]
    out = export_onnx(model, tmp_path / "int4", precision="int4")
    c = check_export(model, out, CHATS, max_new_tokens=24)
    assert c.export_bytes < 0.5 * c.model_bytes
    assert 0.0 <= c.token_agreement <= 1.0 and c.compared_tokens > 0
    assert 0 <= c.identical_answers <= c.chats


def test_cli_exports_checks_and_writes_the_report(decisive_models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_conversations(4, seed=3))
    out = tmp_path / "cli"
    code = main(
        [
            "export", str(decisive_models["qwen2"]), "--output", str(out), "--precision", "fp32",
            "--prompts", str(prompts), "--check-chats", "2", "--check-tokens", "8",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "export_check.json").read_text())
    assert report["chats"] == 2 and report["identical_answers"] == 2
    assert "2/2 identical answers" in capsys.readouterr().out


def test_unsupported_architecture_is_one_line_and_leaves_nothing(tiny_models, tmp_path, capsys):
    out = tmp_path / "gpt2-onnx"
    code = main(["export", str(tiny_models["gpt2"]), "--output", str(out), "--no-check"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "GPT2LMHeadModel" in err and "not currently supported" in err
    assert not out.exists()
    # no partial folder left behind; the builder's log is kept for a bug report
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2-onnx.export.log"]
    assert "builder log: " in err


def test_bad_inputs_are_clear_errors(tiny_models, tmp_path):
    model = tiny_models["llama"]
    with pytest.raises(UserError, match="no such file or directory"):
        export_onnx(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(UserError, match="no config.json"):
        export_onnx(tmp_path, tmp_path / "o")
    with pytest.raises(UserError, match="not available on cpu"):
        export_onnx(model, tmp_path / "o", precision="fp16")
    with pytest.raises(UserError, match="choose one of cpu, cuda"):
        export_onnx(model, tmp_path / "o", device="tpu")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        export_onnx(model, taken)
    assert (taken / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="cannot load it"):
        check_export(model, taken, CHATS)
    assert main(["export", str(model), "--output", str(tmp_path / "o"), "--check-chats", "0"]) == 2


def test_the_check_tells_a_different_model_apart(decisive_models, tokenizer_dir, tmp_path):
    other = build_tiny_model(
        tmp_path / "other", tokenizer_dir, "llama", seed=1, initializer_range=0.4
    )
    out = export_onnx(decisive_models["llama"], tmp_path / "onnx", precision="fp32")
    c = check_export(other, out, CHATS, max_new_tokens=24)
    assert c.compared_tokens >= 3 * 8  # the answers are long enough to compare
    assert c.identical_answers < 3 and c.token_agreement < 0.5
    assert c.first_difference is not None and " | export: " in c.first_difference


def test_an_export_the_runtime_cannot_run_is_a_clear_error(tokenizer_dir, tmp_path, capsys):
    # 8-dimensional heads: the builder writes the graph, but ONNX Runtime GenAI's attention
    # kernel needs head sizes that are multiples of 16.
    model = build_tiny_model(tmp_path / "m", tokenizer_dir, "llama", num_attention_heads=8)
    out = tmp_path / "onnx"
    code = main(["export", str(model), "--output", str(out), "--precision", "fp32"])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "cannot run this export" in errors[0] and "multiple of 16" in errors[0]
