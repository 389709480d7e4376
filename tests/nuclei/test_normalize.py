"""Stain normalisers (reinhard, macenko, none), their per-slide fit, and Yuan & Suh's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import color, io

from slidecensus.errors import InvalidInputError
from slidecensus.nuclei.normalize import (
    StainNorm,
    StainTarget,
    cielab_to_rgb,
    colour_histograms,
    fit_normalizer,
    grey_ssim,
    histogram_metrics,
    parse_stain_norm,
    read_normalized,
    rgb_to_cielab,
    stain_target,
)
from slidecensus.nuclei.stain import estimate_stain_model


@pytest.fixture(scope="module")
def monuseg(shared_data):
    files = sorted((shared_data / "monuseg-train" / "images").glob("*.png"))
    return [io.imread(f)[..., :3] for f in files[:3]]


def test_histogram_metrics_match_hand_computed_values():
    """Two-bin-heavy p against uniform q, per channel: Euclidean sqrt(4 * 0.25^2) = 0.5,
    Hellinger sqrt(1 - 2 sqrt(0.125)); correlation 1 for proportional shapes, -1 for a
    mirrored one, and 0 against a flat histogram (no spread to correlate)."""
    p = np.tile([0.5, 0.5, 0.0, 0.0], (3, 1))
    q = np.full((3, 4), 0.25)
    m = histogram_metrics(p, q)
    assert m["euclidean"] == pytest.approx(0.5)
    assert m["hellinger"] == pytest.approx(math.sqrt(1 - 2 * math.sqrt(0.125)))
    assert m["correlation"] == 0.0
    assert histogram_metrics(p, np.tile([0.4, 0.4, 0.1, 0.1], (3, 1)))["correlation"] == \
        pytest.approx(1.0)
    assert histogram_metrics(p, np.tile([0.0, 0.0, 0.5, 0.5], (3, 1)))["correlation"] == \
        pytest.approx(-1.0)
    same = histogram_metrics(p, p)
    assert same["euclidean"] == 0.0 and same["hellinger"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(InvalidInputError, match="same"):
        histogram_metrics(p, q[:, :3])


def test_colour_histograms_count_each_channel_and_pool_images():
    """A 2 x 1 image: red channel 0 and 255, green 10 twice, blue 255 and 254 (4 bins of
    64 levels); two images pool into one normalised histogram."""
    img = np.array([[[0, 10, 255]], [[255, 10, 254]]], dtype=np.uint8)
    h = colour_histograms(img, bins=4)
    np.testing.assert_allclose(h, [[0.5, 0, 0, 0.5], [1, 0, 0, 0], [0, 0, 0, 1]])
    pooled = colour_histograms([img, np.zeros((1, 2, 3), np.uint8)], bins=4)
    np.testing.assert_allclose(pooled[0], [0.75, 0, 0, 0.25])


def test_cielab_matches_skimage_and_round_trips(monuseg):
    img = monuseg[0][:200, :200]
    lab = rgb_to_cielab(img)
    np.testing.assert_allclose(lab, color.rgb2lab(img), atol=0.02)
    assert np.abs(cielab_to_rgb(lab) - img).max() < 0.01


@pytest.mark.parametrize("method, tol", [("reinhard", 0.1), ("macenko", 3.0), ("none", 0.0)])
def test_each_method_is_idempotent_on_its_own_target(monuseg, method, tol):
    """Normalising the target image to itself changes it by less than ``tol`` grey levels
    on average (Macenko drops the OD residual outside the H&E plane, hence its tolerance)."""
    img = monuseg[0]
    out = fit_normalizer(method, img, stain_target(img))(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert np.abs(out - img).mean() <= tol
    assert grey_ssim(out, img) > 0.99


def test_normalisers_move_a_slide_towards_the_target(monuseg):
    """Another organ's image, normalised to the target, has a histogram closer to it."""
    src, tgt = monuseg[2], monuseg[0]
    th = colour_histograms(tgt)
    before = histogram_metrics(colour_histograms(src), th)
    for method in ("reinhard", "macenko"):
        after = histogram_metrics(colour_histograms(
            fit_normalizer(method, src, stain_target(tgt))(src)), th)
        assert after["hellinger"] < before["hellinger"]
        assert after["correlation"] > before["correlation"]


def test_macenko_keeps_white_background_white(monuseg):
    img = monuseg[1].copy()
    img[:40, :40] = 255
    out = fit_normalizer("macenko", img, stain_target(monuseg[0]))(img)
    assert out[:40, :40].min() >= 254.0


def test_grey_level_target_and_bad_specs_are_refused(monuseg):
    grey = np.repeat(color.rgb2gray(monuseg[0])[..., None] * 255, 3, axis=2)
    with pytest.raises(InvalidInputError, match="grey-level"):
        stain_target(grey.astype(np.uint8), name="grey.png")
    with pytest.raises(InvalidInputError, match="no images"):
        stain_target([])
    with pytest.raises(InvalidInputError, match="must be one of"):
        parse_stain_norm("vahadane")
    with pytest.raises(InvalidInputError, match="no model file"):
        parse_stain_norm("neural:/nonexistent/n.pt")
    with pytest.raises(InvalidInputError, match="takes no model"):
        parse_stain_norm("macenko:x.pt")
    with pytest.raises(InvalidInputError, match="cohort"):
        parse_stain_norm("macenko", cohort=True)
    cohort = parse_stain_norm("reinhard", cohort=True)
    assert cohort.is_default and cohort.describe() == "reinhard (target cohort)"
    assert parse_stain_norm("reinhard").is_default
    assert not parse_stain_norm("reinhard", StainTarget(name="t")).is_default


def test_stain_target_round_trips_through_a_dict(monuseg):
    t = stain_target(monuseg[0], name="t0")
    assert StainTarget.from_dict(t.as_dict()) == t
    assert StainNorm("macenko", target=t) != StainNorm("macenko")



def test_read_normalized_reinhard_segments_raw_and_crops_normalised(monuseg, array_slide):
    """The default (no target) leaves both raw; Reinhard to a target normalises the crops
    only (the segmenter calibrates itself)."""
    from dataclasses import replace

    img = monuseg[1]
    model = estimate_stain_model(img)
    seg, crop = read_normalized(array_slide(img), 0, 10, 20, 100, 80, model)
    np.testing.assert_array_equal(seg, img[20:100, 10:110])
    np.testing.assert_array_equal(crop, seg)
    norm = fit_normalizer("reinhard", img, stain_target(monuseg[0]))
    seg, crop = read_normalized(array_slide(img), 0, 10, 20, 100, 80,
                                replace(model, norm=norm))
    np.testing.assert_array_equal(seg, img[20:100, 10:110])
    np.testing.assert_array_equal(crop, np.round(norm(seg)).astype(np.uint8))


def test_read_normalized_with_a_pixel_normaliser_equals_the_whole_image(monuseg,
                                                                      array_slide):
    from dataclasses import replace

    img = monuseg[1]
    norm = fit_normalizer("macenko", img, stain_target(monuseg[0]))
    model = replace(estimate_stain_model(img), norm=norm)
    whole = np.round(norm(img)).astype(np.uint8)
    seg, crop = read_normalized(array_slide(img), 0, 10, 20, 100, 80, model)
    np.testing.assert_array_equal(seg, whole[20:100, 10:110])
    np.testing.assert_array_equal(crop, seg)
