"""Expected counts and their intervals from Q's probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from slidecensus.models import count_interval, expected_counts, interval_from_moments


def test_expected_counts_are_sums_of_probabilities():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=300)
    e, v = expected_counts(p)
    np.testing.assert_allclose(e, p.sum(axis=0))
    np.testing.assert_allclose(v, (p * (1 - p)).sum(axis=0))
    assert e.sum() == pytest.approx(300)


def test_sure_cells_give_a_tight_interval():
    p = np.zeros((40, 3))
    p[:30, 0] = 1
    p[30:, 2] = 1
    e, lo, hi = count_interval(p)
    np.testing.assert_allclose(e, [30, 0, 10])
    assert (lo <= e).all() and (e <= hi).all() and (hi - lo <= 1.0 + 1e-9).all()


@pytest.mark.parametrize("n_cells", [30, 300])
def test_intervals_cover_the_truth_at_about_the_nominal_rate(n_cells):
    """Cells whose types are drawn from Q's probabilities: the true count of each cluster
    falls inside its 95 % interval in about 95 % of seeded trials."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 0
    for _ in range(400):
        p = rng.dirichlet(np.full(4, 0.7), size=n_cells)
        true = np.array([rng.choice(4, p=row) for row in p])
        counts = np.bincount(true, minlength=4)
        _, lo, hi = count_interval(p)
        hits += int(((counts >= lo) & (counts <= hi)).sum())
        trials += 4
    rate = hits / trials
    assert 0.93 <= rate <= 0.985, rate


def test_intervals_stay_within_zero_and_n():
    lo, hi = interval_from_moments(np.array([0.1, 9.9]), np.array([0.09, 0.09]), 10)
    assert lo.min() >= 0 and hi.max() <= 10
