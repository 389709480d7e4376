"""Slide classification from the census: each slide's cell-type proportions → its label.

This is the image-level step of Hu et al. (2019): a slide is described by the proportions
``P_1..P_k`` of its cells in the k clusters the GAN found, and slides are classified (normal
vs abnormal marrow in the paper) either without labels, by k-means on the proportions, or
with them, by a linear SVM with the squared hinge loss (L2-SVM). Both are judged by
stratified k-fold cross-validation, and the slides are drawn in the first two principal
components of their proportions, as in the paper's Figs. 10 and 11.

- :func:`read_labels`, :func:`read_slides`, :func:`match_labels`: the tables in, with every
  slide that cannot be used reported (a warning and a ``skipped`` record), never dropped
  silently.
- :func:`region_quantiles`: an optional per-region feature (the q-th percentile over the
  slide's regions of each cluster's regional proportion, from ``census.zarr``), the kind of
  spatial statistic the paper's future work invites; proportions alone are the default.
- :func:`cross_validate`: out-of-fold predictions; for the SVM, C is chosen by an inner
  cross-validation on each outer training fold only (nested, so no test slide leaks into
  the choice), and recorded per fold.
- :func:`fit_model` / :class:`SlideModel`: a model as plain arrays, saved as JSON (no pickle)
  and applied to another run with :func:`apply_run`.
- :func:`classify_run`: the whole step on a census folder (``slidecensus classify``).

References
----------
.. [1] B. Hu, Y. Tang, E. I-C. Chang, Y. Fan, M. Lai and Y. Xu, "Unsupervised learning for
   cell-level visual representation in histopathology images with generative adversarial
   networks", IEEE J. Biomed. Health Inform. 23(3):1316-1328, 2019. arXiv:1711.11317.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..engine.cohort import safe_name
from ..engine.outputs import OutputDir
from ..errors import InvalidInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = [
    "C_GRID",
    "OKABE_ITO",
    "CVResult",
    "FeatureSet",
    "Method",
    "SlideData",
    "SlideModel",
    "apply_run",
    "classification_scores",
    "classify_run",
    "cross_validate",
    "fit_model",
    "fold_assignment",
    "format_report",
    "load_model",
    "match_labels",
    "min_slides_per_class",
    "pca_2d",
    "pca_figure",
    "proportion_columns",
    "read_labels",
    "read_slides",
    "region_quantiles",
    "save_model",
    "select_svm_c",
    "slide_data",
]

C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Values of the SVM's C tried by the inner cross-validation (log-spaced, as is usual)."""

REGION_QUANTILE = 90.0
"""Percentile over a slide's regions of each cluster's regional proportion (the issue's
example: a focal excess of blasts shows in the 90th percentile before the slide total)."""

REGION_MIN_CELLS = 10
"""Regions with fewer classified cells are left out of the percentile: their proportions
move in steps of 1/n, and sparse edge regions would otherwise dominate the upper tail."""

OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2",
                              "#CC79A7", "#F0E442", "#000000")
"""The Okabe & Ito (2008) colour-blind-safe palette, yellow moved late (weak on white)."""

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MODEL_FORMAT = "slidecensus-slide-classifier"
MODEL_VERSION = 1
_P_COLUMN = re.compile(r"^p_(\d+)$")


class Method(StrEnum):
    """How slides are classified (both from Hu et al. [1]_)."""

    KMEANS = "kmeans"
    SVM = "svm"


class FeatureSet(StrEnum):
    """What describes a slide: its proportions, optionally with per-region percentiles."""

    PROPORTIONS = "proportions"
    PROPORTIONS_REGIONS = "proportions+regions"


def _choice(kind: type[StrEnum], value: str) -> Any:
    """``kind(value)``, or an error listing the accepted values."""
    try:
        return kind(value)
    except ValueError:
        raise InvalidInputError(f"unknown {kind.__name__.lower()} {value!r}; expected one of "
                                f"{', '.join(m.value for m in kind)}") from None


# ------------------------------------------------------------------ tables in


