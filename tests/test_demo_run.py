"""`chatdistill demo` end to end on a slice of the bundled data with a tiny teacher (the real
teacher's stages are the same code; tests/test_real_model.py loads the shipped adapter)."""

import dataclasses
import json
import shlex
import shutil

import pytest

from chatdistill.cli import main
from chatdistill.demo.data import demo_asset_dir
from chatdistill.demo.run import DemoConfig, mix_rows, run_demo
from chatdistill.demo.stages import _Beside
from chatdistill.errors import UserError

from conftest import build_tiny_model


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_teacher")
    return build_tiny_model(out, demo_asset_dir() / "tokenizer", "llama")


@pytest.mark.parametrize("flag", ["--steps", "--eval-samples", "--prompts", "--student-layers"])
def test_demo_counts_below_one_are_one_line_errors(tmp_path, capsys, flag):
    assert main(["demo", "--output", str(tmp_path), flag, "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} 0: must be at least 1"


@pytest.mark.slow
def test_demo_runs_every_stage_then_reuses_them(tmp_path, tiny_teacher):
    cfg = DemoConfig(
        output=str(tmp_path / "demo"), teacher=str(tiny_teacher), prompts=60, steps=3,
        batch_size=8, eval_samples=6, labelled_fraction=0.2, student_layers=1,
    )  # fmt: skip
    lines: list[str] = []
    results = run_demo(cfg, say=lines.append)
    out = tmp_path / "demo"
    names = [m.role for m in results.models]
    assert names.count("teacher") == 1 and names.count("student") == 3
    for d in ("kd_student", "baseline_cut_untrained", "baseline_sft_labelled"):
        assert (out / d / "model.safetensors").is_file()
    # Support prompts carry the shop's notes; the untrained cut is where both students start.
    prompts = [json.loads(x) for x in (out / "data" / "prompts.jsonl").read_text().splitlines()]
    support = [p for p in prompts if p["source"] == "support"]
    assert len(prompts) == 60 and len(support) == 42  # the demo's 70% support share
    assert all("using only these notes" in p["messages"][0]["content"] for p in support)
    assert results.models[2].cost.parameters < results.models[0].cost.parameters
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    labelled = (out / "data" / "labelled.jsonl").read_text().splitlines()
    assert len(labelled) == 12
    assert any("chatdistill serve" in line for line in lines)
    # On 2 threads the two trainings ran at once, (b) in a child process with its own log.
    beside = "[baseline_sft_labelled] training beside kd_student, on 1 thread"
    assert any(beside in line for line in lines), lines
    assert "step 3/3" in (out / "baseline_sft_labelled.log").read_text()
    table = next(line for line in lines if "held-out CE" in line).strip().splitlines()
    assert [row.split()[0] for row in table[3:6]] == [
        "kd_student", "baseline_cut_untrained", "baseline_sft_labelled"
    ]  # fmt: skip
    assert "agree %" in table[0] and "KL" in table[0]
    # The baselines have the student's shape: its speed and memory, measured once.
    assert "baseline_sft_labelled: speed and memory measured on kd_student" in "\n".join(lines)
    assert json.loads((out / "results.json").read_text())["settings"]["fidelity_on"] == "teacher"
    assert any("evaluating student kd_student" in line for line in lines)
    printed = "\n".join(lines).splitlines()
    for marker, folder in (
        ("chatdistill export", "kd_student_onnx"),
        ("--format gguf", "kd_student_gguf"),
    ):
        # Each printed export command works as printed (ONNX int4, GGUF q8_0, and the check).
        command = next(x for x in printed if marker in x).split("  ", 1)[1]
        argv = [*shlex.split(command)[1:], "--check-chats", "3", "--check-tokens", "8"]
        assert main(argv) == 0
        check = json.loads((out / folder / "export_check.json").read_text())
        assert check["chats"] == 3 and check["export_bytes"] < check["model_bytes"]
    kd_cfg = (out / "kd_student" / "chatdistill_config.yaml").read_text()
    assert "teacher_cache" in kd_cfg and "ce_weight: 0.5" in kd_cfg and "temperature: 1.0" in kd_cfg

    before = json.loads((out / "results.json").read_text())
    lines.clear()
    run_demo(cfg, say=lines.append)
    # The cut, both trainings and the evaluation: nothing is made again.
    assert sum("reusing" in line for line in lines) == 4
    assert not any("evaluating" in line for line in lines)
    after = json.loads((out / "results.json").read_text())
    assert after == before

    # Moved elsewhere, it is the same run: reused, with its recipes naming the new place.
    moved = tmp_path / "elsewhere" / "demo"
    shutil.move(out, moved)
    lines.clear()
    run_demo(dataclasses.replace(cfg, output=str(moved)), say=lines.append)
    assert sum("reusing" in line for line in lines) == 4, lines
    assert not any("changed since" in line for line in lines)
    assert str(moved / "data") in (moved / "kd_student" / "chatdistill_config.yaml").read_text()
    shutil.move(moved, out)

    # Other settings: the trained students are trained again, not reused.
    lines.clear()
    run_demo(dataclasses.replace(cfg, steps=4), say=lines.append)
    assert sum("changed since the last run" in line for line in lines) == 2
    assert any("evaluating student kd_student" in line for line in lines)  # new models: measured
    assert "max_steps: 4" in (out / "kd_student" / "chatdistill_config.yaml").read_text()


def test_prompt_mix_keeps_the_split_order_and_its_share():
    rows = [{"source": "support" if i % 3 else "chat", "i": i} for i in range(30)]
    picked = mix_rows(rows, 10, 0.7)
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    assert sum(r["source"] == "support" for r in picked) == 7 and len(picked) == 10
    assert len(mix_rows(rows, 40, 0.5)) == 30  # fewer where a kind runs out


def test_bad_support_share_is_one_line(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--support-share", "2"]) == 2
    assert "support share 2.0 is outside [0, 1]" in capsys.readouterr().err


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="none"):
        run_demo(DemoConfig(output=str(tmp_path), teacher=str(tmp_path / "none")))


def test_bad_labelled_fraction(tmp_path, tiny_teacher):
    with pytest.raises(UserError, match="outside"):
        run_demo(DemoConfig(output=str(tmp_path), teacher=str(tiny_teacher), labelled_fraction=0))


@pytest.mark.slow
def test_interrupted_demo_continues_on_rerun(tmp_path, tiny_teacher, monkeypatch, capsys):
    import chatdistill.distill.train as train_mod

    real_update = train_mod.TrainProgress.update

    def ctrl_c_at_step_2(self, record):
        real_update(self, record)
        if record["step"] == 2:
            raise KeyboardInterrupt

    cfg = DemoConfig(
        output=str(tmp_path / "demo"), teacher=str(tiny_teacher), prompts=40, steps=3,
        batch_size=8, eval_samples=4, labelled_fraction=0.2, student_layers=1,
    )  # fmt: skip
    lines: list[str] = []
    monkeypatch.setattr(train_mod.TrainProgress, "update", ctrl_c_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_demo(cfg, say=lines.append)
    assert "[interrupted] rerun the same command to continue" in lines[-1]
    said = capsys.readouterr().out
    assert "interrupted: checkpoint saved to" in said and "--resume" not in said  # the demo's way
    kd = tmp_path / "demo" / "kd_student"
    assert (kd / "checkpoints" / "step-0000002").is_dir() and not _done_files(kd)

    # Moved before the rerun: the interrupted training still resumes, nothing is redone.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "demo", moved)
    cfg = dataclasses.replace(cfg, output=str(moved))
    kd = moved / "kd_student"
    monkeypatch.setattr(train_mod.TrainProgress, "update", real_update)
    capsys.readouterr()
    lines.clear()
    results = run_demo(cfg, say=lines.append)
    assert "resumed from" in capsys.readouterr().out and _done_files(kd)
    assert not any("changed since" in line for line in lines)
    steps = [json.loads(x)["step"] for x in (kd / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert len(results.models) == 4


def _done_files(model_dir):
    return (model_dir / "model.safetensors").is_file() and (
        model_dir / "train_summary.json"
    ).is_file()


def test_missing_bundled_adapter_is_a_clear_error(tmp_path, monkeypatch):
    import chatdistill.demo.run as demo_run

    assets = tmp_path / "assets"
    shutil.copytree(demo_asset_dir(), assets, ignore=shutil.ignore_patterns("teacher_adapter"))
    monkeypatch.setattr(demo_run, "demo_asset_dir", lambda: assets)
    with pytest.raises(UserError, match="bundled teacher adapter missing: .*teacher_adapter"):
        run_demo(DemoConfig(output=str(tmp_path / "out")))


def test_a_failed_training_beside_is_one_line_naming_its_log(tmp_path):
    missing = tmp_path / "no_teacher"
    overrides = {"teacher": str(missing), "train.max_steps": 3}
    child = _Beside("bad", tmp_path, overrides, key={}, threads=1)
    with pytest.raises(UserError) as e:
        child.wait_done(say=lambda _msg: None)
    msg = str(e.value)
    assert msg.startswith("[bad] training failed (exit 2): error: ") and "\n" not in msg
    assert str(missing) in msg and msg.endswith(f"its log: {tmp_path / 'bad.log'}")
