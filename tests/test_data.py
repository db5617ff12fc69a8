import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from chatdistill.data import (
    IGNORE,
    build_dataset,
    collate,
    length_grouped_batches,
    load_rows,
    loss_positions,
    render_example,
    split_prompt_reference,
    split_rows,
)
from chatdistill.errors import UserError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How much is the lamp?"},
    {"role": "assistant", "content": "The lamp costs 12 euros."},
    {"role": "user", "content": "Do you ship it to Oslo?"},
    {"role": "assistant", "content": "Yes, we ship the lamp to Oslo."},
]


def _learned_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_loss_is_on_assistant_turns_only_including_end_of_turn(tok):
    ex = render_example(tok, CONV, 512)
    learned = _learned_text(tok, ex)
    assert learned == ("The lamp costs 12 euros.<|im_end|>Yes, we ship the lamp to Oslo.<|im_end|>")
    assert "How much" not in learned and "Be brief" not in learned


def test_truncation_that_removes_every_answer_drops_the_example(tok):
    assert render_example(tok, CONV, 6) is None


def test_truncation_keeps_a_partial_answer(tok):
    full = render_example(tok, CONV, 512)
    first = next(i for i, lab in enumerate(full.labels) if lab != IGNORE)
    ex = render_example(tok, CONV, first + 3)
    assert len(ex.input_ids) == first + 3
    assert ex.labels == full.labels[: first + 3]


def test_prompt_completion_rows_become_a_conversation(tmp_path):
    f = tmp_path / "pc.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "hello", "answer": "x"}) + "\n")
    (row,) = load_rows(f)
    assert row["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert row["answer"] == "x"


def test_parquet_rows_load_like_jsonl(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CONV}]), f)
    assert load_rows(f)[0]["messages"] == CONV


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "chat.jsonl:2: not valid JSON"),
        ('{"text": "x"}', "chat.jsonl:2: row has no 'messages'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_rows(f)


def test_missing_and_empty_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_rows(tmp_path / "empty.jsonl")


def test_split_prompt_reference():
    prompt, ref = split_prompt_reference(CONV)
    assert prompt == CONV[:-1] and ref == "Yes, we ship the lamp to Oslo."
    assert split_prompt_reference(CONV[:2]) == (CONV[:2], None)


def test_split_is_by_conversation_and_deterministic(chat_rows):
    a = split_rows(chat_rows, 0.25, seed=1)
    b = split_rows(chat_rows, 0.25, seed=1)
    assert a == b
    train, val = a
    assert len(val) == 16 and len(train) + len(val) == len(chat_rows)
    assert not any(v in train for v in val)


def test_length_grouping_wastes_less_padding_than_random_batches(tok, chat_rows):
    ds = build_dataset(chat_rows, tok, 512, "test")
    lengths = [len(e.input_ids) for e in ds.examples]

    def pad_fraction(batches):
        slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / slots

    grouped = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    naive = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert pad_fraction(grouped) < pad_fraction(naive)


def test_collate_pads_right_and_masks(tok):
    ex = [render_example(tok, CONV, 512), render_example(tok, CONV[:3], 512)]
    batch = collate(ex, tok.pad_token_id)
    n = len(ex[1].input_ids)
    assert batch["attention_mask"][1, n:].sum() == 0
    assert (batch["labels"][1, n:] == IGNORE).all()


def test_loss_positions_are_those_whose_next_token_carries_loss(tok):
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    assert loss_positions(labels).tolist() == [
        [False, True, True, False],
        [True, False, False, False],
    ]
    ex = [render_example(tok, CONV, 512), render_example(tok, CONV[:3], 512)]
    counts = loss_positions(collate(ex, tok.pad_token_id)["labels"]).sum(1).tolist()
    assert counts == [e.n_loss_positions for e in ex] and all(counts)


def test_binary_and_utf16_files_are_one_line_errors(tmp_path):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes((json.dumps({"messages": CONV}) + "\n").encode("utf-16"))
    with pytest.raises(UserError, match=r"utf16.jsonl:1: not UTF-8 text .*UTF-16"):
        load_rows(utf16)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(json.dumps({"messages": CONV}).encode() + b"\n\x80\xff\x00\x01\n")
    with pytest.raises(UserError, match=r"bin.jsonl:2: not UTF-8 text \(byte 1 of the line\)"):
        load_rows(binary)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": CONV}).encode() + b"\n")
    assert load_rows(f)[0]["messages"] == CONV


def test_deeply_nested_json_is_a_user_error(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="deep.jsonl:2: JSON nested too deeply"):
        load_rows(f)


def test_unpaired_surrogate_in_content_is_a_user_error(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi \\ud800"}]}\n')
    with pytest.raises(UserError, match=r"s.jsonl:1: messages\[0\].content has an unpaired"):
        load_rows(f)


def test_a_row_larger_than_the_bound_is_refused_naming_the_limit(tmp_path):
    from chatdistill.data import MAX_ROW_BYTES

    huge = "word " * (MAX_ROW_BYTES // 5 + 1)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": huge}]}
    f = tmp_path / "big.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps(row) + "\n")
    limit = f"{MAX_ROW_BYTES >> 20} MB"
    with pytest.raises(UserError, match=f"big.jsonl:2: row is larger than {limit}"):
        load_rows(f)
    p = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([row]), p)
    with pytest.raises(UserError, match=f"big.parquet:1: row is larger than {limit}"):
        load_rows(p)
    just_under = {"messages": [{"role": "user", "content": "x" * (MAX_ROW_BYTES - 100)}]}
    f.write_text(json.dumps(just_under) + "\n")
    assert len(load_rows(f)) == 1


def test_an_answer_cut_at_its_budget_teaches_no_end_of_turn(tokenizer_dir):
    from transformers import AutoTokenizer

    from chatdistill.data import TRUNCATED, build_dataset

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [
        {"role": "user", "content": "How much is the lamp?"},
        {"role": "assistant", "content": "The lamp costs"},
    ]
    whole = build_dataset([{"messages": msgs}], tok, 512, "x")
    cut = build_dataset([{"messages": msgs, TRUNCATED: True}], tok, 512, "x")
    assert (whole.open_ended, cut.open_ended) == (0, 1)
    whole_labels = [x for x in whole.examples[0].labels if x != -100]
    cut_labels = [x for x in cut.examples[0].labels if x != -100]
    assert tok.eos_token_id in whole_labels and tok.eos_token_id not in cut_labels
    assert whole_labels[: len(cut_labels)] == cut_labels and len(cut_labels) >= 2
