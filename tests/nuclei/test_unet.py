"""The U-Net segmenter: shipped model, file errors, instance step, tiled equals whole."""

import numpy as np
import pytest
import torch

from slidecensus.errors import InvalidInputError
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


def _marrow_image():
    from pathlib import Path

    import imageio.v3 as iio

    p = Path(__file__).resolve().parents[3] / "shared/data/bone-marrow-he/images"
    ims = sorted(p.glob("*.png"))
    if not ims:
        pytest.skip("no shared data")
    return iio.imread(ims[4])[..., :3]


def test_shipped_unet_finds_nuclei():
    rgb = _marrow_image()[:400, :400]
    seg = Segmenter.resolve("unet")
    _labels, table = segment_image(rgb, mpp=0.25, segmenter=seg)
    assert len(table) > 20


def test_unet_tiles_equal_whole_without_seam_duplicates():
    """The U-Net on tiles with the halo of ``tile_geometry`` finds the nuclei of the whole
    image: >= 99 % matched within 2 px both ways, and no two detections on one nucleus."""
    import pandas as pd

    from slidecensus.nuclei.scoring import match_points
    from slidecensus.nuclei.segment import SegmentParams, segment_tile, tile_geometry
    from slidecensus.nuclei.stain import estimate_stain_model
    from slidecensus.tiling import grid_windows

    rgb = _marrow_image()
    seg = Segmenter.resolve("unet")
    params = SegmentParams()
    model = estimate_stain_model(rgb)
    _, whole = segment_image(rgb, mpp=0.25, params=params, stain_model=model, segmenter=seg)
    tile, halo = tile_geometry(params, seg, 0.25, 384)
    assert halo * 0.25 >= seg.network().receptive_radius_um
    h, w = rgb.shape[:2]
    parts = []
    windows = list(grid_windows((h, w), tile, halo))
    assert len(windows) >= 4
    for (x, y, cw, ch), (rx, ry, rw, rh) in windows:
        t = segment_tile(rgb[ry:ry + rh, rx:rx + rw], model, params,
                         core=(x - rx, y - ry, x - rx + cw, y - ry + ch), mpp=0.25,
                         segmenter=seg)
        t["x_px"] += rx
        t["y_px"] += ry
        parts.append(t)
    tiled = pd.concat(parts, ignore_index=True)
    pw, pt = whole[["x_px", "y_px"]].to_numpy(), tiled[["x_px", "y_px"]].to_numpy()
    assert len(pw) > 100
    d, _ = match_points(pt, pw, 2.0)
    assert len(d) >= 0.99 * len(pw)
    assert len(d) >= 0.99 * len(pt)
    gaps = np.linalg.norm(pt[:, None] - pt[None], axis=2) + np.eye(len(pt)) * 1e9
    assert gaps.min() > 2.0


def test_tiny_unet_trained_on_synthetic_patches_finds_held_out_nuclei():
    """A narrow U-Net trained briefly on synthetic patches (the textures of a bank painted
    as random polygons) labels a held-out synthetic patch at instance F1 >= 0.9."""
    from slidecensus.nuclei.scoring import match_instances
    from slidecensus.nuclei.synthpatch import TextureBank, synth_patch, synth_patches
    from slidecensus.nuclei.unet import UNetConfig, train_unet

    rng = np.random.default_rng(0)
    bg = np.full((200, 200, 3), (225, 195, 215), np.float32) + rng.normal(0, 4, (200, 200, 3))
    nuc = np.full((14, 14, 3), (95, 60, 140), np.float32) + rng.normal(0, 6, (14, 14, 3))
    bank = TextureBank(bg.astype(np.float32), ((nuc, np.ones((14, 14), bool)),), 4.0)
    rgb, lab = synth_patches([bank], 96, seed=1, size_px=64, hard=True)
    config = UNetConfig(widths=(8, 16, 32))
    net, log = train_unet(rgb, lab, config=config, iterations=300, batch=8, lr=3e-3, seed=0)
    assert log.iterations == 300
    from slidecensus.nuclei.unet import UNetSegmenter

    seg = UNetSegmenter(net, config)
    counts = None
    for k in range(3):  # held out: seeds the training patches never used
        test_rgb, test_lab = synth_patch(bank, 10_000 + k, size_px=128, hard=False)
        pred = seg.label(test_rgb, config.mpp, min_area_px=8)
        c = match_instances(test_lab, pred)
        counts = c if counts is None else counts + c
    assert counts.f1 >= 0.9, counts


def test_fused_inference_network_equals_the_trained_one():
    """Folding batch norm into the convolutions and splitting the decoders' concatenated
    convolutions gives the same maps as the network it came from (running statistics made
    non-trivial by a few training-mode passes)."""
    import torch

    from slidecensus.nuclei.unet import UNetConfig, _build, fuse_for_inference

    torch.manual_seed(0)
    net = _build(UNetConfig(widths=(8, 16, 32)))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 32, 32) * 2 + 0.5)
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 48, 64)
    with torch.inference_mode():
        ref, out = net(x), fused(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), float((out - ref).abs().max())
    assert fuse_for_inference(fused) is fused


def test_unet_runs_where_asked_and_on_the_cpu_without_a_gpu():
    """The loaded U-Net sits on the device asked for (the CPU here; CUDA on a GPU worker,
    not testable on this machine), and the process default follows torch's view of CUDA."""
    import torch

    from slidecensus.nuclei.unet import load_unet, unet_device

    seg = load_unet(device="cpu")
    assert next(seg.net.parameters()).device.type == "cpu"
    assert unet_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    rgb = np.full((40, 44, 3), 200.0, np.float32)
    fg, dist = seg.maps(rgb, seg.config.mpp)
    assert fg.shape == dist.shape == (40, 44)
    assert np.isfinite(fg).all() and (0 <= fg).all() and (fg <= 1).all()