def _names(ids: Sequence[str], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def read_labels(source: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """The labels table ``slide_id, label`` (both strings, stripped), one row per slide.

    Labels are kept as strings ("normal", "abnormal", or "0"/"1"), so ``001`` stays
    ``001``. Rows with an empty label are dropped with a warning (those slides then count
    as unlabelled).

    Raises
    ------
    InvalidInputError
        The file is missing, lacks a ``slide_id`` or ``label`` column (the message names
        it), or lists a slide twice.
    """
    name = "labels" if isinstance(source, pd.DataFrame) else str(source)
    if isinstance(source, pd.DataFrame):
        table = source.astype(str)
    else:
        try:
            table = pd.read_csv(source, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise InvalidInputError(f"labels file {name} not found") from None
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise InvalidInputError(f"{name}: not a readable CSV ({exc})") from None
    table = table.rename(columns=lambda c: str(c).strip())
    missing = [c for c in ("slide_id", "label") if c not in table.columns]
    if missing:
        raise InvalidInputError(
            f"{name}: missing column {', '.join(repr(c) for c in missing)} (a labels file "
            f"needs slide_id,label; found: {', '.join(map(str, table.columns)) or 'none'})")
    table = table[["slide_id", "label"]].apply(lambda s: s.str.strip())
    table = table[table["slide_id"] != ""]
    empty = table.loc[table["label"] == "", "slide_id"].tolist()
    if empty:
        log.warning("%d slides in %s have an empty label and are treated as unlabelled: %s",
                    len(empty), name, _names(empty))
        table = table[table["label"] != ""]
    dup = table.loc[table["slide_id"].duplicated(), "slide_id"].unique().tolist()
    if dup:
        raise InvalidInputError(f"{name}: slide_id listed more than once: {_names(dup)}")
    return table.reset_index(drop=True)


def proportion_columns(table: pd.DataFrame) -> list[str]:
    """The ``p_0..p_{k-1}`` columns of a slides table, in cluster order.

    Raises
    ------
    InvalidInputError
        There are none, or they are not numbered 0..k-1 without gaps.
    """
    found = sorted((int(m.group(1)), c) for c in table.columns
                   if (m := _P_COLUMN.match(str(c))))
    if not found:
        raise InvalidInputError("slides.csv has no proportion columns p_0..p_{k-1}: was the "
                                "census run without a model (--no-classify)?")
    if [j for j, _ in found] != list(range(len(found))):
        raise InvalidInputError(f"proportion columns must be p_0..p_{len(found) - 1}, got "
                                f"{', '.join(c for _, c in found)}")
    return [c for _, c in found]


def read_slides(out: str | os.PathLike | OutputDir) -> pd.DataFrame:
    """``DIR/slides.csv`` with ``slide_id``/``status`` as strings and ``p_j`` as floats
    (empty or malformed proportions become NaN, so they are reported, not guessed)."""
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    data = out.read_bytes("slides.csv")
    if data is None:
        raise InvalidInputError(f"{out.path('slides.csv')} not found: run `slidecensus run` "
                                "first")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InvalidInputError(f"{out.path('slides.csv')}: not a readable CSV ({exc})"
                                ) from None
    missing = [c for c in ("slide_id", "status") if c not in table.columns]
    if missing:
        raise InvalidInputError(f"{out.path('slides.csv')}: missing column "
                                f"{', '.join(repr(c) for c in missing)}")
    for c in proportion_columns(table):
        table[c] = pd.to_numeric(table[c], errors="coerce").astype(float)
    return table


def match_labels(slides: pd.DataFrame, labels: pd.DataFrame | None, *,
                 keep_unlabelled: bool = False) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The usable slides ``slide_id, label, p_0..`` (sorted by id) and what was skipped.

    A slide is usable when its status is ``ok`` and all its proportions are finite.
    Everything else is skipped and reported, each slide under one reason:

    - ``not_in_run``: labelled, but not in ``slides.csv``;
    - ``unlabelled``: in the run, not in the labels (kept, with label ``""``, when
      ``keep_unlabelled``, as when a saved model is applied);
    - ``failed``: status other than ``ok`` (the run's error is in the warning);
    - ``no_proportions``: ``ok`` but a proportion is missing or not finite.

    Sorting by ``slide_id`` makes the folds depend on the set of slides and the seed, not on
    the order of rows in either file.
    """
    pcols = proportion_columns(slides)
    dup = slides.loc[slides["slide_id"].duplicated(), "slide_id"].unique().tolist()
    if dup:
        raise InvalidInputError(f"slides.csv lists a slide_id more than once: {_names(dup)}")
    skipped: dict[str, list[str]] = {"not_in_run": [], "unlabelled": [], "failed": [],
                                     "no_proportions": []}
    if labels is None:
        lab = pd.Series("", index=slides["slide_id"].to_numpy(), dtype=object)
        known = set(slides["slide_id"])
    else:
        lab = pd.Series(labels["label"].to_numpy(), index=labels["slide_id"].to_numpy(),
                        dtype=object)
        known = set(lab.index)
        skipped["not_in_run"] = sorted(set(lab.index) - set(slides["slide_id"]))
    rows, errors = [], {}
    for _, r in slides.iterrows():
        sid = r["slide_id"]
        if sid not in known and not keep_unlabelled:
            skipped["unlabelled"].append(sid)
            continue
        if r["status"] != "ok":
            skipped["failed"].append(sid)
            errors[sid] = f"{r['status']}: {r.get('error', '')}".strip(": ")
            continue
        props = r[pcols].to_numpy(float)
        if not np.all(np.isfinite(props)):
            skipped["no_proportions"].append(sid)
            continue
        rows.append({"slide_id": sid, "label": lab.get(sid, ""),
                     **dict(zip(pcols, props, strict=True))})
    what = {"not_in_run": ("is", "are", "in LABELS but not in the run"),
            "unlabelled": ("is", "are", "in the run without a label"),
            "failed": ("", "", "did not complete in the run (status not ok)"),
            "no_proportions": ("has", "have", "no finite proportions (no classified cells?)")}
    for key, ids in skipped.items():
        if ids:
            one, many, text = what[key]
            detail = (_names([f"{s} ({errors[s]})" for s in ids], 5) if key == "failed"
                      else _names(ids))
            log.warning("%d %s %s, skipped: %s", len(ids), "slide" if len(ids) == 1
                        else "slides", " ".join(filter(None, (one if len(ids) == 1 else many,
                                                              text))), detail)
    table = pd.DataFrame(rows, columns=["slide_id", "label", *pcols])
    return table.sort_values("slide_id", kind="stable").reset_index(drop=True), skipped


# ------------------------------------------------------------------ features


def region_quantiles(counts: np.ndarray, q: float = REGION_QUANTILE,
                     min_cells: int = REGION_MIN_CELLS) -> np.ndarray:
    """Per cluster, the ``q``-th percentile over regions of the cluster's regional proportion.

    Parameters
    ----------
    counts : (rows, cols, k) integer counts of classified cells per region and cluster
        (the ``counts`` array of a ``census.zarr`` group).
    q : percentile in [0, 100].
    min_cells : regions with fewer classified cells are left out (see ``REGION_MIN_CELLS``).

    Returns
    -------
    (k,) float array; all NaN when no region has ``min_cells`` cells.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise InvalidInputError(f"counts must be (rows, cols, k), got shape {counts.shape}")
    if not 0 <= q <= 100:
        raise InvalidInputError(f"q must be a percentile in [0, 100], got {q}")
    flat = counts.reshape(-1, counts.shape[2]).astype(float)
    total = flat.sum(axis=1)
    keep = total >= max(min_cells, 1)
    if not keep.any():
        return np.full(counts.shape[2], np.nan)
    return np.percentile(flat[keep] / total[keep, None], q, axis=0)


@dataclass(frozen=True, eq=False)
class SlideData:
    """The usable slides of a run: ids, labels (``""`` where unknown), features."""

    slide_ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    feature_names: tuple[str, ...]
    feature_set: FeatureSet
    skipped: dict[str, list[str]] = field(default_factory=dict)


def slide_data(out: str | os.PathLike | OutputDir, labels: pd.DataFrame | None,
               feature_set: FeatureSet | str = FeatureSet.PROPORTIONS, *,
               keep_unlabelled: bool = False) -> SlideData:
    """Read a census folder into the feature matrix of its usable slides.

    With ``proportions+regions`` each slide's proportions are followed by
    :func:`region_quantiles` of its ``census.zarr`` group; a slide without a group, or with
    no region holding ``REGION_MIN_CELLS`` cells, is skipped under ``no_regions``.
    """
    feature_set = _choice(FeatureSet, feature_set)
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    table, skipped = match_labels(read_slides(out), labels, keep_unlabelled=keep_unlabelled)
    pcols = [c for c in table.columns if _P_COLUMN.match(c)]
    x = table[pcols].to_numpy(float).reshape(len(table), len(pcols))
    names = list(pcols)
    if feature_set is FeatureSet.PROPORTIONS_REGIONS:
        extra = _region_features(out, table["slide_id"].tolist(), len(pcols))
        bad = ~np.all(np.isfinite(extra), axis=1)
        skipped["no_regions"] = table.loc[bad, "slide_id"].tolist()
        if bad.any():
            log.warning("%d slides have no census.zarr regions with >= %d classified cells, "
                        "skipped: %s", int(bad.sum()), REGION_MIN_CELLS,
                        _names(skipped["no_regions"]))
        x = np.hstack([x, extra])[~bad]
        table = table[~bad].reset_index(drop=True)
        names += [f"q{REGION_QUANTILE:g}_{c}" for c in pcols]
    return SlideData(table["slide_id"].to_numpy(str), table["label"].to_numpy(str), x,
                     tuple(names), feature_set, skipped)


def _region_features(out: OutputDir, slide_ids: list[str], k: int) -> np.ndarray:
    import zarr

    res = np.full((len(slide_ids), k), np.nan)
    try:
        root = zarr.open_group(out.url("census.zarr"), mode="r")
    except FileNotFoundError:
        log.warning("%s not found: no region features", out.path("census.zarr"))
        return res
    for i, sid in enumerate(slide_ids):
        try:
            counts = np.asarray(root[safe_name(sid)]["counts"][...])
        except KeyError:
            continue
        if counts.ndim != 3 or counts.shape[2] != k:
            raise InvalidInputError(f"census.zarr/{safe_name(sid)}/counts has shape "
                                    f"{counts.shape}; expected (rows, cols, {k})")
        res[i] = region_quantiles(counts)
    return res


# ------------------------------------------------------------------ folds and models


def min_slides_per_class(folds: int, method: Method | str) -> int:
    """The fewest slides a class needs for ``folds``-fold stratified cross-validation.

    Every test fold must hold one of each class (``folds``); the SVM also chooses C by an
    inner stratified cross-validation on each training fold, which needs at least two slides
    per class there: ``n - ceil(n / folds) >= 2``.
    """
    n = max(int(folds), 2)
    if _choice(Method, method) is Method.SVM:
        while n - math.ceil(n / folds) < 2:
            n += 1
    return n


def _check_classes(labels: np.ndarray, folds: int, method: Method) -> None:
    if folds < 2:
        raise InvalidInputError(f"cross-validation needs at least 2 folds, got {folds}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise InvalidInputError(f"classification needs at least 2 classes among the usable "
                                f"labelled slides, got {len(classes)} ({_names(classes)})")
    need = min_slides_per_class(folds, method)
    few = [f"{str(c)!r}: {n}" for c, n in zip(classes, counts, strict=True) if n < need]
    if few:
        raise InvalidInputError(
            f"too few usable slides per class for {folds}-fold cross-validation with "
            f"{method.value}: each class needs at least {need}, got {', '.join(few)}")


def fold_assignment(labels: np.ndarray, folds: int = 4, seed: int = 0) -> np.ndarray:
    """The test fold (0..folds-1) of each slide: stratified, shuffled with ``seed``.

    Every class is spread as evenly as possible over the folds (sizes differ by at most
    one), and the assignment depends only on the labels' order and the seed.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    fold = np.full(len(labels), -1, np.int64)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(skf.split(np.zeros((len(labels), 1)), labels)):
        fold[test] = f
    return fold


def _sub_seed(seed: int, *tags: int) -> int:
    """An independent, reproducible seed for one part of the work (one fold, say)."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def select_svm_c(features: np.ndarray, labels: np.ndarray, *, folds: int = 4, seed: int = 0,
                 c_grid: Sequence[float] = C_GRID) -> tuple[float, int, list[float]]:
    """Choose the SVM's C by stratified cross-validation on the slides given (only).

    Called on an outer training fold, this is the inner loop of nested cross-validation: the
    outer test slides are never seen. The score is the macro F1; ties go to the smaller C
    (the more regularised model).

    Returns
    -------
    (C, number of inner folds, mean inner macro F1 per C in ``c_grid``)
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    _, counts = np.unique(labels, return_counts=True)
    inner = min(int(folds), int(counts.min()))
    if inner < 2:
        raise InvalidInputError(f"choosing C needs at least 2 training slides per class, got "
                                f"{int(counts.min())}")
    search = GridSearchCV(
        _svm_pipeline(1.0, seed), {"svm__C": list(c_grid)},
        scoring="f1_macro", cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
        refit=False, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined F1 / convergence on a tiny inner fold
        search.fit(features, labels)
    scores = [float(s) for s in search.cv_results_["mean_test_score"]]
    return float(search.best_params_["svm__C"]), inner, scores


def _svm_pipeline(c: float, seed: int) -> Any:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    # standardised features: a rare cluster's proportion would otherwise barely move w
    return Pipeline([("scale", StandardScaler()),
                     ("svm", LinearSVC(C=c, loss="squared_hinge", penalty="l2", dual="auto",
                                       max_iter=20000, random_state=seed))])


@dataclass(frozen=True, eq=False)
class SlideModel:
    """A fitted slide classifier as plain arrays (saved as JSON, never pickled).

    k-means: ``centres`` (n_centres, d) and the label of each (``centre_labels``); a slide
    gets the label of its nearest centre. SVM: the training standardisation (``mean``,
    ``scale``), one-vs-rest weights ``coef`` (1 or n_classes, d) and ``intercept``; C as
    chosen by the inner cross-validation, with its number of ``inner_folds``.
    """

    method: Method
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    feature_set: FeatureSet
    seed: int
    n_train: int
    centres: np.ndarray | None = None
    centre_labels: tuple[str, ...] = ()
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    c: float | None = None
    inner_folds: int | None = None
    inner_scores: tuple[float, ...] = ()

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Labels of the slides whose feature rows are given, (n, d) → (n,) strings."""
        x = np.asarray(features, float)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise InvalidInputError(f"expected features of shape (n, {len(self.feature_names)}"
                                    f"), got {x.shape}")
        if self.method is Method.KMEANS:
            d2 = ((x[:, None, :] - self.centres[None, :, :]) ** 2).sum(axis=2)
            return np.asarray(self.centre_labels, dtype=object)[d2.argmin(axis=1)].astype(str)
        s = ((x - self.mean) / self.scale) @ self.coef.T + self.intercept
        classes = np.asarray(self.classes, dtype=object)
        idx = (s[:, 0] > 0).astype(int) if len(self.classes) == 2 else s.argmax(axis=1)
        return classes[idx].astype(str)

    def to_dict(self) -> dict[str, Any]:
        """The model as JSON-able values (floats round-trip exactly through JSON)."""
        d: dict[str, Any] = {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "method": self.method.value,
            "classes": list(self.classes), "feature_names": list(self.feature_names),
            "feature_set": self.feature_set.value, "seed": self.seed, "n_train": self.n_train}
        if self.method is Method.KMEANS:
            d.update(centres=self.centres.tolist(), centre_labels=list(self.centre_labels))
        else:
            d.update(mean=self.mean.tolist(), scale=self.scale.tolist(),
                     coef=self.coef.tolist(), intercept=self.intercept.tolist(), C=self.c,
                     inner_folds=self.inner_folds, inner_scores=list(self.inner_scores))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideModel:
        """Inverse of :meth:`to_dict`; checks the format marker and the array shapes."""
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise InvalidInputError(f"not a slidecensus slide classifier (no "
                                    f"format={MODEL_FORMAT!r})")
        if d.get("version") != MODEL_VERSION:
            raise InvalidInputError(f"slide classifier version {d.get('version')} is not "
                                    f"supported (expected {MODEL_VERSION})")
        try:
            common = dict(method=Method(d["method"]), classes=tuple(d["classes"]),
                          feature_names=tuple(d["feature_names"]),
                          feature_set=FeatureSet(d["feature_set"]), seed=int(d["seed"]),
                          n_train=int(d["n_train"]))
            nd = len(common["feature_names"])
            if common["method"] is Method.KMEANS:
                model = cls(**common, centres=np.asarray(d["centres"], float).reshape(-1, nd),
                            centre_labels=tuple(d["centre_labels"]))
                ok = len(model.centre_labels) == len(model.centres)
            else:
                model = cls(**common, mean=np.asarray(d["mean"], float),
                            scale=np.asarray(d["scale"], float),
                            coef=np.asarray(d["coef"], float).reshape(-1, nd),
                            intercept=np.asarray(d["intercept"], float), c=float(d["C"]),
                            inner_folds=d.get("inner_folds"),
                            inner_scores=tuple(d.get("inner_scores", ())))
                rows = 1 if len(model.classes) == 2 else len(model.classes)
                ok = (model.mean.shape == model.scale.shape == (nd,)
                      and model.coef.shape[0] == rows == len(model.intercept))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed slide classifier: {exc}") from None
        if not ok:
            raise InvalidInputError("malformed slide classifier: array shapes disagree")
        return model


def fit_model(features: np.ndarray, labels: np.ndarray, method: Method | str, *,
              seed: int = 0, folds: int = 4, n_centres: int | None = None,
              feature_names: Sequence[str] | None = None,
              feature_set: FeatureSet | str = FeatureSet.PROPORTIONS,
              c_grid: Sequence[float] = C_GRID) -> SlideModel:
    """Fit a slide classifier on the slides given.

    ``kmeans`` (unsupervised, as in Hu et al. [1]_): k-means with k-means++ initialisation
    (10 restarts, seeded) on the raw proportions, ``n_centres`` centres (default: one per
    class); the labels are only used afterwards, to name each centre by the majority label of
    its training slides (ties: the first label in sorted order).

    ``svm``: a linear SVM with the squared hinge loss and L2 penalty (L2-SVM) on standardised
    features; C is chosen by :func:`select_svm_c` on these same slides (``folds`` inner folds
    at most), then the model is refitted on all of them.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    method = _choice(Method, method)
    x = np.asarray(features, float)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise InvalidInputError(f"expected features (n, d) and n labels, got {x.shape} and "
                                f"{y.shape}")
    names = tuple(feature_names) if feature_names is not None else tuple(
        f"f_{j}" for j in range(x.shape[1]))
    classes = tuple(np.unique(y).tolist())
    common = dict(method=method, classes=classes, feature_names=names,
                  feature_set=_choice(FeatureSet, feature_set), seed=int(seed), n_train=len(y))
    if method is Method.KMEANS:
        k = len(classes) if n_centres is None else int(n_centres)
        if not 1 <= k <= len(x):
            raise InvalidInputError(f"k-means needs 1 <= centres <= slides, got {k} centres "
                                    f"for {len(x)} slides")
        km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit(x)
        names_c = []
        for j in range(k):
            members = y[km.labels_ == j]
            if len(members) == 0:  # cannot happen after Lloyd's iterations; be explicit
                names_c.append(classes[0])
                continue
            vals, counts = np.unique(members, return_counts=True)
            names_c.append(str(vals[counts.argmax()]))
        return SlideModel(**common, centres=km.cluster_centers_.astype(float),
                          centre_labels=tuple(names_c))
    if len(classes) < 2:
        raise InvalidInputError(f"an SVM needs at least 2 classes, got {_names(classes)}")
    c, inner, scores = select_svm_c(x, y, folds=folds, seed=seed, c_grid=c_grid)
    pipe = _svm_pipeline(c, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x, y)
    scaler, svm = pipe.named_steps["scale"], pipe.named_steps["svm"]
    return SlideModel(**common, mean=scaler.mean_.astype(float),
                      scale=scaler.scale_.astype(float), coef=svm.coef_.astype(float),
                      intercept=np.atleast_1d(svm.intercept_).astype(float), c=c,
                      inner_folds=inner, inner_scores=tuple(scores))


def save_model(model: SlideModel, path: str | os.PathLike) -> None:
    """Write ``model`` as JSON at ``path`` (local or an fsspec URL)."""
    import fsspec

    if "://" not in str(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fsspec.open(str(path), "w") as fh:
        json.dump(model.to_dict(), fh, indent=1)
        fh.write("\n")


def load_model(path: str | os.PathLike) -> SlideModel:
    """Read a model written by :func:`save_model` (plain JSON: nothing is executed)."""
    import fsspec

    try:
        with fsspec.open(str(path), "r") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise InvalidInputError(f"model file {path} not found") from None
    except ValueError as exc:
        raise InvalidInputError(f"{path}: not a JSON slide classifier ({exc})") from None
    return SlideModel.from_dict(d)


@dataclass(frozen=True, eq=False)
class CVResult:
    """Out-of-fold predictions: ``predicted[i]`` came from a model that never saw slide i.

    ``fold_details`` holds, per fold, the training and test sizes and what was fitted on the
    training slides alone: C and the inner scores (SVM), or the centres' labels (k-means).
    """

    predicted: np.ndarray
    fold: np.ndarray
    fold_details: list[dict[str, Any]]


def cross_validate(features: np.ndarray, labels: np.ndarray, method: Method | str,
                   folds: int = 4, seed: int = 0, *,
                   feature_names: Sequence[str] | None = None,
                   feature_set: FeatureSet | str = FeatureSet.PROPORTIONS,
                   c_grid: Sequence[float] = C_GRID) -> CVResult:
    """Stratified ``folds``-fold cross-validated predictions (Hu et al. [1]_).

    Each fold's model is fitted by :func:`fit_model` on the other folds only, with a seed
    derived from ``seed`` and the fold, so the same inputs and seed give the same result.

    Raises
    ------
    InvalidInputError
        Fewer than 2 classes, or a class with fewer slides than
        :func:`min_slides_per_class` (the message says how many are needed).
    """
    method = _choice(Method, method)
    x = np.asarray(features, float)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(x) != len(y):
        raise InvalidInputError(f"expected features (n, d) and n labels, got {x.shape} and "
                                f"{y.shape}")
    _check_classes(y, folds, method)
    fold = fold_assignment(y, folds, seed)
    predicted = np.empty(len(y), dtype=object)
    details = []
    for f in range(folds):
        test = fold == f
        model = fit_model(x[~test], y[~test], method, seed=_sub_seed(seed, f), folds=folds,
                          feature_names=feature_names, feature_set=feature_set,
                          c_grid=c_grid)
        predicted[test] = model.predict(x[test])
        info: dict[str, Any] = {"fold": f, "n_train": int((~test).sum()),
                                "n_test": int(test.sum())}
        if method is Method.SVM:
            info.update(C=model.c, inner_folds=model.inner_folds,
                        inner_macro_f1=dict(zip(map(str, c_grid), model.inner_scores,
                                                strict=True)))
        else:
            info.update(centre_labels=list(model.centre_labels))
        details.append(info)
    return CVResult(predicted.astype(str), fold, details)


# ------------------------------------------------------------------ scores and plot


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray,
                          classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, their macro and weighted means,
    accuracy and the confusion matrix (rows: true label, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    classes = list(classes) if classes is not None else sorted(set(y_true) | set(y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                 zero_division=0)
    res: dict[str, Any] = {"per_class": {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
            "support": int(s[i])} for i, c in enumerate(classes)}}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                        average=avg, zero_division=0)
        res[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    res["accuracy"] = float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")
    res["confusion"] = {"labels": classes,
                        "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist()}
    return res


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slides in their first two principal components, and the fraction of variance
    each explains ((n, 2), (2,)); a missing component (one feature) is zero."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, float)
    m = min(2, x.shape[0], x.shape[1])
    coords, ratio = np.zeros((len(x), 2)), np.zeros(2)
    if m >= 1 and len(x) >= 2:
        pca = PCA(n_components=m, svd_solver="full").fit(x)
        coords[:, :m] = pca.transform(x)
        ratio[:m] = np.nan_to_num(pca.explained_variance_ratio_)
    return coords, ratio


def pca_figure(features: np.ndarray, labels: Sequence[str], *,
               misclassified: np.ndarray | None = None, title: str = "") -> Figure:
    """Scatter of the slides in their first two principal components, coloured by label.

    As the paper's Figs. 10-11 [1]_: one Okabe-Ito colour and one marker shape per label (so
    the classes stay apart without colour vision), axes labelled with the share of variance
    they explain, a legend; slides the cross-validation got wrong are ringed in black.
    """
    from matplotlib.figure import Figure

    coords, ratio = pca_2d(features)
    labels = np.asarray(labels).astype(str)
    fig = Figure(figsize=(6.4, 5.0), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, c in enumerate(sorted(set(labels))):
        sel = labels == c
        ax.scatter(coords[sel, 0], coords[sel, 1], s=36, c=OKABE_ITO[i % len(OKABE_ITO)],
                   marker=_MARKERS[i % len(_MARKERS)], edgecolors="white", linewidths=0.5,
                   label=f"{c} (n={int(sel.sum())})")
    if misclassified is not None and np.any(misclassified):
        bad = np.asarray(misclassified, bool)
        ax.scatter(coords[bad, 0], coords[bad, 1], s=110, facecolors="none",
                   edgecolors="black", linewidths=1.0, label="misclassified (CV)")
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(title or f"Slides in PCA of their features ({len(labels)} slides)")
    ax.legend(title="label", frameon=False)
    ax.grid(True, color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------ the step on a folder


def classify_run(out: str | os.PathLike | OutputDir,
                 labels: str | os.PathLike | pd.DataFrame, method: Method | str, *,
                 folds: int = 4, seed: int = 0,
                 features: FeatureSet | str = FeatureSet.PROPORTIONS,
                 save_model_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Cross-validate a slide classifier on a census folder and write the results.

    Writes ``classification.csv`` (``slide_id, label, predicted, fold``, folds numbered from
    0), ``classification.json`` (the report returned here: method, seed, folds, features,
    per-class and macro/weighted precision/recall/F1, accuracy, confusion matrix, per-fold
    details, skipped slides) and ``classification-pca.png``. With ``save_model_to``, a model
    fitted on all usable slides is saved there as JSON (for :func:`apply_run`).
    """
    method = _choice(Method, method)
    if int(seed) < 0:
        raise InvalidInputError(f"seed must be >= 0, got {seed}")
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    data = slide_data(out, read_labels(labels), features)
    if len(data.slide_ids) == 0:
        raise InvalidInputError("no usable labelled slides (see the warnings above)")
    cv = cross_validate(data.features, data.labels, method, folds, seed,
                        feature_names=data.feature_names, feature_set=data.feature_set)
    out.write_csv("classification.csv", pd.DataFrame({
        "slide_id": data.slide_ids, "label": data.labels, "predicted": cv.predicted,
        "fold": cv.fold}))
    classes = sorted(set(data.labels.tolist()))
    report: dict[str, Any] = {
        "method": method.value, "seed": int(seed), "folds": int(folds),
        "features": data.feature_set.value, "feature_names": list(data.feature_names),
        "n_slides": len(data.slide_ids), "classes": classes,
        "n_per_class": {c: int((data.labels == c).sum()) for c in classes},
        **classification_scores(data.labels, cv.predicted, classes),
        "fold_details": cv.fold_details, "skipped": data.skipped, "model": None,
        "outputs": {k: out.path(f"classification{s}") for k, s in
                    (("csv", ".csv"), ("json", ".json"), ("pca", "-pca.png"))}}
    title = (f"{data.feature_set.value}: {len(classes)} labels, {len(data.labels)} slides, "
             f"{method.value} {folds}-fold CV")
    out.write_bytes("classification-pca.png", _png(pca_figure(
        data.features, data.labels, misclassified=cv.predicted != data.labels, title=title)))
    if save_model_to is not None:
        model = fit_model(data.features, data.labels, method, seed=seed, folds=folds,
                          feature_names=data.feature_names, feature_set=data.feature_set)
        save_model(model, save_model_to)
        report["model"] = str(save_model_to)
    out.write_json("classification.json", report)
    return report


def apply_run(out: str | os.PathLike | OutputDir, model: str | os.PathLike | SlideModel, *,
              labels: str | os.PathLike | pd.DataFrame | None = None) -> dict[str, Any]:
    """Apply a saved model to a census folder's usable slides.

    Writes ``predictions.csv`` (``slide_id, label, predicted``; label empty where unknown)
    and ``predictions.json``; with ``labels``, the report also scores the labelled slides.
    The run must have the model's features (same clusters, same feature set).
    """
    out = out if isinstance(out, OutputDir) else OutputDir(out)
    source = None if isinstance(model, SlideModel) else str(model)
    model = model if isinstance(model, SlideModel) else load_model(model)
    lab = read_labels(labels) if labels is not None else None
    data = slide_data(out, lab, model.feature_set, keep_unlabelled=True)
    if data.feature_names != model.feature_names:
        raise InvalidInputError(
            f"the model was fitted on features {', '.join(model.feature_names)}; this run has "
            f"{', '.join(data.feature_names)}")
    predicted = (model.predict(data.features) if len(data.slide_ids)
                 else np.zeros(0, dtype=str))
    out.write_csv("predictions.csv", pd.DataFrame({
        "slide_id": data.slide_ids, "label": data.labels, "predicted": predicted}))
    report: dict[str, Any] = {
        "model": source, "method": model.method.value, "features": model.feature_set.value,
        "classes": list(model.classes), "n_slides": len(data.slide_ids),
        "predicted_per_class": {c: int((predicted == c).sum()) for c in model.classes},
        "skipped": data.skipped, "outputs": {"csv": out.path("predictions.csv"),
                                             "json": out.path("predictions.json")}}
    known = data.labels != ""
    if lab is not None and known.any():
        classes = sorted(set(model.classes) | set(data.labels[known].tolist()))
        report.update(n_labelled=int(known.sum()),
                      **classification_scores(data.labels[known], predicted[known], classes))
    out.write_json("predictions.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short text table of a :func:`classify_run` / :func:`apply_run` report."""
    if "folds" in report:
        head = (f"{report['method']}, {report['folds']}-fold stratified CV (seed "
                f"{report['seed']}), {report['n_slides']} slides, features: "
                f"{report['features']}")
    else:
        head = (f"{report['method']} model applied to {report['n_slides']} slides: "
                + ", ".join(f"{c} {n}" for c, n in report["predicted_per_class"].items()))
    lines = [head]
    skipped = {k: len(v) for k, v in report.get("skipped", {}).items() if v}
    if skipped:
        lines.append("skipped: " + ", ".join(f"{n} {k.replace('_', ' ')}"
                                             for k, n in skipped.items()))
    if "per_class" in report:
        width = max([len("weighted avg"), *map(len, report["per_class"])])
        lines.append(f"{'':{width}}  precision  recall     f1  support")
        for c, v in report["per_class"].items():
            lines.append(f"{c:{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  "
                         f"{v['f1']:5.3f}  {v['support']:7d}")
        for avg in ("macro", "weighted"):
            v = report[avg]
            lines.append(f"{avg + ' avg':{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}"
                         f"  {v['f1']:5.3f}")
        lines.append(f"accuracy {report['accuracy']:.3f}")
    lines += [f"-> {p}" for p in report.get("outputs", {}).values()]
    if report.get("model") and "folds" in report:
        lines.append(f"model (fitted on all {report['n_slides']} slides) -> {report['model']}")
    return "\n".join(lines)
