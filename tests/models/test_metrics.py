"""Clustering scores on hand-made clusterings; expected values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slidecensus.errors import InvalidInputError
from slidecensus.models.metrics import contingency, entropy, f_score, majority_labels, purity

# 10 cells, classes a (5), b (3), c (2); clusters 0 = {a,a,a,a,b}, 1 = {b,b,c}, 2 = {a,c}
LABELS = np.array(list("aaaab" "bbc" "ac"))
CLUSTERS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])


def test_contingency_counts():
    expected = np.array([[4, 0, 1],   # a
                         [1, 2, 0],   # b
                         [0, 1, 1]])  # c
    np.testing.assert_array_equal(contingency(LABELS, CLUSTERS), expected)


def test_purity_by_hand():
    # majorities 4 + 2 + 1 = 7 of 10
    assert purity(LABELS, CLUSTERS) == pytest.approx(0.7)


def test_entropy_by_hand():
    h0 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    h1 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    h2 = -(2 * 0.5 * math.log(0.5))
    expected = (5 * h0 + 3 * h1 + 2 * h2) / 10 / math.log(3)
    assert entropy(LABELS, CLUSTERS) == pytest.approx(expected)
    assert entropy(LABELS, CLUSTERS) == pytest.approx(0.5277, abs=1e-4)


def test_f_score_by_hand():
    # cluster 0 -> a, cluster 1 -> b, cluster 2 -> a (tie a/c broken by sort order)
    np.testing.assert_array_equal(majority_labels(LABELS, CLUSTERS), list("aaaaabbbaa"))
    # a: predicted 7, correct 5 -> P 5/7, R 5/5; b: predicted 3, correct 2 -> P 2/3, R 2/3
    # c: never predicted -> F 0
    f_a = 2 * (5 / 7) * 1 / (5 / 7 + 1)
    f_b = 2 / 3
    expected = (5 * f_a + 3 * f_b + 2 * 0) / 10
    assert f_score(LABELS, CLUSTERS) == pytest.approx(expected)
    assert f_score(LABELS, CLUSTERS) == pytest.approx(0.6167, abs=1e-4)


def test_perfect_and_single_cluster():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.array([5, 5, 3, 3, 9, 9])
    assert purity(labels, perfect) == 1.0
    assert entropy(labels, perfect) == 0.0
    assert f_score(labels, perfect) == pytest.approx(1.0)
    one = np.zeros(6, int)
    assert purity(labels, one) == pytest.approx(1 / 3)
    assert entropy(labels, one) == pytest.approx(1.0)  # uniform over q classes


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="same length"):
        purity(np.zeros(3), np.zeros(4))
    with pytest.raises(InvalidInputError, match="empty"):
        entropy(np.zeros(0), np.zeros(0))
