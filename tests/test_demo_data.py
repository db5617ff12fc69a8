"""The bundled demo data: generator, KB consistency, split design, chatterbot conversion, shipped
files and tokenizer."""

import subprocess
import sys
from collections import Counter
from itertools import combinations

import pytest
from transformers import AutoTokenizer

from chatdistill.data import load_rows, render_example
from chatdistill.demo.build import FACTS, facts_missing, write_demo_assets
from chatdistill.demo.chatterbot import convert_chatterbot
from chatdistill.demo.data import SPLITS, demo_asset_dir, labelled_subset, load_demo_split
from chatdistill.demo.questions import FOLLOW_UPS, QUESTIONS
from chatdistill.demo.support import build_support_data
from chatdistill.errors import UserError
from chatdistill.evaluate.scores import answer_correct

SMALL = {"train": 300, "validation": 20, "test": 30}
BY_TEXT = {f.text: f for f in FACTS}


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {s: load_demo_split(s) for s in ("train", "validation", "test")}


def _support(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["source"] == "support"]


def test_support_generator_is_deterministic_for_a_seed():
    assert build_support_data(3, SMALL) == build_support_data(3, SMALL)
    assert build_support_data(3, SMALL) != build_support_data(4, SMALL)


def test_every_support_answer_is_stated_by_its_final_turn_and_matches_the_kb(shipped):
    for split, rows in shipped.items():
        for row in _support(rows):
            final = row["messages"][-1]
            assert final["role"] == "assistant"
            assert answer_correct(final["content"], row["answer"]), (split, row)
            fact = BY_TEXT[final["content"]]  # KeyError: a sentence the KB does not state
            assert (fact.intent, fact.answer) == (row["intent"], row["answer"])
            for m in row["messages"]:
                assert m["role"] != "assistant" or m["content"] in BY_TEXT


def test_a_sentence_stating_one_fact_never_counts_as_another_of_its_intent():
    for f, g in combinations(FACTS, 2):
        if f.intent == g.intent and f.answer != g.answer:
            assert not answer_correct(g.text, f.answer), (f, g)
            assert not answer_correct(f.text, g.answer), (f, g)


def test_test_and_validation_ask_in_wordings_train_never_uses(shipped):
    used = {s: {w for r in _support(rows) for w in r["wordings"]} for s, rows in shipped.items()}
    assert used["train"].isdisjoint(used["test"])
    assert used["train"].isdisjoint(used["validation"])
    assert used["validation"].isdisjoint(used["test"])
    assert len(used["test"]) >= 3 * len(QUESTIONS)  # every intent is asked in held-out wordings
    wordings = [w for ws in QUESTIONS.values() for w in ws]
    wordings += [w for f in FOLLOW_UPS for w in f.wordings]
    assert len(wordings) == len(set(wordings)), "a wording listed twice would leak across splits"


def test_test_questions_differ_from_every_train_question(shipped):
    train_questions = {r["messages"][-2]["content"].casefold() for r in _support(shipped["train"])}
    test_questions = [r["messages"][-2]["content"].casefold() for r in _support(shipped["test"])]
    assert sum(q in train_questions for q in test_questions) == 0


def test_every_kb_fact_is_a_final_answer_in_train(shipped):
    finals = Counter(r["messages"][-1]["content"] for r in _support(shipped["train"]))
    assert all(finals[f.text] >= 5 for f in FACTS)


def test_a_tenth_of_the_train_labels_leaves_many_facts_unknown(shipped):
    train = _support(shipped["train"])
    assert facts_missing(train) == []
    for seed in range(3):
        assert len(facts_missing(labelled_subset(train, 0.1, seed))) > len(FACTS) // 4


def test_support_answers_are_short_with_the_demo_tokenizer(shipped):
    tok = AutoTokenizer.from_pretrained(demo_asset_dir() / "tokenizer")
    lengths = [len(tok(f.text)["input_ids"]) for f in FACTS]
    assert max(lengths) <= 25


def test_shipped_splits_keep_several_languages_in_every_split(shipped):
    for rows in shipped.values():
        langs = {r["lang"] for r in rows if r["source"].startswith("chatterbot/")}
        assert len(langs) >= 8
    assert {r["source"] for r in shipped["train"]} >= {"support", "chatterbot/english/ai.yml"}


