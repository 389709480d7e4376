"""32 x 32 crops: shape, centring, white outside the mask, large nuclei scaled to 32."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidecensus.errors import InvalidInputError
from slidecensus.nuclei.crops import extract_crops


def _scene():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, size=(120, 160, 3)).astype(np.uint8)  # never white
    lab = np.zeros((120, 160), np.int32)
    yy, xx = np.mgrid[:120, :160]
    lab[(yy - 40) ** 2 + (xx - 50) ** 2 <= 25] = 1  # disk r=5 at (x=50, y=40): box 11 x 11
    lab[60:80, 80:144] = 2  # 64 x 20 rectangle
    lab[0:6, 150:158] = 3  # at the top border
    rows = []
    for i in (1, 2, 3):
        ys, xs = np.nonzero(lab == i)
        rows.append({"cell_id": i, "bbox_x0": xs.min(), "bbox_y0": ys.min(),
                     "bbox_x1": xs.max() + 1, "bbox_y1": ys.max() + 1})
    return img, lab, pd.DataFrame(rows)


def test_shape_dtype_and_empty():
    img, lab, tab = _scene()
    c = extract_crops(img, lab, tab)
    assert c.shape == (3, 32, 32, 3) and c.dtype == np.uint8
    assert extract_crops(img, lab, tab.iloc[:0]).shape == (0, 32, 32, 3)


def test_small_nucleus_centred_unscaled_and_white_outside_mask():
    img, lab, tab = _scene()
    c = extract_crops(img, lab, tab, masked=True)[0]
    # 11 x 11 box at x 45..55, y 35..45 -> 32 x 32 window from (45 - 10, 35 - 10)
    win = img[25:57, 35:67]
    m = lab[25:57, 35:67] == 1
    np.testing.assert_array_equal(c[m], win[m])
    assert (c[~m] == 255).all()
    # the nucleus sits in the middle: its pixels span crop rows/cols 10..20
    ys, xs = np.nonzero((c != 255).any(axis=2))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 20, 10, 20)


def test_unmasked_keeps_the_context_window():
    img, lab, tab = _scene()
    c = extract_crops(img, lab, tab, masked=False)[0]
    np.testing.assert_array_equal(c, img[25:57, 35:67])


def test_large_box_long_side_scaled_to_32():
    img, lab, tab = _scene()
    c = extract_crops(img, lab, tab, masked=True)[1]
    ys, xs = np.nonzero((c != 255).any(axis=2))
    assert xs.min() == 0 and xs.max() == 31  # 64 px long side -> all 32 columns
    assert ys.max() - ys.min() + 1 == 10  # 20 px short side -> 10 rows, centred
    assert ys.min() == 11


def test_outside_image_is_white_even_unmasked():
    img, lab, tab = _scene()
    c = extract_crops(img, lab, tab, masked=False)[2]
    # box y 0..6 -> window starts at y = -13: the first 13 rows lie above the image
    assert (c[:13] == 255).all()
    assert not (c[13:] == 255).all()


def test_validation_messages():
    img, lab, tab = _scene()
    with pytest.raises(InvalidInputError, match="labels shape"):
        extract_crops(img, lab[:10], tab)
    with pytest.raises(InvalidInputError, match="lacks columns"):
        extract_crops(img, lab, tab.drop(columns="bbox_x0"))
