import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatdistill.distill.train import train
from chatdistill.errors import UserError

from conftest import build_tiny_model, make_conversations, write_jsonl
from conftest import distill_cfg as _cfg


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_distilled_student_loads_with_transformers_and_chats(
    tmp_path, tiny_models, chat_file, arch
):
    out = train(_cfg(tmp_path / "out", tiny_models[arch], chat_file, **{"loss.kind": "jsd"}))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 if arch != "gpt2" else model.config.n_layer == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "How much is the lamp?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert model.generate(**prompt, max_new_tokens=3).shape[1] > prompt["input_ids"].shape[1]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r and "padding_fraction" in r for r in lines)
    assert any(r.get("split") == "val" and "val_kd" in r for r in lines)
    assert (out / "chatdistill_config.yaml").is_file()


def test_a_real_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_models, chat_file):
    """SIGINT (what Ctrl-C sends) to a real `chatdistill distill` process, wherever it lands after
    the first checkpoint; the run saves, exits 130, and `--resume` ends on the same weights."""
    steps = 120  # far more than can run between the first checkpoint and the signal
    flags = [
        "distill", "--teacher", str(tiny_models["llama"]), "--student-num-layers", "2",
        "--data", str(chat_file), "--max-steps", str(steps), "--set", "train.batch_size=4",
        "--set", "train.eval_every=0", "--set", "train.save_every=1", "--set", "train.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "chatdistill.cli"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*cli, *flags, "--output", str(cut)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((cut / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert out.count("interrupted") == 1 and "rerun with --resume to continue" in out, out
    assert not (cut / "model.safetensors").exists()
    resumed = subprocess.run([*cli, *flags, "--output", str(cut), "--resume"], env=env)
    full = subprocess.run([*cli, *flags, "--output", str(tmp_path / "full")], env=env)
    assert resumed.returncode == 0 and full.returncode == 0
    a, b = _weights(tmp_path / "full"), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_gradient_accumulation_gives_the_same_step(tmp_path, tiny_models):
    rows = make_conversations(10, seed=3)
    data = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    val = write_jsonl(tmp_path / "val.jsonl", rows[8:])
    common = {"train.max_steps": 1, "data.validation": str(val), "train.save_every": 0}
    one = train(
        _cfg(tmp_path / "one", tiny_models["llama"], data, **common, **{"train.batch_size": 8})
    )
    acc = _cfg(tmp_path / "acc", tiny_models["llama"], data, **common, **{"train.grad_accum": 2})
    two = train(acc)
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sft_trains_a_fresh_model_without_a_teacher(
    tmp_path, tiny_models, tokenizer_dir, chat_file
):
    cfg = _cfg(
        tmp_path / "sft",
        None,
        chat_file,
        student_num_layers=None,
        student_config=str(tiny_models["qwen2"] / "config.json"),
        tokenizer=str(tokenizer_dir),
        **{"loss.kind": "sft", "train.max_steps": 6, "train.lr": 3e-3, "train.log_every": 1},
    )
    out = train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]
    assert all("kd" not in r for r in lines)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_embeddings_stay_the_teachers(tmp_path, tiny_models, chat_file, arch):
    """train.freeze_embeddings: the cut student's token embeddings (and the head tied to them in
    the tiny gpt2) end as the teacher's, while its layers learn."""
    cfg = _cfg(tmp_path / "out", tiny_models[arch], chat_file,
               **{"train.freeze_embeddings": True, "train.lr": 1e-2})  # fmt: skip
    student = _weights(train(cfg))
    teacher = _weights(tiny_models[arch])
    embed = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
    assert torch.equal(student[embed], teacher[embed])
    changed = [k for k in student if k != embed and not torch.equal(student[k], teacher[k])]
    assert changed


def test_existing_checkpoints_need_resume(tmp_path, tiny_models, chat_file):
    cfg = _cfg(tmp_path / "o", tiny_models["llama"], chat_file, **{"train.max_steps": 2})
    train(cfg)
    with pytest.raises(UserError, match="--resume"):
        train(cfg)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, tiny_models, tokenizer_dir, chat_file
):
    bad = build_tiny_model(tmp_path / "bad", tokenizer_dir, "llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    cfg = _cfg(tmp_path / "o", tiny_models["llama"], chat_file, student_num_layers=None)
    cfg.student = str(bad)
    with pytest.raises(UserError, match="loss is nan at step 1; stopped"):
        train(cfg)
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_right_padded_batches_need_no_attention_mask(tiny_models, arch):
    """Under causal attention the padding on the right is never seen by a real token: the hidden
    states at real positions are the same with and without the mask, so none is passed."""
    from chatdistill.distill.positions import forward_mask
    from chatdistill.models import hidden_and_head

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    base, _ = hidden_and_head(model)
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 10:] = 0
    assert forward_mask(mask) is None
    left = mask.flip(-1)
    assert forward_mask(left) is left
    with torch.no_grad():
        masked = base(input_ids=ids, attention_mask=mask).last_hidden_state
        free = base(input_ids=ids, attention_mask=None).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(free[real], masked[real])
    assert not torch.allclose(free[~real], masked[~real])  # only padding positions differ


def test_a_bf16_teacher_trains_the_same_student_closely(tmp_path, tiny_models, chat_file):
    fp32 = train(_cfg(tmp_path / "fp32", tiny_models["llama"], chat_file))
    bf16 = train(
        _cfg(
            tmp_path / "bf16",
            tiny_models["llama"],
            chat_file,
            **{"train.teacher_precision": "bf16"},
        )
    )
    a, b = _weights(fp32), _weights(bf16)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the teacher's precision did change
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.05, atol=2e-3, msg=k)


def test_a_finished_run_says_how_much_its_checkpoints_keep(
    tmp_path, tiny_models, chat_file, capsys
):
    train(_cfg(tmp_path / "out", tiny_models["llama"], chat_file))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{tmp_path / 'out' / 'checkpoints'} keeps ") and "rm -r" in line
