"""Expected cluster counts with 95 % intervals from Q's per-cell probabilities.

The argmax count of a cluster treats every cell as surely sorted. Q gives more: cell i
belongs to cluster j with probability p_ij. If the cells are independent, the number of
cells of cluster j is a sum of Bernoulli(p_ij) variables, a Poisson-binomial variable with

* expected count  E_j = sum_i p_ij
* variance        V_j = sum_i p_ij (1 - p_ij)

The 95 % interval is E_j -/+ z sqrt(V_j) (normal approximation, z = 1.96) widened by the
half-count continuity correction and clipped to [0, n]. It describes the uncertainty of
the sorting given the model; it does not include errors of the model itself (a cluster
that mixes two cell types is mixed with confidence). Numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

__all__ = ["Z95", "count_interval", "expected_counts", "interval_from_moments"]

#: Two-sided 95 % quantile of the standard normal distribution.
Z95 = 1.959963984540054


def expected_counts(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected count and Poisson-binomial variance of each cluster, shape (k,) each.

    ``probs`` is (n, k), rows summing to 1 (Q's softmax); n may be 0.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise InvalidInputError(f"probs must be (n, k), got shape {p.shape}")
    return p.sum(axis=0), (p * (1.0 - p)).sum(axis=0)


def interval_from_moments(expected: np.ndarray, variance: np.ndarray, n: np.ndarray | int,
                          z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the count interval from its mean, variance and the number of cells.

    Works elementwise on arrays of any matching shape (a region grid, a slide's clusters),
    so regions are summed first and the interval taken from their sums.
    """
    e = np.asarray(expected, dtype=np.float64)
    half = z * np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64), 0.0)) + 0.5
    n = np.asarray(n, dtype=np.float64)
    return np.clip(e - half, 0.0, n), np.clip(e + half, 0.0, n)


def count_interval(probs: np.ndarray, z: float = Z95
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected counts and their (lo, hi) interval for one set of cells, each shape (k,)."""
    e, v = expected_counts(probs)
    lo, hi = interval_from_moments(e, v, len(probs), z)
    return e, lo, hi
