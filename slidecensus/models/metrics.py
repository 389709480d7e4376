"""Scores of a clustering against known classes: purity, entropy, F-score (Hu et al.).

Hu et al. (2019, section IV-A) score the clusters of Q(c | x) on labelled cells with the
three external criteria of Zhao and Karypis (2004). With ``n`` cells, ``q`` classes, and
``n_ij`` the number of cells of class ``i`` in cluster ``j`` (``n_j`` cells in cluster j):

* purity  = (1 / n) * sum_j max_i n_ij                                   (higher is better)
* entropy = sum_j (n_j / n) * E_j,
  E_j = -(1 / log q) * sum_i (n_ij / n_j) log(n_ij / n_j)                 (lower is better)
* F-score: each cluster is assigned to its majority class, which makes the clustering a
  classification; per class, F_i = 2 P_i R_i / (P_i + R_i) from its precision and recall,
  and the score is the support-weighted mean sum_i (n_i / n) F_i       (higher is better).

Numpy only. Labels may be any hashable values that numpy can ``unique``.

References
----------
.. [1] B. Hu et al. "Unsupervised Learning for Cell-level Visual Representation in
   Histopathology Images with Generative Adversarial Networks." IEEE JBHI 23(3), 2019.
.. [2] Y. Zhao, G. Karypis. "Empirical and Theoretical Comparisons of Selected Criterion
   Functions for Document Clustering." Machine Learning 55, 2004.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

__all__ = ["contingency", "entropy", "f_score", "majority_labels", "purity"]


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts ``n_ij`` of class ``i`` (rows, sorted unique labels) in cluster ``j`` (columns).

    Raises
    ------
    InvalidInputError
        If the two arrays are not 1-D of the same, non-zero length.
    """
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.ndim != 1 or clusters.ndim != 1 or labels.shape != clusters.shape:
        raise InvalidInputError("labels and clusters must be 1-D arrays of the same length, "
                                f"got shapes {labels.shape} and {clusters.shape}")
    if labels.size == 0:
        raise InvalidInputError("labels and clusters are empty")
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max() + 1, ci.max() + 1), dtype=np.int64)
    np.add.at(table, (li, ci), 1)
    return table


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of cells that belong to the majority class of their cluster (in (0, 1])."""
    table = contingency(labels, clusters)
    return float(table.max(axis=0).sum() / table.sum())


def entropy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Size-weighted class entropy of the clusters, normalised by ``log q`` (in [0, 1]).

    With a single class the entropy is 0 by definition.
    """
    table = contingency(labels, clusters).astype(np.float64)
    q = table.shape[0]
    if q < 2:
        return 0.0
    n_j = table.sum(axis=0)
    p = table / n_j
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    e_j = -plogp.sum(axis=0) / np.log(q)
    return float((n_j / n_j.sum() * e_j).sum())


def majority_labels(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Each cell's predicted class: the majority class of its cluster (ties: first in sort)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    table = contingency(labels, clusters)
    classes = np.unique(labels)
    _, ci = np.unique(clusters, return_inverse=True)
    return classes[table.argmax(axis=0)][ci]


def f_score(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Support-weighted F-score after assigning each cluster to its majority class."""
    labels = np.asarray(labels)
    pred = majority_labels(labels, clusters)
    classes, support = np.unique(labels, return_counts=True)
    total = 0.0
    for cls, n_i in zip(classes, support, strict=True):
        tp = np.count_nonzero((pred == cls) & (labels == cls))
        n_pred = np.count_nonzero(pred == cls)
        if tp == 0:
            continue
        precision, recall = tp / n_pred, tp / n_i
        total += n_i * 2 * precision * recall / (precision + recall)
    return float(total / labels.size)
