from pathlib import Path

import pytest

from chatdistill.config import load_distill_config
from chatdistill.distill.divergences import DIVERGENCES
from chatdistill.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_example_recipes():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_recipe_parses(path):
    cfg = load_distill_config(str(path))
    assert cfg.output


def test_flags_override_the_recipe_and_set_takes_dotted_keys():
    cfg = load_distill_config(
        str(CONFIGS[0]), {"loss.kind": "tvd"}, ["train.lr=3e-5", "student_layers=0,3"]
    )
    assert cfg.loss.kind == "tvd" and cfg.train.lr == 3e-5
    assert cfg.student_layers == [0, 3]


def test_temperature_zero_is_refused_not_defaulted():
    with pytest.raises(UserError, match="loss.temperature: Input should be greater than 0"):
        load_distill_config(None, {"loss.temperature": 0})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.lr": -1}, "train.lr: Input should be greater than 0"),
        ({"loss.beta": 1.5}, "loss.beta: Input should be less than or equal to 1"),
        ({"loss.kind": "kl"}, "loss.kind: Input should be"),
        ({"train.lrr": 1}, "train.lrr: unknown key"),
        ({"student_layers": "a,b"}, "student_layers: expected comma-separated layer indices"),
        ({"student": "x", "student_num_layers": 2}, "choose one student source"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(UserError, match=message):
        load_distill_config(None, override)


def test_loss_kinds_are_the_registered_divergences_and_sft():
    for kind in [*DIVERGENCES, "sft"]:
        assert load_distill_config(None, {"loss.kind": kind}).loss.kind == kind
    with pytest.raises(UserError) as e:
        load_distill_config(None, {"loss.kind": "kl"})
    assert all(repr(kind) in str(e.value) for kind in DIVERGENCES)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_distill_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_distill_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_distill_config(str(bad))


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
        (f"train.seed={2**70}", "train.seed: Input should be less than or equal to 4294967295"),
        ("train.lr=[", r"--set 'train.lr=\[': the value is not valid YAML \(expected"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("loss.temperature=.nan", "loss.temperature: Input should be a finite number"),
    ],
)
def test_set_values_out_of_range_or_not_yaml_are_one_line(item, message):
    with pytest.raises(UserError, match=message) as e:
        load_distill_config(None, None, [item])
    assert "\n" not in str(e.value)


def test_binary_or_utf16_recipe_is_a_user_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("train:\n  lr: 0.1\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"r.yaml: not UTF-8 text .*UTF-16"):
        load_distill_config(str(recipe))
