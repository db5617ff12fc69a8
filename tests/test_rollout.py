import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from chatdistill.cli import main
from chatdistill.config import load_distill_config
from chatdistill.data import IGNORE
from chatdistill.distill import train as train_mod
from chatdistill.distill.prepare import prepare
from chatdistill.distill.rollout import end_of_turn_id, is_on_policy_step
from chatdistill.distill.train import on_policy_sampler, train

from conftest import make_conversations, write_jsonl


def _cfg(out, teacher, data, **over):
    base = {
        "teacher": str(teacher),
        "student_num_layers": 2,
        "data.train": str(data),
        "output": str(out),
        "loss.kind": "jsd",
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "train.save_every": 2,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "on_policy.fraction": 0.5,
        "on_policy.max_new_tokens": 8,
    }
    base.update(over)
    return load_distill_config(None, {k: v for k, v in base.items() if v is not None})


def _prompt_rows(n=12):
    rows = make_conversations(n, seed=4)
    return [{"messages": r["messages"][:-1], "id": i} for i, r in enumerate(rows)]


def _log(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "split" not in r]


def test_on_policy_steps_are_seeded_per_step_and_follow_the_fraction():
    picks = [is_on_policy_step(0.3, 7, step) for step in range(2000)]
    assert picks == [is_on_policy_step(0.3, 7, step) for step in range(2000)]
    assert 0.25 < sum(picks) / len(picks) < 0.35
    assert picks != [is_on_policy_step(0.3, 8, step) for step in range(2000)]
    assert not any(is_on_policy_step(0.0, 7, s) for s in range(100))
    assert all(is_on_policy_step(1.0, 7, s) for s in range(100))


def test_on_policy_samples_carry_loss_on_sampled_tokens_and_the_end_of_turn(
    tmp_path, tiny_models, chat_file
):
    cfg = _cfg(tmp_path, tiny_models["llama"], chat_file, **{"on_policy.max_new_tokens": 6})
    s = prepare(cfg, Accelerator(cpu=True))
    sampler = on_policy_sampler(s)
    eot = end_of_turn_id(s.tokenizer)
    assert s.tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    (examples, batch), second = sampler.micro_batches(3, 0, 1, 2)
    assert batch["input_ids"].shape[0] == 4 and len(second[0]) == 4
    for ex in examples:
        prompt_len = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
        prompt = s.tokenizer.decode(ex.input_ids[:prompt_len])
        assert prompt.endswith("<|im_start|>assistant\n")
        answer = ex.labels[prompt_len:]
        assert answer == ex.input_ids[prompt_len:] and 1 <= len(answer) <= 7
        assert eot not in answer[:-1]  # only a generated end-of-turn, and only last
    again, _ = sampler.micro_batches(3, 0, 1, 2)
    assert [e.input_ids for e in again[0]] == [e.input_ids for e in examples]
    other = sampler.micro_batches(4, 0, 1, 1)[0][0]
    assert [e.input_ids for e in other] != [e.input_ids for e in examples]


def test_processes_draw_different_prompts_for_the_same_step(tmp_path, tiny_models, chat_file):
    s = prepare(_cfg(tmp_path, tiny_models["llama"], chat_file), Accelerator(cpu=True))
    sampler = on_policy_sampler(s)
    rank0 = sampler.micro_batches(0, 0, 2, 1)[0][0]
    rank1 = sampler.micro_batches(0, 1, 2, 1)[0][0]
    assert [e.input_ids for e in rank0] != [e.input_ids for e in rank1]


@pytest.mark.slow
def test_interrupted_on_policy_run_resumed_equals_uninterrupted(
    tmp_path, tiny_models, chat_file, monkeypatch
):
    over = {"train.max_steps": 6}
    full = train(_cfg(tmp_path / "full", tiny_models["llama"], chat_file, **over))
    kinds = [r["on_policy"] for r in _log(full)]
    assert True in kinds and False in kinds
    real_update = train_mod.TrainProgress.update

    def ctrl_c_at_step_3(self, record):
        real_update(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path / "cut", tiny_models["llama"], chat_file, **over)
    monkeypatch.setattr(train_mod.TrainProgress, "update", ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod.TrainProgress, "update", real_update)
    train(cfg, resume=True)
    a, b = (
        load_file(str(full / "model.safetensors")),
        load_file(str(cfg.output + "/model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_prompt_only_data_trains_fully_on_policy(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows())
    over = {"on_policy.fraction": 1.0, "train.max_steps": 2, "train.save_every": 0}
    # ce_weight applies to reference answers only: on the student's own samples the loss is the
    # divergence alone.
    over["loss.ce_weight"] = 0.7
    out = train(_cfg(tmp_path / "out", tiny_models["qwen2"], data, **over))
    log = _log(out)
    assert all(r["on_policy"] for r in log) and all(r["kd"] > 0 for r in log)
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in log)
    assert (out / "model.safetensors").is_file()


def _distill_error(capsys, args):
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_prompt_only_rows_are_refused_off_policy_naming_on_policy(tmp_path, tiny_models, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows())
    args = ["--teacher", str(tiny_models["llama"]), "--student-num-layers", "2", "--data"]
    err = _distill_error(capsys, [*args, str(data), "--output", str(tmp_path / "o")])
    assert "no assistant answer" in err and "--on-policy-fraction" in err


def test_on_policy_data_without_usable_prompts_is_refused(tmp_path, tiny_models, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows())
    args = ["--teacher", str(tiny_models["llama"]), "--student-num-layers", "2", "--data"]
    args += [str(data), "--output", str(tmp_path / "o"), "--on-policy-fraction", "1"]
    err = _distill_error(capsys, [*args, "--set", "data.max_length=8"])
    assert "no prompt" in err and "data.max_length" in err


def test_on_policy_with_sft_is_refused(tmp_path, tiny_models, chat_file, capsys):
    args = ["--student-config", str(tiny_models["llama"]), "--loss", "sft", "--data"]
    args += [str(chat_file), "--output", str(tmp_path / "o"), "--on-policy-fraction", "0.5"]
    assert "--on-policy-fraction" in _distill_error(capsys, args)
