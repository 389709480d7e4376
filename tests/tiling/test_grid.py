"""Tile grid invariants and tissue detection."""

from __future__ import annotations

import numpy as np
import pytest

from slidecensus.tiling import (
    grid_windows,
    open_slide,
    plan_tiles,
    tissue_mask,
    tissue_mask_rgb,
    write_pyramid_tiff,
)


@pytest.mark.parametrize("shape, tile, halo", [((1000, 1300), 256, 32), ((512, 512), 512, 10),
                                               ((77, 1001), 64, 0), ((5, 5), 8, 3)])
def test_cores_partition_the_image_and_halos_clip(shape, tile, halo):
    cover = np.zeros(shape, np.int32)
    wins = grid_windows(shape, tile, halo)
    prev = (-1, -1)
    for (x, y, w, h), (rx, ry, rw, rh) in wins:
        assert (y, x) > prev  # row-major order
        prev = (y, x)
        assert x % tile == 0 and y % tile == 0  # uniform stride from 0
        cover[y : y + h, x : x + w] += 1
        # read window = core grown by the halo, clipped to the image
        assert rx == max(0, x - halo) and ry == max(0, y - halo)
        assert rx + rw == min(shape[1], x + w + halo)
        assert ry + rh == min(shape[0], y + h + halo)
    assert (cover == 1).all()  # every pixel in exactly one core


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tile_size"):
        grid_windows((10, 10), 0)
    with pytest.raises(ValueError, match="halo"):
        grid_windows((10, 10), 4, -1)


def _glass_with_tissue(h=600, w=800):
    """Glass (near white) with a pink-purple tissue ellipse and a green pen stroke."""
    rng = np.random.default_rng(1)
    img = np.full((h, w, 3), 240, np.float32) + rng.normal(0, 2, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - 300) / 200) ** 2 + ((xx - 250) / 180) ** 2 < 1
    img[tissue] = [200, 120, 180] + rng.normal(0, 8, (tissue.sum(), 3))
    pen = (np.abs(yy - 100) < 6) & (xx > 500) & (xx < 780)
    img[pen] = [40, 160, 90]
    return np.clip(img, 0, 255).astype(np.uint8), tissue, pen


def test_tissue_mask_finds_tissue_not_glass_or_pen():
    img, tissue, pen = _glass_with_tissue()
    m = tissue_mask_rgb(img)
    assert (m & tissue).sum() / tissue.sum() > 0.97
    assert (m & ~tissue).sum() / (~tissue).sum() < 0.01
    assert (m & pen).sum() == 0


def test_tissue_mask_of_all_tissue_image_is_full():
    """With no glass to contrast against, Otsu alone would halve the tissue; the clamp
    keeps it whole."""
    rng = np.random.default_rng(2)
    img = np.clip(np.array([190, 110, 170]) + rng.normal(0, 25, (300, 300, 3)), 0,
                  255).astype(np.uint8)
    assert tissue_mask_rgb(img).mean() > 0.95


def test_all_white_has_no_tissue():
    assert not tissue_mask_rgb(np.full((100, 120, 3), 250, np.uint8)).any()


def test_plan_tiles_drops_glass_and_maps_coordinates(tmp_path):
    img, tissue, _ = _glass_with_tissue()
    p = tmp_path / "s.tiff"
    write_pyramid_tiff(p, img, mpp=2.0, tile_size=128, min_level_size=200)
    with open_slide(p) as s:
        mask = tissue_mask(s, max_size=200)
        all_tiles = plan_tiles(s, tile_size=100, halo=10)
        kept = plan_tiles(s, tile_size=100, halo=10, mask=mask)
        lvl1 = plan_tiles(s, tile_size=100, halo=10, level=1, mask=tissue_mask(s, 200))
    assert len(all_tiles) == 6 * 8
    assert 0 < len(kept) < len(all_tiles)
    for t in kept:  # every kept tile touches tissue, every dropped one is glass
        x0, y0, x1, y1 = t.x, t.y, t.x + t.w, t.y + t.h
        assert tissue[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8].any()
        assert t.core_in_read == (t.x - t.rx, t.y - t.ry, t.x - t.rx + t.w, t.y - t.ry + t.h)
        assert t.um == (t.x * 2.0, t.y * 2.0, t.w * 2.0, t.h * 2.0)
    kept_ids = {(t.row, t.col) for t in kept}
    for t in all_tiles:
        if (t.row, t.col) not in kept_ids:
            assert not tissue[t.y : t.y + t.h, t.x : t.x + t.w].any()
    t = lvl1[0]
    assert t.level == 1 and t.downsample == pytest.approx(2.0) and t.mpp == pytest.approx(4.0)
    assert t.level0 == (t.x * 2.0, t.y * 2.0, t.w * 2.0, t.h * 2.0)
