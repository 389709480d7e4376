"""Scoring of nucleus detection and segmentation against annotations.

- :func:`match_points` / :func:`detection_counts`: one-to-one (Hungarian) matching of detected
  centroids to annotated points within a radius; precision, recall and F1 from the counts.
  Counts are summed over images before dividing (:class:`DetectionCounts` adds).
- :func:`pixel_dice`: Dice of the foreground masks.
- :func:`aggregated_jaccard_index`: AJI of Kumar et al. (2017).
- :func:`match_instances`: instance detection by IoU > 0.5 (a unique match by construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from ..errors import InvalidInputError

__all__ = [
    "DetectionCounts",
    "aggregated_jaccard_index",
    "detection_counts",
    "match_instances",
    "match_points",
    "pixel_dice",
]


@dataclass(frozen=True)
class DetectionCounts:
    """Matched / detected / annotated counts; add them over images, then read the scores."""

    matched: int
    detected: int
    annotated: int

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(
            self.matched + other.matched,
            self.detected + other.detected,
            self.annotated + other.annotated,
        )

    @property
    def precision(self) -> float:
        """matched / detected (1.0 when nothing was detected)."""
        return self.matched / self.detected if self.detected else 1.0

    @property
    def recall(self) -> float:
        """matched / annotated (1.0 when nothing was annotated)."""
        return self.matched / self.annotated if self.annotated else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0.0 when both are 0)."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _points(a: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(a, dtype=np.float64)
    if p.size == 0:
        return p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InvalidInputError(f"expected {name} of shape (n, 2) as (x, y), got {p.shape}")
    return p


def match_points(
    detected: np.ndarray, annotated: np.ndarray, radius: float = 12.0
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of detections to annotations within ``radius``.

    Maximises the number of matched pairs (pairs farther than ``radius`` cannot match) and,
    among maximal matchings, minimises the summed distance (Hungarian algorithm on each
    connected group of candidate pairs).

    Parameters
    ----------
    detected, annotated : ndarray, shape (n, 2)
        Point coordinates (x, y) in the same units as ``radius``.
    radius : float
        Largest distance of a match (12 px for the bone-marrow set).

    Returns
    -------
    (det_idx, ann_idx) : two int arrays of equal length
        Indices of matched pairs.

    References
    ----------
    .. [1] H. W. Kuhn, "The Hungarian method for the assignment problem", Naval Research
       Logistics Quarterly 2:83-97, 1955.
    """
    d = _points(detected, "detected")
    a = _points(annotated, "annotated")
    if len(d) == 0 or len(a) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    pairs = cKDTree(d).sparse_distance_matrix(cKDTree(a), radius, output_type="coo_matrix")
    if pairs.nnz == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    # split into connected groups so each Hungarian problem stays small
    nd, na = len(d), len(a)
    graph = sparse.coo_matrix(
        (np.ones(pairs.nnz), (pairs.row, nd + pairs.col)), shape=(nd + na, nd + na)
    )
    _, comp = sparse.csgraph.connected_components(graph, directed=False)
    big = 1e6  # a non-pair costs more than any set of real pairs can save
    out_d, out_a = [], []
    pair_comp = comp[pairs.row]
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    for grp in np.split(order, bounds):
        rows, cols = pairs.row[grp], pairs.col[grp]
        ur, ri = np.unique(rows, return_inverse=True)
        uc, ci = np.unique(cols, return_inverse=True)
        cost = np.full((len(ur), len(uc)), big)
        cost[ri, ci] = pairs.data[grp]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out_d.append(ur[r[ok]])
        out_a.append(uc[c[ok]])
    return np.concatenate(out_d), np.concatenate(out_a)


