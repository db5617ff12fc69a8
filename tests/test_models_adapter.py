"""A base model plus a peft LoRA adapter loads as one merged model, or fails in one line."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine
from chatdistill.models import load_model, resolve

from conftest import build_tiny_model


def _adapter(base_dir, out):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_models, tmp_path_factory):
    return _adapter(tiny_models["llama"], tmp_path_factory.mktemp("adapters") / "lora")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_base_plus_adapter_is_the_merged_model(tiny_models, adapter_dir):
    ids = [5, 9, 14, 3, 7]
    src = resolve(str(tiny_models["llama"]), adapter=str(adapter_dir))
    merged = load_model(src)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert torch.allclose(_logits(merged.eval(), ids), _logits(reference, ids), atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    assert not torch.allclose(_logits(merged, ids), _logits(plain, ids), atol=1e-3)
    assert src.record()["adapter"] == str(adapter_dir)


def test_an_adapter_directory_alone_finds_its_base(tiny_models, adapter_dir, tmp_path):
    d = tmp_path / "alone"
    shutil.copytree(adapter_dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_models["llama"])
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    engine = Engine.load(str(d), device="cpu")
    assert engine.source.adapter == str(d) and engine.source.path == str(tiny_models["llama"])


def test_an_adapter_whose_base_is_not_here_says_how_to_pass_it(adapter_dir, tmp_path):
    d = tmp_path / "orphan"
    shutil.copytree(adapter_dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "SomeOrg/missing-model"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="base model SomeOrg/missing-model is not on this machine"):
        resolve(str(d), "teacher")


def test_a_missing_adapter_is_one_line(tiny_models, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json there"):
        resolve(str(tiny_models["llama"]), "teacher", adapter=str(tmp_path))


def test_an_adapter_for_another_model_is_one_line(tokenizer_dir, adapter_dir, tmp_path):
    other = build_tiny_model(tmp_path / "wide", tokenizer_dir, "llama", hidden_size=96)
    with pytest.raises(UserError, match="does not fit the model"):
        load_model(resolve(str(other), "teacher", adapter=str(adapter_dir)), "teacher")


def test_distill_takes_a_teacher_adapter_and_records_it(
    tiny_models, adapter_dir, chat_file, tmp_path, capsys
):
    from chatdistill.cli import main

    out = tmp_path / "student"
    code = main(
        ["distill", "--teacher", str(tiny_models["llama"]), "--teacher-adapter", str(adapter_dir),
         "--student-num-layers", "2", "--data", str(chat_file), "--output", str(out),
         "--max-steps", "1", "--set", "train.eval_every=0", "--set", "train.save_every=0"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recipe = (out / "chatdistill_config.yaml").read_text()
    assert f"teacher adapter: {adapter_dir}" in recipe and "teacher_adapter:" in recipe
