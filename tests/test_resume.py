"""What `distill` refuses to write into, and what `--resume` refuses to load or mix."""

import json
import shutil

import pytest
import torch
import yaml

from chatdistill.distill import train as train_mod
from chatdistill.distill.train import train
from chatdistill.errors import UserError

from conftest import distill_cfg as _cfg
from conftest import make_conversations, write_jsonl


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models, chat_file):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train(_cfg(out, tiny_models["llama"], chat_file))
    return out


@pytest.fixture()
def nothing_loaded(monkeypatch):
    """Fail the test if the run gets as far as loading models and data."""

    def prepare(*_):
        raise AssertionError("models were loaded before the output was checked")

    monkeypatch.setattr(train_mod, "prepare", prepare)


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_output_that_is_the_teacher_or_another_model_is_refused_before_loading(
    tmp_path, tiny_models, chat_file, nothing_loaded
):
    teacher = tiny_models["llama"]
    before = _files(teacher)
    with pytest.raises(UserError, match=f"--output {teacher} is the teacher itself"):
        train(_cfg(teacher, teacher, chat_file))
    other = shutil.copytree(tiny_models["qwen2"], tmp_path / "other")
    with pytest.raises(UserError, match=r"holds a model \(config.json, model.safetensors"):
        train(_cfg(other, teacher, chat_file))
    with pytest.raises(UserError, match=r"holds a model .*choose a new --output"):
        train(_cfg(other, teacher, chat_file), resume=True)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"--output {a_file} is a file"):
        train(_cfg(a_file, teacher, chat_file))
    assert _files(teacher) == before and a_file.read_text() == "x"


def test_resume_with_another_recipe_is_refused_naming_the_fields(
    tmp_path, finished, tiny_models, chat_file, nothing_loaded
):
    other_data = write_jsonl(tmp_path / "other.jsonl", make_conversations(20, seed=9))
    recipe = (finished / "chatdistill_config.yaml").read_bytes()
    changed = {
        "data.train": str(other_data),
        "loss.kind": "jsd",
        "train.seed": 1,
        "train.batch_size": 2,
        "train.save_every": 1,  # allowed: not named
    }
    with pytest.raises(UserError) as e:
        train(_cfg(finished, tiny_models["llama"], chat_file, **changed), resume=True)
    msg = str(e.value)
    assert msg.startswith(f"--resume: {finished} was trained with another recipe: ")
    for field in ("data.train", "loss.kind (", "train.seed (0 -> 1)", "train.batch_size (4 -> 2)"):
        assert field in msg
    assert "save_every (" not in msg
    assert (finished / "chatdistill_config.yaml").read_bytes() == recipe


def test_killed_run_resumes_with_more_steps_and_logs_each_step_once(
    tmp_path, tiny_models, chat_file, monkeypatch, capsys
):
    """A kill after step 3 (last checkpoint: step 2) left step 3 in metrics.jsonl and half-written
    temporary directories; the resume removes them, says so, and logs steps 3.. once."""
    out = tmp_path / "o"
    real_write = train_mod.MetricsLog.write

    def killed_after_step_3(self, record):
        real_write(self, record)
        if record["step"] == 3:
            raise SystemExit(9)  # not a KeyboardInterrupt: no checkpoint is saved

    over = {"train.log_every": 1}
    monkeypatch.setattr(train_mod.MetricsLog, "write", killed_after_step_3)
    with pytest.raises(SystemExit):
        train(_cfg(out, tiny_models["llama"], chat_file, **over))
    monkeypatch.setattr(train_mod.MetricsLog, "write", real_write)
    (out / "checkpoints" / ".tmp-step-0000003").mkdir()
    (out / ".final-tmp").mkdir()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a line cut by the kill
    capsys.readouterr()
    train(_cfg(out, tiny_models["llama"], chat_file, **over, **{"train.max_steps": 6}), True)
    said = capsys.readouterr().out
    assert "left half-written by an interrupted run" in said and ".tmp-step-0000003" in said
    assert not (out / "checkpoints" / ".tmp-step-0000003").exists()
    assert "changed on resume: train.max_steps 4 -> 6" in said
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    saved = (out / "chatdistill_config.yaml").read_text()
    assert yaml.safe_load(saved)["train"]["max_steps"] == 6
    assert "# resumed at step 2 with train.max_steps 4 -> 6" in saved


class _RunsCode:
    """Unpickling this creates a file: the proof that loading a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"]
)
def test_a_tampered_pickle_in_a_checkpoint_runs_no_code(
    tmp_path, finished, tiny_models, chat_file, name
):
    run = _copy(finished, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, run / "checkpoints" / "step-0000004" / name)
    with pytest.raises(UserError, match="step-0000004: .*delete .*step-0000004 to resume from"):
        train(_cfg(run, tiny_models["llama"], chat_file), resume=True)
    assert not marker.exists()


def test_unreadable_checkpoints_are_one_line_errors(tmp_path, finished, tiny_models, chat_file):
    run = _copy(finished, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    cfg = _cfg(run, tiny_models["llama"], chat_file)
    (last / "trainer_state.json").write_text("{garbage")
    with pytest.raises(UserError, match="trainer_state.json: not the JSON trainer state"):
        train(cfg, resume=True)
    (last / "trainer_state.json").write_text(json.dumps({"step": 4, "epoch": 0, "next_batch": 4}))
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"step-0000004: cannot be loaded \(.*\); delete") as e:
        train(cfg, resume=True)
    assert "\n" not in str(e.value)
