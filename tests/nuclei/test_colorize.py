"""The neural (colourising) stain normaliser: lightness kept, tiled equals whole, its halo
covers its receptive field, its file is its own kind."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage import io

from slidecensus.nuclei.colorize import (
    STRIDE,
    Colorizer,
    ColorizerConfig,
    colorize,
    fit_neural,
    load_colorizer,
    receptive_field,
    save_colorizer,
    train_colorizer,
)
from slidecensus.nuclei.normalize import (
    colour_histograms,
    grey_ssim,
    histogram_metrics,
    read_normalized,
    rgb_to_cielab,
)
from slidecensus.nuclei.stain import estimate_stain_model
from slidecensus.weightsfile import CheckpointError


@pytest.fixture(scope="module")
def images(shared_data):
    files = sorted((shared_data / "monuseg-train" / "images").glob("*.png"))
    return [io.imread(f)[..., :3] for f in files[:2]]


@pytest.fixture(scope="module")
def tiny_model(images, tmp_path_factory):
    """A colouriser trained briefly on the first image (150 iterations of 8 x 64 px)."""
    payload = train_colorizer([images[0]], ColorizerConfig(iterations=150, patch=64, batch=8))
    return save_colorizer(payload, tmp_path_factory.mktemp("col") / "n.pt")


def test_network_shapes_and_no_nans():
    net = Colorizer(8, 16).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 48))
    assert out.shape == (2, 2, 64, 48) and torch.isfinite(out).all()


def test_receptive_field_is_finite_and_covers_the_architecture():
    """An impulse beyond the measured radius leaves the centre output unchanged; one at
    the radius changes it."""
    net = Colorizer(8, 16).eval()
    r = receptive_field(net)
    assert STRIDE < r < 200
    g = torch.rand(1, 16)
    base = torch.randn(1, 1, 512, 512)
    c = 256
    with torch.no_grad():
        ref = net(base, g)[0, :, c, c]
        far = base.clone()
        far[0, 0, c, c + r + 2 * STRIDE] += 50.0
        assert torch.equal(net(far, g)[0, :, c, c], ref)


def test_output_keeps_the_input_lightness(images, tiny_model):
    img = images[1]
    out = fit_neural(tiny_model, img, lightness="keep")(img)
    d = np.abs(rgb_to_cielab(out)[..., 0] - rgb_to_cielab(img)[..., 0])
    assert d.max() < 0.1  # float output: only the gamut search's tolerance
    assert grey_ssim(out, img) > 0.99


def test_tiled_equals_whole_within_one_grey_level(images, tiny_model):
    img = images[1][:300, :250]
    n = fit_neural(tiny_model, img)
    gv = np.array(n.global_vec, np.float32)
    for amp in (False, True):
        whole = colorize(img, tiny_model, n.l_mean, n.l_std, gv, tile=4096, amp=amp)
        tiled = colorize(img, tiny_model, n.l_mean, n.l_std, gv, tile=64, amp=amp)
        assert np.abs(whole - tiled).max() <= 1.0



def test_census_tiles_read_through_the_halo_equal_the_whole_image(images, tiny_model,
                                                                  array_slide):
    """read_normalized grows a tile by the normaliser's halo (stride-aligned) and trims it:
    the tile equals the same window of the whole normalised image."""
    img = images[1][:400, :400]
    norm = fit_neural(tiny_model, img, amp=False)
    model = replace(estimate_stain_model(img), norm=norm)
    whole = np.round(norm(img)).astype(np.uint8)
    for x, y, w, h in [(0, 0, 150, 120), (133, 77, 150, 150), (250, 300, 150, 100)]:
        seg, crop = read_normalized(array_slide(img), 0, x, y, w, h, model)
        assert np.abs(seg.astype(int) - whole[y:y + h, x:x + w]).max() <= 1
        assert crop is seg


def test_neural_is_nearly_idempotent_on_its_target(images, tiny_model):
    """Even briefly trained, the target itself comes back within a few grey levels and
    with nearly its own histogram."""
    img = images[0]
    out = fit_neural(tiny_model, img)(img)
    assert np.abs(out - img).mean() < 6.0
    m = histogram_metrics(colour_histograms(np.round(out)), colour_histograms(img))
    assert m["correlation"] > 0.95


def test_files_of_the_other_kind_are_refused_in_one_line(tiny_model, tmp_path):
    from slidecensus.models import load_model

    with pytest.raises(CheckpointError, match="not a slidecensus cell-model checkpoint"):
        load_model(tiny_model)
    cell = tmp_path / "cell.pt"
    torch.save({"format": "slidecensus.infogan", "format_version": 1}, cell)
    with pytest.raises(CheckpointError, match="not a slidecensus neural-normaliser") as e:
        load_colorizer(cell)
    assert "\n" not in str(e.value)
    payload = load_colorizer(tiny_model)
    assert payload["config"]["iterations"] == 150 and payload["receptive_field_px"] > 0
    assert payload["target"]["max_conc"][0] > 0


def test_grey_level_target_is_refused(images):
    from slidecensus.errors import InvalidInputError

    grey = np.repeat(images[0].mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    with pytest.raises(InvalidInputError, match="grey-level"):
        train_colorizer([grey], ColorizerConfig(iterations=1))


def test_lightness_match_moves_the_tissue_tones_to_the_targets(images, tiny_model):
    """``match`` maps the tissue L mean to the target's; 0.5 goes half way; ``keep`` and
    bad values as documented."""
    from slidecensus.errors import InvalidInputError
    from slidecensus.nuclei.colorize import lightness_fraction
    from slidecensus.nuclei.stain import tissue_pixels

    img = images[1]
    t_mean = load_colorizer(tiny_model)["l_mean"]
    lum_in = rgb_to_cielab(img)[..., 0]
    tissue = tissue_pixels(img)
    means = {}
    for mode in ("keep", "0.5", "match"):
        out = fit_neural(tiny_model, img, lightness=mode)(img)
        means[mode] = float(rgb_to_cielab(out)[..., 0][tissue].mean())
    assert means["keep"] == pytest.approx(float(lum_in[tissue].mean()), abs=0.05)
    assert means["match"] == pytest.approx(t_mean, abs=0.5)
    assert means["0.5"] == pytest.approx((means["keep"] + means["match"]) / 2, abs=0.5)
    assert lightness_fraction("keep") == 0.0 and lightness_fraction("match") == 1.0
    for bad in ("brighter", "1.5", -0.1):
        with pytest.raises(InvalidInputError, match="lightness"):
            lightness_fraction(bad)
