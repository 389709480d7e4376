"""Synthetic patches: seeded, and labels that are the painted polygons."""

import numpy as np
from skimage.draw import polygon as draw_polygon

from slidecensus.nuclei.importance import density_ratio_weights
from slidecensus.nuclei.synthpatch import (
    TextureBank,
    nucleus_polygon,
    synth_patch,
    synth_patches,
)


def _bank() -> TextureBank:
    rng = np.random.default_rng(0)
    bg = np.full((160, 160, 3), (230, 200, 210), np.float32) + rng.normal(0, 3, (160, 160, 3))
    nuc = np.full((12, 12, 3), (90, 60, 140), np.float32)
    return TextureBank(bg.astype(np.float32), ((nuc, np.ones((12, 12), bool)),), 2.0)


def test_synthesis_is_deterministic():
    a = synth_patches([_bank()], 3, seed=5)
    b = synth_patches([_bank()], 3, seed=5)
    c = synth_patches([_bank()], 3, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_labels_are_dark_nuclei_on_light_background():
    rgb, lab = synth_patch(_bank(), 1, hard=False)
    assert lab.max() >= 3
    grey = rgb.mean(axis=2)
    inner = lab > 0
    assert grey[inner].mean() < grey[~inner].mean() - 40
    # without hard examples every instance is one connected blob
    from scipy import ndimage as ndi

    for i in range(1, lab.max() + 1):
        assert ndi.label(lab == i)[1] == 1


def test_polygon_raster_matches_polygon():
    rng = np.random.default_rng(3)
    poly = nucleus_polygon(rng, 8.0, 1.5, 0.1)
    rr, _cc = draw_polygon(poly[:, 0] + 20, poly[:, 1] + 20, shape=(40, 40))
    # area of the raster equals the polygon's shoelace area within the boundary pixels
    y, x = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert abs(rr.size - area) < 0.15 * area


def test_density_ratio_weights():
    w = density_ratio_weights(np.array([0.1, 0.5, 0.9, 0.999]), clip=10)
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    assert abs(w.mean() - 1) < 1e-6
    assert w[0] < w[1] < w[2] <= w[3]
    assert w[3] / w[0] <= 100 + 1e-3
