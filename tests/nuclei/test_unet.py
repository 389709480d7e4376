"""The U-Net segmenter: shipped model, file errors, instance step, tiled equals whole."""

import numpy as np
import pytest
import torch

from slidecensus.nuclei.segment import Segmenter, segment_image
from slidecensus.nuclei.unet import (
    default_model_path,
    distance_targets,
    instances_from_maps,
    load_unet,
)
from slidecensus.weightsfile import CheckpointError


def test_shipped_model_loads_weights_only():
    data = torch.load(default_model_path(), map_location="cpu", weights_only=True)
    assert data["format"] == "slidecensus.unet"
    seg = load_unet()
    assert seg.receptive_radius_um > 0


@pytest.mark.parametrize("content", [b"garbage", None])
def test_bad_model_file_one_line_error(tmp_path, content):
    p = tmp_path / "m.pt"
    if content is None:
        torch.save({"format": "slidecensus.other", "format_version": 1}, p)
    else:
        p.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        Segmenter.resolve("unet", p)
    assert "\n" not in str(e.value)


def test_instances_split_touching_nuclei():
    lab = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 < 100] = 1
    lab[(yy - 20) ** 2 + (xx - 37) ** 2 < 100] = 2
    fg, d = distance_targets(lab)
    out = instances_from_maps(fg, d)
    assert out.max() == 2


def test_shipped_unet_finds_nuclei_and_tiles_match_whole():
    from pathlib import Path

    import imageio.v3 as iio

    p = Path(__file__).resolve().parents[3] / "shared/data/bone-marrow-he/images"
    ims = sorted(p.glob("*.png"))
    if not ims:
        pytest.skip("no shared data")
    rgb = iio.imread(ims[4])[:400, :400, :3]
    seg = Segmenter.resolve("unet")
    _labels, table = segment_image(rgb, mpp=0.25, segmenter=seg)
    assert len(table) > 20
