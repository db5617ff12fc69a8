import base64
import json
import re

import pytest
from browser import CHROMIUM, DRIVER, MISSING, headless_chromium

from chatdistill.config import load_distill_config
from chatdistill.distill.train import train
from chatdistill.errors import UserError
from chatdistill.evaluate.card import write_model_card
from chatdistill.evaluate.report import (
    headline,
    print_tables,
    read_training_log,
    render_html,
    render_markdown,
    tables,
    text_table,
    validation_curves,
    write_reports,
)
from chatdistill.evaluate.result import (
    Cost,
    DataSummary,
    EvalResult,
    Fidelity,
    Kept,
    ModelResult,
    Quality,
    Sample,
    Settings,
)

from conftest import build_tiny_model


def _model(name, role, path, ce, rouge, kept=None, fidelity=None, params=1000) -> ModelResult:
    return ModelResult(
        name=name,
        role=role,
        path=str(path),
        quality=Quality(ce=ce, perplexity=2.718**ce, rouge_l=rouge, chrf=rouge + 5, accuracy=None),
        fidelity=fidelity,
        kept=kept,
        cost=Cost(
            parameters=params,
            size_on_disk_bytes=params * 4,
            peak_memory_mb=params / 100,
            prefill_tokens_per_s=900.0,
            decode_tokens_per_s_batch1=80.0,
            decode_tokens_per_s_batch8=400.0,
            time_to_first_token_s=0.012,
        ),
    )


@pytest.fixture
def results(tmp_path):
    log = tmp_path / "student" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text(
        '{"step": 10, "loss": 2.3, "lr": 0.001, "tokens_per_s": 500}\n'
        '{"step": 20, "loss": 1.9, "lr": 0.001, "tokens_per_s": 510}\n'
        '{"step": 20, "split": "val", "val_ce": 2.0, "val_ppl": 7.39, "val_kd": 0.4}\n'
        '{"step": 30, "lo'  # a line still being written
    )
    fid = Fidelity(kl=0.1234, top1_agreement=81.0, rouge_l_vs_teacher=64.0)
    kept = Kept(ce=80.0, perplexity=70.0, rouge_l=90.0, chrf=91.0, accuracy=None)
    settings = Settings(
        teacher=str(tmp_path / "big"),
        students=[str(tmp_path / "student")],
        data="test.jsonl",
        output=str(tmp_path / "out"),
        max_new_tokens=16,
        device="cpu",
        memory_method="rss-hwm",
    )
    return EvalResult(
        created="2025-01-01T00:00:00+00:00",
        data=DataSummary(
            path="test.jsonl", conversations=2, scored_tokens=40, with_reference=2, with_answer=0
        ),
        settings=settings,
        kept_mode="ratio",
        models=[
            _model("big", "teacher", tmp_path / "big", 2.0, 50.0, params=2_000_000),
            _model("student", "student", tmp_path / "student", 2.5, 45.0, kept, fid, 500_000),
        ],
        samples=[
            Sample(
                messages=[{"role": "user", "content": "Wie teuer ist der Wasserkocher?"}],
                reference="Er kostet 12 Euro.",
                answers={"big": "Er kostet 12 Euro.", "student": "<b>12</b> | Euro"},
            )
        ],
        training_logs={"student": str(log)},
    )


def test_headline_puts_size_and_speed_against_the_teacher(results):
    results.models[1].cost.decode_tokens_per_s_batch1 = 200.0
    results.models[1].kept.accuracy = 97.25
    headers, rows = headline(results)
    by_name = {r[0]: dict(zip(headers, r, strict=True)) for r in rows}
    assert by_name["big"]["params"] == "2.00M 1.00x" and by_name["big"]["kept"] == "–"
    student = by_name["student"]
    assert student["params"] == "500.00K 0.25x"
    assert student["speed"] == "2.50x" and student["decode tok/s"] == "200"
    assert student["held-out CE"] == "2.500" and student["kept"] == "97.2%"
    lines = text_table(headers, rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines[:2]}) == 1
    assert lines[3].startswith("student ") and "97.2%" in lines[3]
    fidelity = results.models[1].fidelity
    assert student["agree %"] == f"{fidelity.top1_agreement:.1f}"
    assert student["KL"] == f"{fidelity.kl:.3f}" and by_name["big"]["KL"] == "–"


