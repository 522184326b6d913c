"""Answer scores against their references: rouge-score for ROUGE-L, SQuAD's definitions for
exact match and token F1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.eval.metrics import answer_scores, exact_match, rouge_l, token_f1

WORDS = st.lists(st.sampled_from(["the", "king", "Romeo", "dies", "a", "sword", "2", "of",
                                  "love!", "Juliet,", "night"]), max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(WORDS, WORDS)
def test_rouge_l_equals_rouge_score(prediction: str, reference: str) -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert rouge_l(prediction, reference) == pytest.approx(
        scorer.score(reference, prediction)["rougeL"].fmeasure, abs=1e-12)


def test_exact_match_and_f1_follow_squad() -> None:
    assert exact_match("The King of France.", "king of france") == 1.0
    assert exact_match("king", "queen") == 0.0
    # pred {king, of, france, is, dead} vs ref {king, of, france}: P 3/5, R 1
    assert token_f1("the king of France is dead", "King of France") == pytest.approx(0.75)
    assert token_f1("", "") == 1.0 and token_f1("a", "king") == 0.0
    scores = answer_scores(["Hamlet", "Lear"], ["hamlet", "Macbeth"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
