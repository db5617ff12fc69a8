"""Export to GGUF: tiny Llama and Qwen2 models written for llama.cpp and read back by
transformers' GGUF loader (an implementation independent of the writer)."""

import errno
import json

import gguf
import jinja2
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatdistill.cli import main
from chatdistill.data import split_prompt_reference
from chatdistill.demo.data import load_demo_split
from chatdistill.errors import UserError
from chatdistill.export.gguf import GGUF_NAME, check_gguf, export_gguf, rope_permute
from chatdistill.export.modelfile import go_template

from conftest import SHOP_CHATS as CHATS
from conftest import TOY_TEACHER, build_tiny_model, make_conversations, write_jsonl


@pytest.fixture(scope="module")
def half_models(tmp_path_factory, tokenizer_dir):
    """Tiny models whose weights are float16 values (as a student saved in half precision), so
    an f16 export loses nothing and must answer exactly like the model. The Llama ties its
    output layer to the embedding (the file then has no output.weight); the Qwen2 does not."""
    root = tmp_path_factory.mktemp("gguf_models")
    models = {}
    for arch, extra in (("llama", {"tie_word_embeddings": True}), ("qwen2", {})):
        path = build_tiny_model(root / arch, tokenizer_dir, arch, initializer_range=0.4, **extra)
        AutoModelForCausalLM.from_pretrained(path).half().save_pretrained(path)
        models[arch] = path
    return models


def read(out):
    return gguf.GGUFReader(out / GGUF_NAME)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_export_answers_exactly_like_the_model(half_models, tmp_path, arch):
    out = export_gguf(half_models[arch], tmp_path / "gguf", precision="f16")
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile", "chatdistill_export.json", GGUF_NAME
    ]  # fmt: skip
    info = json.loads((out / "chatdistill_export.json").read_text())
    assert info["format"] == "gguf" and info["precision"] == "f16"
    c = check_gguf(half_models[arch], out, CHATS, max_new_tokens=24)
    assert c.chats == 3 and c.compared_tokens > 0
    assert c.identical_answers == 3, c.first_difference
    assert c.token_agreement == 1.0
    assert c.export_tokens_per_s is None  # the reader dequantises: not llama.cpp's speed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_export_is_smaller_and_agrees_closely(half_models, tmp_path, arch):
    out = export_gguf(half_models[arch], tmp_path / "gguf", precision="q8_0")
    c = check_gguf(half_models[arch], out, CHATS, max_new_tokens=24)
    assert c.export_bytes < 0.7 * c.model_bytes  # 8.5 bits a weight against 16
    # An untrained net's logits are nearly flat, so rounding flips some choices; a wrong layout
    # agrees by chance only (about 1 in 400 here).
    assert c.token_agreement >= 0.7, c.first_difference


def test_a_trained_model_keeps_its_answers_at_8_and_4_bits(tmp_path):
    teacher = TOY_TEACHER  # trained on the demo data, 7M parameters
    rows = load_demo_split("test")[:4]
    chats = [split_prompt_reference(r["messages"])[0] for r in rows]
    q8 = check_gguf(teacher, export_gguf(teacher, tmp_path / "q8", "q8_0"), chats, 32)
    q4 = check_gguf(teacher, export_gguf(teacher, tmp_path / "q4", "q4_0"), chats, 32)
    assert q8.token_agreement >= 0.95 and q4.token_agreement >= 0.85
    assert q4.export_bytes < q8.export_bytes < 0.3 * q8.model_bytes  # float32 model