def test_tables_cover_quality_fidelity_kept_and_cost(results):
    titles = [t[0] for t in tables(results)]
    assert titles == [
        "Quality",
        "Fidelity to the teacher",
        "Teacher quality kept",
        "Cost and speed",
    ]
    quality = tables(results)[0]
    assert quality[3][1][:4] == ["student", "student", "2.500", f"{2.718**2.5:,.2f}"]
    assert quality[3][0][-1] == "–"  # no answer field -> accuracy not measured
    kept = tables(results)[2]
    assert kept[3][0][2:] == ["80.0%", "70.0%", "90.0%", "91.0%", "–"]
    assert "teacher / student" in kept[1]


def test_kept_note_describes_gap_closed_with_a_baseline(results):
    results.kept_mode = "gap_closed"
    assert "(student − baseline) / (teacher − baseline)" in tables(results)[2][1]


def test_markdown_summary_has_tables_and_escaped_sample(results):
    md = render_markdown(results)
    assert "## Quality" in md and "## Cost and speed" in md
    assert "| student | student | 2.500 |" in md
    assert "<b>12</b> \\| Euro" in md  # pipes in answers do not break the table
    assert "**User:** Wie teuer ist der Wasserkocher?" in md


def test_training_log_splits_train_and_eval_and_skips_partial_lines(results):
    log = read_training_log(results.training_logs["student"])
    assert [r["step"] for r in log["train"]] == [10, 20]
    assert [(r["step"], r["split"], r["val_ce"]) for r in log["eval"]] == [(20, "val", 2.0)]


@pytest.fixture(scope="module")
def trained_log(tmp_path_factory, tiny_models, chat_file):
    """metrics.jsonl of a real four-step distillation, validated every two steps."""
    out = tmp_path_factory.mktemp("trained") / "student"
    overrides = {
        "teacher": str(tiny_models["llama"]),
        "student_num_layers": 1,
        "data.train": str(chat_file),
        "output": str(out),
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "train.save_every": 0,
        "train.warmup_steps": 1,
    }
    return train(load_distill_config(None, overrides)) / "metrics.jsonl"


def test_validation_curves_read_what_the_trainer_writes(trained_log):
    curves = validation_curves({"kd": read_training_log(trained_log)})
    assert set(curves) == {"kd CE", "kd KD"}
    steps, values, _ = curves["kd CE"]
    assert steps == [2, 4] and all(v > 0 for v in values)
    assert curves["kd KD"][0] == [2, 4]


def test_validation_curves_from_the_fixture_log(results):
    curves = validation_curves({"student": read_training_log(results.training_logs["student"])})
    assert curves == {"student CE": ([20], [2.0], "-"), "student KD": ([20], [0.4], "--")}


def test_html_embeds_png_plots_and_escapes_text(results):
    page = render_html(results, {"student": read_training_log(results.training_logs["student"])})
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # quality vs size, speed, training curves
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "&lt;b&gt;12&lt;/b&gt;" in page and "<b>12</b>" not in page
    assert "<title>chatdistill evaluation report</title>" in page


def test_html_leaves_out_training_curves_without_logs(results):
    page = render_html(results, {})
    assert page.count("data:image/png") == 2
    assert "Training curves" not in page


def test_write_reports_writes_three_files(results, tmp_path):
    paths = write_reports(results, tmp_path / "out")
    assert EvalResult.from_json(json.loads(paths["results"].read_text())) == results
    assert paths["summary"].read_text().startswith("# chatdistill evaluation")
    assert paths["report"].read_text().count("data:image/png") == 3


def test_rich_tables_print_every_model(results):
    from rich.console import Console

    console = Console(record=True, width=200)
    print_tables(results, console)
    text = console.export_text()
    assert "Fidelity to the teacher" in text and "0.1234" in text and "big" in text


