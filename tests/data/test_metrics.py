"""Tests of ROUGE, BLEU and TriviaQA metrics.

Hand-worked values check the definitions. The values on real data were
computed with the reference implementation, `t5.evaluation.metrics` from
`t5==0.9.4` (scratch environment; ROUGE after `np.random.seed(0)`), on the
same inputs; see docs/data.md.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from rouge_score import rouge_scorer

from gqa_t5x.data import metrics


def test_rouge_on_a_hand_worked_pair():
    # target 6 unigrams / 5 bigrams; prediction 5 unigrams / 4 bigrams.
    # ROUGE-1: overlap 5 -> P 1, R 5/6, F 10/11. ROUGE-2: overlap 3 -> F 2/3.
    scores = metrics.rouge(["the cat sat on the mat"], ["the cat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 10 / 11)
    assert scores["rouge2"] == pytest.approx(100 * 2 / 3)


def test_rouge_lsum_splits_sentences_at_space_period_space_like_t5():
    # As sentences {a b}, {c d} the summaries match fully (ROUGE-Lsum 100);
    # as one sequence the longest common subsequence is 2 of 4 tokens.
    scores = metrics.rouge(
        ["a b . c d"], ["c d . a b"], score_keys=("rougeL", "rougeLsum")
    )
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(50.0)


def test_rouge_is_deterministic_and_plain_mean_matches_rouge_score():
    targets = ["a b c d", "e f g", "h i j k l"]
    predictions = ["a b x", "e f g", "k l m"]
    first = metrics.rouge(targets, predictions)
    assert metrics.rouge(targets, predictions) == first
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    mean = (
        sum(scorer.score(t, p)["rouge1"].fmeasure for t, p in zip(targets, predictions))
        / 3
    )
    plain = metrics.rouge(targets, predictions, bootstrap=False)
    assert plain["rouge1"] == pytest.approx(100 * mean)


def _lead3(article: str) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+", article)[:3])


def test_rouge_of_lead3_on_real_cnn_dailymail_matches_t5(shared_dir):
    path = shared_dir / "data" / "cnn_dailymail" / "validation.jsonl"
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == 668
    scores = metrics.rouge(
        [r["highlights"] for r in rows], [_lead3(r["article"]) for r in rows]
    )
    # t5.evaluation.metrics.rouge on the same pairs after np.random.seed(0).
    assert scores["rouge1"] == pytest.approx(27.465429326941127, abs=1e-9)
    assert scores["rouge2"] == pytest.approx(10.490713604618183, abs=1e-9)
    assert scores["rougeLsum"] == pytest.approx(22.461414557956218, abs=1e-9)


def test_bleu_on_a_hand_worked_pair():
    # Precisions 6/7, 5/6, 4/5, 3/4; no brevity penalty: BLEU = (3/7) ** 0.25.
    score = metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert score["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25)


def test_bleu_accepts_several_references_per_prediction():
    single = metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    multi = metrics.bleu(
        [["a dog ran", "the cat sat on the mat"]], ["the cat sat on the mat"]
    )
    assert single["bleu"] == pytest.approx(100.0)
    assert multi["bleu"] == pytest.approx(100.0)


def test_bleu_on_real_wmt_en_de_matches_t5(shared_dir):
    folder = shared_dir / "data" / "wmt_ende"
    source = (folder / "src-val.txt").read_text().splitlines()
    german = (folder / "tgt-val.txt").read_text().splitlines()
    drop_every_fifth = [
        " ".join(w for i, w in enumerate(t.split()) if i % 5 != 4) for t in german
    ]
    # t5.evaluation.metrics.bleu on the same 3,000 pairs.
    assert metrics.bleu(german, drop_every_fifth)["bleu"] == pytest.approx(
        49.748733267465596, abs=1e-9
    )
    assert metrics.bleu(german, source)["bleu"] == pytest.approx(
        4.997960072611387, abs=1e-9
    )


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Beatles!", "beatles"),
        ("an apple_pie", "apple pie"),
        ("‘Quote’ the  ", "quote"),
        ("U.S.A.", "u s"),  # punctuation to spaces first, then the article "a"
        ("theatre", "theatre"),
    ],
)
def test_trivia_qa_normalisation_follows_t5(raw, normalised):
    assert metrics.normalize_trivia_qa(raw) == normalised


def test_trivia_qa_takes_the_best_answer_per_example():
    scores = metrics.trivia_qa(
        [["Meghan Trainor"], ["Paris", "City of Paris"], ["42"]],
        ["Trainor", "the city of Paris.", "41"],
    )
    # F1: 2/3 (P 1, R 1/2), 1 (matches the second answer), 0. EM: 0, 1, 0.
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)
    assert scores["em"] == pytest.approx(100 / 3)


def test_trivia_qa_on_real_questions_matches_t5(shared_dir):
    path = shared_dir / "data" / "nq_open" / "combined.jsonl"
    rows = [json.loads(line) for line in path.open()]
    answers = [r["answer"] for r in rows]
    predictions = [
        (
            a[0]
            if i % 3 == 0
            else (
                "The " + a[0].upper() + "." if i % 3 == 1 else r["question"].split()[0]
            )
        )
        for i, (r, a) in enumerate(zip(rows, answers))
    ]
    scores = metrics.trivia_qa(answers, predictions)
    # t5.evaluation.metrics.trivia_qa on the same 3,569 pairs.
    assert scores["em"] == pytest.approx(66.68534603530401, abs=1e-9)
    assert scores["f1"] == pytest.approx(66.71803493041935, abs=1e-9)


@pytest.mark.parametrize(
    "fn, targets, predictions, message",
    [
        (metrics.rouge, ["a"], ["a", "b"], "1 targets but 2 predictions"),
        (metrics.bleu, [], [], "no examples"),
        (metrics.bleu, [["a"], ["b", "c"]], ["a", "b"], "same number of references"),
        (metrics.trivia_qa, ["Paris"], ["Paris"], "non-empty list of answers"),
    ],
)
def test_metrics_reject_malformed_inputs(fn, targets, predictions, message):
    with pytest.raises(ValueError, match=message):
        fn(targets, predictions)


def test_token_loss_is_the_negative_log_likelihood_per_target_token():
    # Two examples of 3 and 5 tokens whose tokens each have probability 1/2.
    scores = [3 * math.log(0.5), 5 * math.log(0.5)]
    result = metrics.token_loss([3, 5], scores)
    assert result["cross_ent_loss"] == pytest.approx(math.log(2.0), abs=1e-12)
    assert result["perplexity"] == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize(
    "targets, scores, message",
    [([3], [-1.0, -2.0], "1 token counts but 2 scores"), ([0], [0.0], "no target tokens")],
)
def test_token_loss_rejects_malformed_inputs(targets, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.token_loss(targets, scores)


@pytest.mark.parametrize("name,unit", [
    ("rouge1", "percent, 0-100"), ("gqa_cnn_dailymail/rougeLsum", "percent, 0-100"), ("bleu", "BLEU, 0-100"),
    ("gqa_triviaqa/f1", "percent, 0-100"), ("em", "percent, 0-100"),
    ("cross_ent_loss", "nats per target token"), ("accuracy", None),
])
def test_every_metric_says_its_scale(name, unit):
    assert metrics.scale(name) == unit


def test_the_scale_matches_what_the_metrics_return():
    # ROUGE of a perfect prediction is 100 (percent), not 1.
    assert metrics.rouge(["a b c"], ["a b c"], bootstrap=False)["rouge1"] == pytest.approx(100.0)
    assert metrics.scale("rouge1").startswith("percent")
    assert metrics.trivia_qa([["x"]], ["x"])["f1"] == pytest.approx(100.0)