def detection_counts(
    detected: np.ndarray, annotated: np.ndarray, radius: float = 12.0
) -> DetectionCounts:
    """Matched, detected and annotated counts of one image (see :func:`match_points`)."""
    m, _ = match_points(detected, annotated, radius)
    return DetectionCounts(len(m), len(_points(detected, "detected")),
                           len(_points(annotated, "annotated")))


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidInputError(
            f"expected two 2-D label images of the same shape, got {a.shape} and {b.shape}"
        )
    return a, b


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Label values, areas and the sparse overlap table of two label images.

    Returns ``(truth_labels, pred_labels, truth_areas, pred_areas, overlap)`` where
    ``overlap[i, j]`` (CSR) counts pixels labelled ``truth_labels[i]`` and ``pred_labels[j]``.
    """
    t, p = _check_pair(truth, pred)
    tl, ti = np.unique(t, return_inverse=True)
    pl, pi = np.unique(p, return_inverse=True)
    ti, pi = ti.reshape(-1), pi.reshape(-1)
    at = np.bincount(ti, minlength=len(tl))
    ap = np.bincount(pi, minlength=len(pl))
    inter = sparse.coo_matrix((np.ones(ti.size, np.int64), (ti, pi)),
                              shape=(len(tl), len(pl))).tocsr()
    inter.sum_duplicates()
    return tl, pl, at, ap, inter


def pixel_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient ``2|T∩P| / (|T|+|P|)`` of the foregrounds (non-zero pixels).

    Returns 1.0 when both are empty.
    """
    t, p = _check_pair(truth, pred)
    t, p = t != 0, p != 0
    s = int(t.sum()) + int(p.sum())
    return 2.0 * int(np.count_nonzero(t & p)) / s if s else 1.0


def aggregated_jaccard_index(truth: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index of two instance label images (0 = background).

    For every true nucleus the predicted nucleus of highest IoU is taken; AJI is the sum of
    their intersections over the sum of their unions plus the areas of predicted nuclei
    never taken.

    References
    ----------
    .. [1] N. Kumar et al., "A dataset and a technique for generalized nuclear segmentation
       for computational pathology", IEEE TMI 36(7):1550-1560, 2017.
    """
    tl, pl, at, ap, inter = _overlaps(truth, pred)
    t_obj = np.flatnonzero(tl != 0)
    p_is_obj = pl != 0
    if len(t_obj) == 0:
        return 1.0 if not p_is_obj.any() else 0.0
    coo = inter[t_obj].tocoo()
    keep = p_is_obj[coo.col]
    rows, cols, vals = coo.row[keep], coo.col[keep], coo.data[keep]
    union = at[t_obj][rows] + ap[cols] - vals
    iou = vals / union
    # best predicted object per true object
    used = np.zeros(len(pl), bool)
    best_iou = np.full(len(t_obj), -1.0)
    np.maximum.at(best_iou, rows, iou)
    is_best = iou == best_iou[rows]
    # first best per row
    order = np.flatnonzero(is_best)
    _, first = np.unique(rows[order], return_index=True)
    sel = order[first]
    matched_rows = rows[sel]
    c_sum = int(vals[sel].sum())
    u_sum = int(union[sel].sum())
    used[cols[sel]] = True
    unmatched_t = np.setdiff1d(np.arange(len(t_obj)), matched_rows)
    u_sum += int(at[t_obj][unmatched_t].sum())
    u_sum += int(ap[p_is_obj & ~used].sum())
    return c_sum / u_sum if u_sum else 1.0


def match_instances(truth: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> DetectionCounts:
    """Instance detection counts: a predicted nucleus matches a true one when IoU > ``iou``.

    With ``iou >= 0.5`` each object has at most one partner, so no assignment is needed.
    """
    tl, pl, at, ap, inter = _overlaps(truth, pred)
    coo = inter.tocoo()
    ok = (tl[coo.row] != 0) & (pl[coo.col] != 0)
    r, c, v = coo.row[ok], coo.col[ok], coo.data[ok]
    j = v / (at[r] + ap[c] - v)
    good = j > iou
    matched = len(np.unique(r[good])) if iou >= 0.5 else int(good.sum())
    return DetectionCounts(matched, int((pl != 0).sum()), int((tl != 0).sum()))