def test_chatterbot_conversion_drops_and_counts_broken_entries(tmp_path):
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "a.yml").write_text(
        "conversations:\n"
        "- - Hello\n  - Hi there\n"
        "- - Hello\n  - Hi there\n"  # duplicate
        "- - How are you?\n  - Fine.\n  - Good to hear.\n"  # trailing user turn
        "- just a string\n"  # not a list
        "- - Hi\n  - 42\n"  # non-string turn
        "- - Hi\n  - '   '\n"  # empty turn
        "- - Alone\n",  # one statement: nothing left after the cut
        encoding="utf-8",
    )
    (tmp_path / "english" / "b.yml").write_text("conversations: [unclosed\n", encoding="utf-8")
    (tmp_path / "english" / "c.yml").write_text("categories: [x]\n", encoding="utf-8")
    (tmp_path / "german").mkdir()
    (tmp_path / "german" / "g.yml").write_text(
        "conversations:\n- - Guten Tag\n  - Hallo\n", encoding="utf-8"
    )
    rows, dropped = convert_chatterbot(tmp_path, {"english": "en", "german": "de"})
    assert [[m["content"] for m in r["messages"]] for r in rows] == [
        ["Hello", "Hi there"],
        ["How are you?", "Fine."],
        ["Guten Tag", "Hallo"],
    ]
    assert [r["lang"] for r in rows] == ["en", "en", "de"]
    assert rows[2]["source"] == "chatterbot/german/g.yml"
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]
    assert dropped == Counter(
        duplicate=1,
        trailing_user_turn_cut=2,
        not_a_list=1,
        non_string_turn=1,
        empty_turn=1,
        too_short=1,
        unreadable_file=1,
        file_without_conversations=1,
    )


def test_shipped_files_equal_a_fresh_build(tmp_path):
    write_demo_assets(tmp_path)
    shipped_dir = demo_asset_dir()
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = [p.relative_to(shipped_dir) for p in shipped_dir.rglob("*") if p.is_file()]
    # teacher_adapter/ is made by scripts/train_teacher_adapter.py, not by the data build.
    ours = sorted(p for p in shipped if p.parts[0] != "teacher_adapter")
    assert fresh == ours
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (shipped_dir / rel).read_bytes(), rel


def test_tokenizer_round_trips_text_in_every_shipped_language(shipped):
    tok = AutoTokenizer.from_pretrained(demo_asset_dir() / "tokenizer")
    by_lang: dict[str, list[str]] = {}
    for r in shipped["test"]:
        by_lang.setdefault(r["lang"], []).extend(m["content"] for m in r["messages"])
    assert len(by_lang) >= 9
    for texts in by_lang.values():
        for text in texts:
            assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok.apply_chat_template(shipped["test"][0]["messages"], tokenize=True, return_dict=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(shipped["test"][0]["messages"])


def test_shipped_rows_load_and_render_with_the_data_module(shipped):
    tok = AutoTokenizer.from_pretrained(demo_asset_dir() / "tokenizer")
    rows = load_rows(demo_asset_dir() / "validation.jsonl")
    assert len(rows) == len(shipped["validation"])
    for row in rows[:50]:
        example = render_example(tok, row["messages"], max_length=512)
        assert example is not None
        assert any(label != -100 for label in example.labels)


def test_prompts_view_is_train_without_final_answers(shipped):
    prompts = load_demo_split("prompts")
    assert len(prompts) == len(shipped["train"])
    for p, r in zip(prompts, shipped["train"], strict=True):
        assert p["messages"] == r["messages"][:-1]
        assert p["messages"][-1]["role"] == "user"
        assert "answer" not in p
        assert p["source"] == r["source"]


def test_unknown_split_name_and_bad_labelled_fraction_are_user_errors():
    with pytest.raises(UserError, match="unknown demo split"):
        load_demo_split("dev")
    with pytest.raises(UserError, match="outside"):
        labelled_subset([{"messages": []}], 0.0, seed=0)


def test_reading_shipped_data_runs_no_generator():
    code = (
        "import sys; from chatdistill.demo.data import load_demo_split; "
        "load_demo_split('test'); load_demo_split('prompts'); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('chatdistill.demo'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["chatdistill.demo", "chatdistill.demo.data"]


def test_grounded_support_rows_carry_the_notes_that_state_their_answer():
    from chatdistill.demo.grounding import GROUNDED_PROMPT, ground_row

    for split in SPLITS:
        for row in load_demo_split(split):
            grounded = ground_row(row)
            if row["source"] != "support":
                assert grounded is row
                continue
            system, *rest = grounded["messages"]
            assert system["role"] == "system" and system["content"].startswith(GROUNDED_PROMPT)
            assert row["answer"] in system["content"].removeprefix(GROUNDED_PROMPT)
            assert rest == [m for m in row["messages"] if m["role"] != "system"]
