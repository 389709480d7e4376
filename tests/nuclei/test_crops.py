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


def test_window_crops_cover_one_physical_size_at_any_resolution():
    """The same drawn cell (a dark disc of 4 µm radius in a pale 8 µm disc) scanned at 0.5
    and at 0.125 µm/px gives nearly the same 18 µm window crop."""
    from slidecensus.nuclei.crops import extract_window_crops

    def scan(mpp):
        n = int(round(40 / mpp))
        yy, xx = (np.mgrid[:n, :n] + 0.5) * mpp - 20.0
        r = np.hypot(yy, xx)
        img = np.full((n, n, 3), 240, np.uint8)
        img[r < 8] = (200, 150, 200)
        img[r < 4] = (60, 30, 90)
        return extract_window_crops(img, np.array([[n / 2 - 0.5, n / 2 - 0.5]]), 18 / mpp)[0]

    coarse, fine = scan(0.5).astype(int), scan(0.125).astype(int)
    assert np.abs(coarse - fine).mean() < 6
    assert coarse[16, 16, 0] < 100 and coarse[1, 1, 0] > 230  # nucleus centred, background


def test_window_crops_are_white_beyond_the_image_and_on_other_nuclei():
    from slidecensus.nuclei.crops import extract_window_crops

    img = np.full((64, 64, 3), 100, np.uint8)
    labels = np.zeros((64, 64), np.int32)
    labels[30:34, 30:34] = 1  # the crop's own nucleus
    labels[30:34, 40:44] = 2  # a neighbour
    plain = extract_window_crops(img, np.array([[2.0, 31.5]]), 32)[0]
    assert (plain[:, :10] == 255).all() and (plain[:, 20:] == 100).all()
    own = extract_window_crops(img, np.array([[31.5, 31.5]]), 32, labels=labels,
                               ids=np.array([1]))[0]
    assert (own[14:18, 14:18] == 100).all()  # its own nucleus is kept
    assert (own[15:17, 25:27] == 255).all()  # the neighbour's nucleus is white


def test_field_crops_keep_the_other_nuclei_that_window_crops_whiten():
    from slidecensus.nuclei.crops import crops_for

    img = np.full((200, 200, 3), 180, np.uint8)
    labels = np.zeros((200, 200), np.int32)
    labels[95:105, 95:105] = 1  # the cell's own nucleus (a lobe)
    labels[95:105, 115:125] = 2  # another lobe of the same cell, 2 µm away at 0.1 µm/px
    img[labels > 0] = 60
    table = pd.DataFrame({"cell_id": [1], "x_px": [99.5], "y_px": [99.5],
                          "bbox_x0": [95], "bbox_y0": [95], "bbox_x1": [105],
                          "bbox_y1": [105]})
    field = crops_for(img, labels, table, "field", mpp=0.1, window_um=6.4)[0]
    window = crops_for(img, labels, table, "window", mpp=0.1, window_um=6.4)[0]
    # 64 px window -> 32 px crop: the second lobe lies at crop columns 23-28
    assert (field[14:18, 24:27] < 100).all()  # kept dark in the field crop
    assert (window[14:18, 24:27] == 255).all()  # whitened in the window crop
    assert (field[14:18, 14:18] == window[14:18, 14:18]).all()  # own nucleus: the same