def test_background_rule_keeps_stroma_and_cuts_out_nuclei():
    """``shaped`` cuts a round, hematoxylin-dark blob out of the synthetic background but
    keeps a long eosin-dominated band (stroma) as background; ``liberal`` cuts out both."""
    from slidecensus.nuclei.unettrain import background_holes

    h = np.zeros((120, 120), np.float32)
    e = np.zeros_like(h)
    yy, xx = np.mgrid[:120, :120]
    blob = (yy - 30) ** 2 + (xx - 30) ** 2 < 7 ** 2
    h[blob], e[blob] = 0.9, 0.6  # a nucleus: dark, hematoxylin a little ahead of eosin
    band = (np.abs(yy - 90) < 5) & (xx > 10) & (xx < 110)
    h[band], e[band] = 0.6, 1.2  # stroma: dark enough for the liberal threshold, eosin ahead
    shaped = background_holes(h, e, 0.5, "shaped")
    liberal = background_holes(h, e, 0.5, "liberal")
    assert liberal[blob].all() and liberal[band].all()
    assert shaped[blob].mean() > 0.9
    assert not shaped[band].any()
    # a long structure clearly dominated by hematoxylin is cut out whatever its shape
    h[band], e[band] = 1.2, 0.3
    assert background_holes(h, e, 0.5, "shaped")[band].all()
    with pytest.raises(InvalidInputError):
        background_holes(h, e, 0.5, "everything")


def test_adapt_batch_norm_takes_the_real_patches_statistics():
    """AdaBN: each batch norm's running mean and variance become those of its input over
    the given patches (here checked for the first one, computed independently); no weight
    changes, and the network is left in eval mode."""
    from slidecensus.nuclei.unet import UNetConfig, _build, adapt_batch_norm

    torch.manual_seed(0)
    net = _build(UNetConfig(widths=(4, 8)))
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
              and "num_batches" not in k}
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    adapt_batch_norm(net, patches, batch=4)
    assert not net.training
    conv, bn = net.down[0][0], net.down[0][1]
    x = torch.from_numpy((patches.astype(np.float32) - 160.0) / 60.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        y = conv(x)
    mean = y.mean(dim=(0, 2, 3))
    # the cumulative average of per-batch (unbiased) variances, as batch norm keeps it
    var = torch.stack([y[i:i + 4].var(dim=(0, 2, 3), unbiased=True)
                       for i in range(0, 12, 4)]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_old_model_files_keep_no_iod_filter():
    """A model saved before ``min_relative_iod_um2`` existed loads without the filter; new
    ones carry theirs."""
    from slidecensus.nuclei.unet import UNetConfig

    d = UNetConfig().to_dict()
    assert UNetConfig.from_dict(d).min_relative_iod_um2 == UNetConfig().min_relative_iod_um2
    assert UNetConfig().min_relative_iod_um2 > 0
    del d["min_relative_iod_um2"]
    assert UNetConfig.from_dict(d).min_relative_iod_um2 == 0.0


def test_model_iod_filter_drops_pale_small_objects(tmp_path):
    """The model's ``min_relative_iod_um2`` drops exactly the objects whose integrated
    hematoxylin (area x mean OD) is below it times the slide's nuclear split OD, and
    nothing else."""
    from slidecensus.nuclei.stain import estimate_stain_model
    from slidecensus.nuclei.unet import UNetConfig, rewrite_unet_config

    paths = {v: rewrite_unet_config(default_model_path(), tmp_path / f"m{v:g}.pt",
                                    min_relative_iod_um2=v) for v in (0.0, 18.0)}
    assert load_unet(paths[18.0]).config.min_relative_iod_um2 == 18.0
    with pytest.raises(InvalidInputError):
        UNetConfig(min_relative_iod_um2=-1.0)
    rgb = _marrow_image()[:600, :600]
    sm = estimate_stain_model(rgb)
    assert sm.nuclear_split_od > 0
    _, all_ = segment_image(rgb, mpp=0.25, stain_model=sm,
                            segmenter=Segmenter.resolve("unet", paths[0.0]))
    _, kept = segment_image(rgb, mpp=0.25, stain_model=sm,
                            segmenter=Segmenter.resolve("unet", paths[18.0]))
    iod = all_["area_um2"] * all_["mean_hematoxylin"]
    floor = 18.0 * sm.nuclear_split_od
    assert (iod < floor).sum() >= 5  # the filter has something to drop here
    expect = all_[iod >= floor][["x_px", "y_px"]].to_numpy()
    got = kept[["x_px", "y_px"]].to_numpy()
    assert got.shape == expect.shape and np.allclose(got, expect)


def test_maps_in_pieces_equal_one_pass():
    """Run in pieces (each read with the receptive radius around it, for the CPU's cache),
    the network gives the maps of one pass over the whole image; a piece overlap short of
    the receptive field does not."""
    from slidecensus.nuclei.unet import predict_maps

    seg = load_unet()
    rgb = _marrow_image()[:330, :290].astype(np.float32)
    div = seg.config.divisor
    r = int(np.ceil(seg.receptive_radius_um / seg.config.mpp))
    overlap = -(-r // div) * div
    whole = predict_maps(seg.net, rgb, div)
    pieces = predict_maps(seg.net, rgb, div, piece_px=64, overlap_px=overlap)
    short = predict_maps(seg.net, rgb, div, piece_px=64, overlap_px=div)
    for a, b, c in zip(whole, pieces, short, strict=True):
        assert a.shape == b.shape == rgb.shape[:2]
        np.testing.assert_allclose(b, a, atol=1e-5)
        assert np.abs(c - a).max() > 1e-3
    assert seg._pieces()["overlap_px"] >= r