def test_model_card_without_results_says_how_to_evaluate(tmp_path):
    card = write_model_card(tmp_path, None, {"teacher": "org/big", "loss": {"kind": "fkl"}})
    text = card.read_text()
    assert card == tmp_path / "README.md"
    assert "distilled from `org/big`" in text
    assert "| loss.kind | `fkl` |" in text
    assert "Not evaluated yet" in text
    assert f"chatdistill serve {tmp_path}" in text


def test_model_card_with_results_has_metrics_of_that_student(results):
    student_dir = results.models[1].path
    text = write_model_card(student_dir, results, {}).read_text()
    assert "| CE (nats/tok) ↓ | 2.000 | 2.500 |" in text
    assert "| Top-1 agreement % ↑ | – | 81.0 |" in text
    assert "Teacher quality kept: CE 80.0%" in text
    assert "distilled from `" + results.models[0].path in text


def test_model_card_rewrites_its_own_readme(tmp_path, results):
    write_model_card(tmp_path, None, {})
    again = write_model_card(tmp_path, results, {"teacher": "org/big"})
    assert again == tmp_path / "README.md" and "distilled from `org/big`" in again.read_text()
    assert not (tmp_path / "MODEL_CARD.md").exists()


def test_model_card_never_overwrites_a_readme_it_did_not_write(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# My model\n\nNotes I wrote by hand.\n")
    card = write_model_card(tmp_path, None, {"teacher": "org/big"})
    assert card == tmp_path / "MODEL_CARD.md" and "distilled from `org/big`" in card.read_text()
    assert readme.read_text() == "# My model\n\nNotes I wrote by hand.\n"


def test_model_card_python_snippet_loads_and_chats(tmp_path, tokenizer_dir, capsys):
    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_dir, "llama")
    text = write_model_card(model_dir, None, {}).read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # the snippet ran to its final print


@pytest.mark.slow
def test_report_renders_in_headless_chromium(results, tmp_path):
    if not CHROMIUM or not DRIVER:
        pytest.skip(MISSING)
    from selenium.webdriver.common.by import By

    page = write_reports(results, tmp_path / "out")["report"]
    driver = headless_chromium(tmp_path)
    try:
        driver.get(page.as_uri())
        assert driver.title == "chatdistill evaluation report"
        assert driver.find_element(By.TAG_NAME, "h1").text == "chatdistill evaluation report"
        assert len(driver.find_elements(By.TAG_NAME, "table")) == 4
        # quality 2 + fidelity 1 + kept 1 + cost 2 rows
        assert len(driver.find_elements(By.CSS_SELECTOR, "table tbody tr")) == 6
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 3
        for img in images:
            assert driver.execute_script("return arguments[0].naturalWidth", img) > 0
        answers = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".answer")]
        assert any("<b>12</b> | Euro" in a for a in answers)
        shot = tmp_path / "report.png"
        driver.set_window_size(1300, driver.execute_script("return document.body.scrollHeight"))
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


def test_results_json_keeps_the_format_readers_know(results, tmp_path):
    written = json.loads(write_reports(results, tmp_path / "out")["results"].read_text())
    assert list(written) == [
        "schema", "created", "data", "settings", "kept_mode", "models", "samples", "training_logs",
        "speculative",
    ]  # fmt: skip
    student = written["models"][1]
    assert list(student) == [
        "name",
        "role",
        "path",
        "quality",
        "fidelity",
        "cost",
        "kept",
        "source",
    ]
    assert written["schema"] == "chatdistill.eval/1"
    assert student["quality"]["ce"] == 2.5 and student["fidelity"]["kl"] == 0.1234
    assert student["cost"]["decode_tokens_per_s_batch8"] == 400.0
    assert student["kept"]["accuracy"] is None and written["models"][0]["kept"] is None
    assert written["settings"]["memory_method"] == "rss-hwm"
    assert written["samples"][0]["answers"]["student"] == "<b>12</b> | Euro"


def test_results_of_another_format_are_refused(results):
    other = {**results.to_json(), "schema": "someone.else/2"}
    with pytest.raises(UserError, match="results schema 'someone.else/2'"):
        EvalResult.from_json(other)
