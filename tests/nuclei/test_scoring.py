"""Detection matching, Dice and AJI on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from slidecensus.errors import InvalidInputError
from slidecensus.nuclei.scoring import (
    DetectionCounts,
    aggregated_jaccard_index,
    detection_counts,
    match_instances,
    match_points,
    pixel_dice,
)


def test_matching_is_one_to_one_within_radius():
    det = np.array([[0.0, 0.0], [100.0, 100.0]])
    ann = np.array([[1.0, 0.0], [2.0, 0.0], [200.0, 200.0]])
    c = detection_counts(det, ann, radius=12)
    assert (c.matched, c.detected, c.annotated) == (1, 2, 3)
    assert c.precision == 0.5 and c.recall == pytest.approx(1 / 3)
    assert c.f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_hungarian_maximises_matches_where_greedy_would_not():
    # greedy nearest-first pairs d0-a1 (distance 1) and leaves d1 and a0 unmatched
    det = np.array([[10.0, 0.0], [21.0, 0.0]])
    ann = np.array([[0.0, 0.0], [11.0, 0.0]])
    d, a = match_points(det, ann, radius=11)
    assert len(d) == 2
    assert dict(zip(d.tolist(), a.tolist(), strict=True)) == {0: 0, 1: 1}


def test_radius_is_inclusive_boundary_and_empty_inputs():
    assert detection_counts([[0.0, 0.0]], [[13.0, 0.0]], 12).matched == 0
    assert detection_counts(np.zeros((0, 2)), [[1.0, 1.0]], 12) == DetectionCounts(0, 0, 1)
    with pytest.raises(InvalidInputError):
        detection_counts(np.zeros((3, 3)), np.zeros((1, 2)))


def test_counts_add_before_dividing():
    c = DetectionCounts(1, 1, 2) + DetectionCounts(9, 19, 10)
    assert c.precision == pytest.approx(10 / 20) and c.recall == pytest.approx(10 / 12)


def test_dice_hand_computed():
    t = np.zeros((4, 4), int)
    p = np.zeros((4, 4), int)
    t[:2, :2] = 1  # 4 px
    p[:2, :3] = 5  # 6 px, 4 shared
    assert pixel_dice(t, p) == pytest.approx(2 * 4 / 10)
    assert pixel_dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_aji_hand_computed():
    t = np.zeros((6, 6), int)
    p = np.zeros((6, 6), int)
    t[0:2, 0:2] = 1  # 4 px
    t[4:6, 4:6] = 2  # 4 px
    p[0:2, 0:3] = 7  # 6 px, overlaps t1 by 4 -> I=4, U=6
    p[5:6, 5:6] = 8  # 1 px inside t2 -> I=1, U=4
    p[3:4, 0:1] = 9  # 1 px, never matched -> added to U
    assert aggregated_jaccard_index(t, p) == pytest.approx((4 + 1) / (6 + 4 + 1))
    assert aggregated_jaccard_index(t, t) == 1.0


def test_instance_matching_by_iou():
    t = np.zeros((6, 6), int)
    t[0:2, 0:2] = 1
    t[4:6, 4:6] = 2
    p = np.zeros((6, 6), int)
    p[0:2, 0:2] = 3  # IoU 1
    p[4:6, 5:6] = 4  # IoU 0.5: not > 0.5
    c = match_instances(t, p)
    assert (c.matched, c.detected, c.annotated) == (1, 2, 2)