def test_llama_layout_is_what_llama_cpp_reads(half_models, tmp_path):
    out = export_gguf(half_models["llama"], tmp_path / "gguf", precision="q8_0")
    r = read(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (f["llama.block_count"], f["llama.embedding_length"]) == (4, 64)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.context_length"] == 512
    types = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.3.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 2 + 4 * 9


def test_qwen2_layout_keeps_biases_and_its_own_output(half_models, tmp_path):
    out = export_gguf(half_models["qwen2"], tmp_path / "gguf", precision="q8_0")
    r = read(out)
    assert r.fields["general.architecture"].contents() == "qwen2"
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    for name in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
        assert types[f"blk.2.{name}"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 3 + 4 * 12


def test_rope_permute_interleaves_each_heads_halves():
    # one head of dimension 4: rows (a0, a1, b0, b1) rotate as pairs (a0, b0), (a1, b1)
    w = np.array([[0.0], [1.0], [2.0], [3.0]] * 2)
    assert rope_permute(w, n_head=2)[:, 0].tolist() == [0, 2, 1, 3, 0, 2, 1, 3]


def test_llama_query_and_key_rows_are_permuted_for_llama_cpp(half_models, tmp_path):
    out = export_gguf(half_models["llama"], tmp_path / "gguf", precision="f16")
    hf = AutoModelForCausalLM.from_pretrained(half_models["llama"]).model.layers[1].self_attn
    tensors = {t.name: t for t in read(out).tensors}

    def stored(name):  # GGUF lists dimensions innermost first
        t = tensors[name]
        return np.asarray(t.data, dtype=np.float32).reshape(t.shape[::-1])

    q, k = hf.q_proj.weight.detach().numpy(), hf.k_proj.weight.detach().numpy()
    assert np.array_equal(stored("blk.1.attn_q.weight"), rope_permute(q, 4))
    assert np.array_equal(stored("blk.1.attn_k.weight"), rope_permute(k, 2))
    assert not np.array_equal(stored("blk.1.attn_q.weight"), q)
    assert np.array_equal(stored("blk.1.attn_v.weight"), hf.v_proj.weight.detach().numpy())


def test_q4_0_keeps_the_output_layer_at_8_bits(half_models, tmp_path):
    q8 = export_gguf(half_models["qwen2"], tmp_path / "q8", precision="q8_0")
    q4 = export_gguf(half_models["qwen2"], tmp_path / "q4", precision="q4_0")
    r = read(q4)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert (q4 / GGUF_NAME).stat().st_size < (q8 / GGUF_NAME).stat().st_size
    c = check_gguf(half_models["qwen2"], q4, CHATS[:1], max_new_tokens=8)
    assert c.compared_tokens > 0 and 0.0 <= c.token_agreement <= 1.0


@pytest.mark.parametrize(("arch", "pre"), [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_tokenizer_and_chat_template_survive(half_models, tmp_path, arch, pre):
    out = export_gguf(half_models[arch], tmp_path / "gguf", precision="q8_0")
    r = read(out)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    # transformers gives a qwen2 model the Qwen2 split (digits one by one) over tokenizer.json's
    assert r.fields["tokenizer.ggml.pre"].contents() == pre
    original = AutoTokenizer.from_pretrained(half_models[arch])
    back = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_NAME)
    assert back.chat_template == original.chat_template
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
        original.bos_token_id, original.eos_token_id, original.pad_token_id
    )  # fmt: skip
    for text in ["How much is the kettle?", "  two  spaces, 42 euros!\nnew line", "<|im_end|>x"]:
        assert back(text)["input_ids"] == original(text)["input_ids"], text
    for chat in CHATS:
        assert back.apply_chat_template(chat, add_generation_prompt=True) == (
            original.apply_chat_template(chat, add_generation_prompt=True)
        )


def test_modelfile_renders_the_chat_like_the_template(half_models, tokenizer_dir, tmp_path):
    out = export_gguf(half_models["llama"], tmp_path / "gguf", precision="q8_0")
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{GGUF_NAME}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 512" in text
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # The Go template's few constructs, spelled in Jinja, must render what the model sees.
    as_jinja = (
        go.replace("{{ range .Messages }}", "{% for m in messages %}")
        .replace("{{ .Role }}", "{{ m.role }}")
        .replace("{{ .Content }}", "{{ m.content }}")
        .replace("{{ end }}", "{% endfor %}")
    )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    render = jinja2.Environment(keep_trailing_newline=True).from_string(as_jinja).render
    for chat in CHATS:
        expected = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert render(messages=chat) == expected


def test_a_template_with_a_default_system_prompt_is_left_to_ollama(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    default_system = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}"
        "{% endif %}" + tok.chat_template
    )
    assert go_template(tok, default_system) is None
    assert go_template(tok, tok.chat_template).startswith("{{ range .Messages }}<|im_start|>")


def test_cli_exports_checks_and_writes_the_report(half_models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_conversations(4, seed=3))
    out = tmp_path / "cli"
    code = main(
        [
            "export", str(half_models["qwen2"]), "--output", str(out), "--format", "gguf",
            "--precision", "f16", "--prompts", str(prompts), "--check-chats", "2",
            "--check-tokens", "8",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "export_check.json").read_text())
    assert report["chats"] == 2 and report["identical_answers"] == 2
    printed = capsys.readouterr().out
    assert "(GGUF, f16" in printed and "2/2 identical answers" in printed and "MB" in printed


def test_the_check_tells_a_different_model_apart(half_models, tokenizer_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", tokenizer_dir, "qwen2", seed=1)
    out = export_gguf(half_models["qwen2"], tmp_path / "gguf", precision="f16")
    c = check_gguf(other, out, CHATS, max_new_tokens=24)
    assert c.compared_tokens >= 3 * 8
    assert c.identical_answers < 3 and c.token_agreement < 0.5


def test_unsupported_architecture_is_one_line_and_leaves_nothing(tiny_models, tmp_path, capsys):
    out = tmp_path / "gpt2-gguf"
    code = main(["export", str(tiny_models["gpt2"]), "--output", str(out), "--format", "gguf"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "GPT2LMHeadModel cannot be exported to GGUF" in err
    assert list(tmp_path.iterdir()) == []


def test_a_setting_llama_cpp_cannot_express_is_named(half_models, tmp_path, capsys):
    model = tmp_path / "gelu"
    model.mkdir()
    for f in half_models["llama"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    code = main(["export", str(model), "--output", str(tmp_path / "o"), "--format", "gguf"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "hidden_act 'gelu'" in err


def test_an_unwritable_output_is_one_line_and_leaves_nothing(half_models, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(
        ["export", str(half_models["llama"]), "--output", str(blocker / "out"), "--format", "gguf"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot write there" in err and str(blocker) in err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_a_write_that_fails_half_way_leaves_nothing(half_models, tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(half_models["llama"], tmp_path / "out", precision="q8_0")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_clear_errors(half_models, tmp_path):
    model = half_models["llama"]
    with pytest.raises(UserError, match="choose one of f16, q8_0, q4_0"):
        export_gguf(model, tmp_path / "o", precision="int4")
    with pytest.raises(UserError, match="no such file or directory"):
        export_gguf(tmp_path / "missing", tmp_path / "o")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        export_gguf(model, taken)
    assert (taken / "x").read_text() == "keep me"
    with pytest.raises(UserError, match=f"no {GGUF_NAME}"):
        check_gguf(model, taken, CHATS)
    args = ["export", str(model), "--output", str(tmp_path / "o"), "--format", "gguf"]
    assert main([*args, "--device", "cuda"]) == 2
    assert not (tmp_path / "o").exists()
