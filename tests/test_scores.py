import math

import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from chatdistill.evaluate.scores import (
    TokenSums,
    UnicodeTokenizer,
    answer_accuracy,
    answer_correct,
    chrf,
    gap_closed,
    mean_rouge_l,
    normalise_answer,
    percent_kept,
    perplexity,
    rouge_l,
    scored_positions,
    token_scores,
)


def test_scored_positions_shift_labels_left_by_one():
    labels = torch.tensor([[-100, 2, 3, -100, 1]])
    mask, targets = scored_positions(labels)
    assert mask.tolist() == [[True, True, False, True, False]]
    assert targets.tolist() == [2, 3, 1]


def test_cross_entropy_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 0, -100, -100]])
    sums = token_scores(logits, labels)
    assert sums.tokens == 4
    assert sums.ce == pytest.approx(math.log(4))
    assert perplexity(sums.ce) == pytest.approx(4.0)


def test_cross_entropy_matches_torch_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    labels[0, :2] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert token_scores(logits, labels, chunk=3).ce == pytest.approx(float(expected), rel=1e-5)


def test_kl_is_zero_and_agreement_full_for_identical_logits():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, 1, 2, 3]])
    sums = token_scores(logits, labels, teacher_logits=logits.clone())
    assert sums.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert sums.agreement == 100.0


def test_kl_and_agreement_on_hand_computed_two_token_example():
    # position 0: teacher p=(0.5, 0.5), student q=(0.75, 0.25): KL = 0.5*ln(4/3), argmax 0 vs 0.
    # position 1: teacher p=(0.25, 0.75), student q=(0.75, 0.25): KL = 0.5*ln(3), argmax 1 vs 0.
    teacher = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [0.0, 0.0]]])
    student = torch.tensor([[[math.log(3), 0.0], [math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    sums = token_scores(student, labels, teacher_logits=teacher)
    assert sums.tokens == 2
    expected_kl = (0.5 * math.log(4 / 3) + 0.5 * math.log(3)) / 2
    assert sums.kl_mean == pytest.approx(expected_kl, rel=1e-5)
    assert sums.agreement == pytest.approx(50.0)


def test_columns_beyond_shared_vocab_are_ignored():
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 5)
    padded = torch.cat([logits, torch.full((1, 4, 3), 50.0)], dim=-1)
    labels = torch.tensor([[-100, 1, 2, 4]])
    plain = token_scores(logits, labels, teacher_logits=logits)
    restricted = token_scores(padded, labels, teacher_logits=logits, vocab_size=5)
    assert restricted.ce == pytest.approx(plain.ce, rel=1e-6)
    assert restricted.kl_mean == pytest.approx(0.0, abs=1e-6)


def test_token_sums_combine_token_weighted():
    a = TokenSums(nll=2.0, tokens=1)
    a.add(TokenSums(nll=3.0, kl=0.3, agree=2, tokens=3))
    assert a.ce == pytest.approx(5.0 / 4)
    assert a.kl_mean == pytest.approx(0.3 / 4)
    assert a.agreement == pytest.approx(50.0)
    assert math.isnan(TokenSums().ce)


def test_rouge_l_on_known_pair():
    # LCS of "the cat on the mat" = 5 tokens of 6 on each side -> F = 5/6.
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(500 / 6)


def test_rouge_l_scores_greek_where_default_tokenizer_sees_nothing():
    pred, ref = "Ο γάτος κάθεται", "Ο σκύλος κάθεται"
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert default == 0.0  # why the Unicode tokenizer exists
    assert rouge_l(pred, ref) == pytest.approx(200 / 3)
    assert rouge_l(pred, pred) == pytest.approx(100.0)


def test_unicode_tokenizer_splits_cjk_into_characters():
    assert UnicodeTokenizer().tokenize("我爱你 Tokyo-2") == ["我", "爱", "你", "tokyo", "2"]
    assert rouge_l("我爱你", "我爱他") == pytest.approx(200 / 3)


def test_mean_rouge_l_averages_pairs():
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(50.0)


def test_chrf_is_100_for_identical_and_orders_partial_matches():
    refs = ["The kettle costs 12 euros.", "We ship to Oslo."]
    assert chrf(refs, refs) == pytest.approx(100.0)
    close = chrf(["The kettle costs 13 euros.", "We ship to Oslo!"], refs)
    far = chrf(["Bonjour.", "Nein."], refs)
    assert 0.0 <= far < close < 100.0


def test_normalise_answer_folds_case_punctuation_and_space():
    assert normalise_answer("  The ANSWER:\tÉté, 42! ") == "the answer été 42"
    assert normalise_answer("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_answer_containment_respects_token_boundaries():
    assert answer_correct("I think it is 12.", "12")
    assert answer_correct("Paris, France", "paris")
    assert not answer_correct("It is 120.", "12")
    assert not answer_correct("anything", "  ")


def test_answer_accuracy_is_percent_correct():
    assert answer_accuracy(["It is 4", "five", "4!"], ["4", "4", "4"]) == pytest.approx(200 / 3)


def test_percent_kept_for_higher_and_lower_is_better():
    assert percent_kept(40.0, 50.0) == pytest.approx(80.0)
    # CE: teacher_CE / student_CE
    assert percent_kept(2.5, 2.0, higher_is_better=False) == pytest.approx(80.0)
    assert percent_kept(1.0, 0.0) is None


def test_gap_closed_in_both_directions():
    assert gap_closed(40.0, 50.0, 30.0) == pytest.approx(50.0)
    # lower-is-better: baseline CE 4, teacher 2, student 3 -> half the gap
    assert gap_closed(3.0, 2.0, 4.0) == pytest.approx(50.0)
    assert gap_closed(30.0, 50.0, 30.0) == pytest.approx(0.0)
    assert gap_closed(1.0, 2.0, 2.0) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_projects_only_scored_positions_with_the_same_numbers(tiny_models, chat_rows, arch):
    """`token_scoring.score` runs the head at scored positions only; its CE, KL and agreement
    equal `token_scores` on the models' full (B, T, V) logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatdistill.data import collate, render_example
    from chatdistill.evaluate.token_scoring import score

    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    student = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    examples = [render_example(tok, r["messages"], 128) for r in chat_rows[:6]]
    got = score(student, examples, 4, tok.pad_token_id, teacher, len(tok))
    want = TokenSums()
    with torch.no_grad():
        for b in range(0, 6, 4):
            batch = collate(sorted(examples, key=lambda e: len(e.input_ids))[b : b + 4],
                            tok.pad_token_id)  # fmt: skip
            ids, mask = batch["input_ids"], batch["attention_mask"]
            s, t = (m(input_ids=ids, attention_mask=mask).logits for m in (student, teacher))
            want.add(token_scores(s, batch["labels"], t, len(tok)))
    assert got.tokens == want.tokens > 0
    assert got.ce == pytest.approx(want.ce, rel=1e-4)
    assert got.kl_mean == pytest.approx(want.kl_mean, rel=1e-3, abs=1e-6)
    assert got.agreement == pytest.approx(want.agreement)
