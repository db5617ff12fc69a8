"""`chatdistill distill` from the command line: help, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from chatdistill.cli import main
from chatdistill.distill.divergences import DIVERGENCES
from chatdistill.errors import unusable_output
from chatdistill.models.tokenizer import train_bpe_tokenizer

from conftest import build_tiny_model, write_jsonl


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_help_lists_subcommands_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--teacher", "--student", "--student-layers", "--data", "--loss", "--resume"):
        assert flag in out
    assert "{" + ",".join([*DIVERGENCES, "sft"]) + "}" in out  # the --loss choices


@pytest.fixture()
def base(tmp_path, tiny_models, chat_file):
    return [
        "distill",
        "--teacher",
        str(tiny_models["llama"]),
        "--student-num-layers",
        "2",
        "--data",
        str(chat_file),
        "--output",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
    ]


def _with(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def test_missing_data_file(capsys, base, tmp_path):
    code, err = _run(capsys, *_with(base, "--data", str(tmp_path / "nope.jsonl")))
    assert code == 2 and err == f"error: {tmp_path / 'nope.jsonl'}: data file not found"


def test_output_that_cannot_be_created_is_one_line(capsys, base, tmp_path, chat_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _run(capsys, *_with(base, "--output", str(blocker / "out")))
    assert code == 2 and err.startswith(f"error: --output {blocker / 'out'}: cannot write there")
    assert "\n" not in err
    # generate-data writes a sibling of its --output first; the same rule names it.
    gen = ["generate-data", "--teacher", base[2], "--prompts", str(chat_file),
           "--output", str(blocker / "answers.jsonl")]  # fmt: skip
    code, err = _run(capsys, *gen)
    assert code == 2 and f"--output {blocker / 'answers.jsonl'}: cannot write there" in err


def test_unusable_output_is_only_about_the_output(tmp_path):
    missing_input = FileNotFoundError(2, "No such file or directory", str(tmp_path / "in.jsonl"))
    assert unusable_output(missing_input, tmp_path / "out") is None
    inside = NotADirectoryError(20, "Not a directory", str(tmp_path / "out" / "data"))
    assert unusable_output(inside, tmp_path / "out") == f"Not a directory: {tmp_path}/out/data"
    assert unusable_output(inside, None) is None
    parent_is_a_file = FileExistsError(17, "File exists", str(tmp_path))
    assert unusable_output(parent_is_a_file, tmp_path / "out") == f"File exists: {tmp_path}"


def test_line_that_is_not_json(capsys, base, tmp_path, chat_rows):
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows[:3])
    f.write_text(f.read_text() + "oops\n")
    code, err = _run(capsys, *_with(base, "--data", str(f)))
    assert code == 2 and err.startswith(f"error: {f}:4: not valid JSON")


def test_conversation_without_assistant_turn(capsys, base, tmp_path, chat_rows):
    rows = chat_rows[:3] + [{"messages": [{"role": "user", "content": "hi"}]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = _run(capsys, *_with(base, "--data", str(f)))
    assert code == 2 and "row 4 has no assistant answer" in err and "on-policy" in err


def test_unknown_config_key_and_out_of_range_values(capsys, base, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 0.1\n")
    code, err = _run(capsys, *base, "--config", str(recipe))
    assert code == 2 and err.startswith(f"error: {recipe}: train.learning_rate: unknown key")
    code, err = _run(capsys, *base, "--set", "loss.beta=2")
    assert code == 2 and "loss.beta" in err


def test_missing_teacher_directory(capsys, base, tmp_path):
    code, err = _run(capsys, *_with(base, "--teacher", str(tmp_path / "nope")))
    assert code == 2 and err == f"error: teacher {tmp_path / 'nope'}: no such file or directory"


def test_mismatched_tokenizers_name_both_vocab_sizes(capsys, base, tmp_path, tokenizer_dir):
    other_tok = train_bpe_tokenizer(["completely different text, other merges"] * 20, 300)
    other_tok.save_pretrained(tmp_path / "tok2")
    student = build_tiny_model(tmp_path / "student", tmp_path / "tok2", "llama")
    args = [a for a in base if a not in ("--student-num-layers", "2")]
    code, err = _run(capsys, *args, "--student", str(student))
    teacher_vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert code == 2 and "tokenizers differ" in err
    assert f"(vocab {teacher_vocab} vs {len(other_tok)})" in err


def test_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatdistill.cli",
            "distill",
            "--loss",
            "sft",
            "--data",
            str(tmp_path / "x.jsonl"),
            "--tokenizer",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_json_metrics_written_by_cli_run(capsys, base, tmp_path):
    code, _ = _run(capsys, *base)
    assert code == 0
    line = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["step"] == 1


def test_threads_must_be_positive_and_set_torchs_threads(capsys, base, monkeypatch):
    import torch

    code, err = _run(capsys, *base, "--threads", "0")
    assert code == 2 and err == "error: --threads 0: must be at least 1"
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    code, _ = _run(capsys, *base, "--threads", "1", "--set", "loss.beta=2")
    assert seen == [1] and code == 2  # set before the command runs (and fails on its recipe)
