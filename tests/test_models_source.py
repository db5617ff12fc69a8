"""The one model loader: what a model argument names, and one-line errors for bad ones."""

import json
import shutil

import numpy as np
import pytest
import torch

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine
from chatdistill.models import load_model, load_tokenizer, resolve
from chatdistill.models.gguf import cache_root


def test_a_model_directory_resolves_to_itself(tiny_models):
    src = resolve(str(tiny_models["llama"]))
    assert (src.kind, src.path) == ("hf", str(tiny_models["llama"]))
    assert src.record() == {"path": str(tiny_models["llama"]), "format": "hf"}


def test_a_missing_path_shaped_like_a_hub_id_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such file or directory; to download runs/typo .*hf:"):
        resolve("runs/typo", "teacher")


def test_a_hub_id_is_used_only_when_asked_with_the_prefix():
    src = resolve("hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (src.kind, src.path) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(UserError, match="hf:org/name"):
        resolve("hf:not-a-hub-id")


def test_a_directory_without_config_or_gguf_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no config.json or .gguf file there"):
        Engine.load(str(tmp_path))


def test_another_kind_of_file_is_refused(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="expected a model directory or a .gguf file"):
        resolve(str(f))


def test_a_directory_with_two_gguf_files_names_them(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); pass one file"):
        resolve(str(tmp_path))


def test_pickled_weights_are_refused(tiny_models, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], d)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle .*safetensors only"):
        load_model(str(d))


def test_corrupt_safetensors_is_a_one_line_error(tiny_models, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_models["llama"], d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(str(d), "teacher")


def test_remote_code_is_never_run(tiny_models, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    model = load_model(str(d))  # the architecture is known: the remote class is ignored
    assert type(model).__name__ == "LlamaForCausalLM"


def test_the_tokenizer_always_has_a_pad_token(tiny_models):
    tok = load_tokenizer(str(tiny_models["qwen2"]))
    assert tok.pad_token is not None


def _write_gguf(path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_truncated_gguf_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATDISTILL_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "good.gguf"
    _write_gguf(good, "llama")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF file"):
        resolve(str(bad), "teacher")
    assert not cache_root().exists()


def test_an_architecture_transformers_cannot_read_names_it_and_leaves_no_cache(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("CHATDISTILL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "odd.gguf"
    _write_gguf(f, "notanarch")
    with pytest.raises(UserError, match="transformers cannot read this GGUF \\(notanarch"):
        resolve(str(f), "teacher")
    assert list(cache_root().iterdir()) == []


def test_a_model_that_is_custom_code_is_refused_without_running_it(tiny_models, tmp_path):
    d = tmp_path / "custom"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "evilarch"
    cfg["auto_map"] = {"AutoConfig": "conf.EvilConfig", "AutoModelForCausalLM": "mod.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "conf.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match=r"\(evilarch\) is custom code .* never runs"):
        load_model(str(d), "teacher")
