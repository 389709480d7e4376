"""Reading slides: real files through both reader paths, the writer round trip, bad input."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidecensus.errors import (
    CorruptSlideError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedFormatError,
)
from slidecensus.tiling import open_slide, write_pyramid_tiff


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, JPEG-friendly RGB test pattern with some structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        180 + 60 * np.sin(xx / 37.0 + rng.uniform(0, 6)),
        120 + 80 * np.cos(yy / 23.0 + rng.uniform(0, 6)),
        170 + 50 * np.sin((xx + yy) / 51.0),
    ], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 3000 x 2100 pyramidal TIFF at 0.25 µm/px written by our writer."""
    img = _pattern(2100, 3000)
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tiff"
    write_pyramid_tiff(path, img, mpp=0.25, tile_size=256, min_level_size=400)
    return path, img


# --------------------------------------------------------------- conformance suite


class SlideConformance:
    """Every backend must pass these (shape, µm/px, region reads, lazy views, pickling)."""

    backend: str | None = None
    expected_shape: tuple[int, int]
    expected_mpp: float | None

    @pytest.fixture
    def path(self) -> Path:  # overridden by subclasses
        raise NotImplementedError

    @pytest.fixture
    def slide(self, path):
        with open_slide(path, backend=self.backend) as s:
            yield s

    def test_shape_and_mpp(self, slide):
        assert slide.shape == self.expected_shape
        assert slide.levels[0].downsample == 1.0
        if self.expected_mpp is None:
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(self.expected_mpp, rel=1e-3)

    def test_region_is_rgb_uint8_and_matches_zarr_and_dask(self, slide):
        h, w = slide.shape
        x, y, rw, rh = w // 3, h // 4, 301, 257
        region = slide.read_region(0, x, y, rw, rh)
        assert region.shape == (rh, rw, 3) and region.dtype == np.uint8
        assert region.std() > 1  # real content, not a constant fill
        z = slide.level_array(0)
        assert z.shape == (h, w, 3)
        np.testing.assert_array_equal(z[y : y + rh, x : x + rw], region)
        d = slide.to_dask(0)
        np.testing.assert_array_equal(d[y : y + rh, x : x + rw].compute(), region)

    def test_region_outside_reads_white(self, slide):
        h, w = slide.shape
        r = slide.read_region(0, w - 10, h - 20, 50, 60)
        inside = slide.read_region(0, w - 10, h - 20, 10, 20)
        np.testing.assert_array_equal(r[:20, :10], inside)
        assert (r[20:] == 255).all() and (r[:, 10:] == 255).all()

    def test_pickle_round_trip_reopens_same_pixels(self, slide):
        clone = pickle.loads(pickle.dumps(slide))
        try:
            assert clone.shape == slide.shape and clone.mpp == slide.mpp
            assert clone.backend == slide.backend
            np.testing.assert_array_equal(clone.read_region(0, 5, 7, 64, 48),
                                          slide.read_region(0, 5, 7, 64, 48))
        finally:
            clone.close()

    def test_thumbnail_keeps_aspect(self, slide):
        t = slide.thumbnail(128)
        h, w = slide.shape
        assert max(t.shape[:2]) <= 128
        assert t.shape[0] / t.shape[1] == pytest.approx(h / w, rel=0.05)


@pytest.mark.shared
class TestSvsTifffile(SlideConformance):
    backend = "tifffile"
    expected_shape = (2967, 2220)
    expected_mpp = 0.499

    @pytest.fixture
    def path(self, cmu_svs):
        return cmu_svs


@pytest.mark.shared
class TestSvsOpenSlide(TestSvsTifffile):
    backend = "openslide"


@pytest.mark.shared
class TestJpeg2000Svs(SlideConformance):
    backend = "tifffile"
    expected_shape = (1153, 1307)
    expected_mpp = 0.1945

    @pytest.fixture
    def path(self, shared_data):
        return shared_data / "slides" / "MoNuSAC-A9K0_1.svs"


@pytest.mark.shared
class TestPng(SlideConformance):
    backend = None
    expected_shape = (1200, 1200)
    expected_mpp = None

    @pytest.fixture
    def path(self, marrow_pngs):
        return marrow_pngs[0]


class TestWrittenPyramidTifffile(SlideConformance):
    backend = "tifffile"
    expected_shape = (2100, 3000)
    expected_mpp = 0.25

    @pytest.fixture
    def path(self, pyramid):
        return pyramid[0]


class TestWrittenPyramidOpenSlide(TestWrittenPyramidTifffile):
    backend = "openslide"


# ------------------------------------------------------------------ real files


@pytest.mark.shared
def test_svs_both_paths_agree(cmu_svs):
    """tifffile and OpenSlide decode the same JPEG tiles; both link libjpeg-turbo, so we
    allow at most 2 grey levels of difference (decoders may round IDCT output differently)
    and measured zero here."""
    with open_slide(cmu_svs, backend="tifffile") as a, open_slide(cmu_svs,
                                                                 backend="openslide") as b:
        assert a.format == "svs" and b.format == "aperio"
        assert a.shape == b.shape == (2967, 2220)
        assert a.mpp == b.mpp == pytest.approx(0.499)
        for x, y, w, h in [(0, 0, 512, 512), (1000, 1500, 700, 333), (1900, 2700, 320, 267)]:
            ra, rb = a.read_region(0, x, y, w, h), b.read_region(0, x, y, w, h)
            assert np.abs(ra.astype(int) - rb).max() <= 2


@pytest.mark.shared
def test_svs_associated_images(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
        label = s.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8


@pytest.mark.shared
def test_jpeg2000_svs_both_paths_agree(shared_data):
    p = shared_data / "slides" / "MoNuSAC-A9K0_2.svs"
    with open_slide(p, backend="tifffile") as a, open_slide(p, backend="openslide") as b:
        assert a.shape == b.shape == (763, 756)
        ra, rb = a.read_region(0, 0, 0, 756, 763), b.read_region(0, 0, 0, 756, 763)
        # different JPEG 2000 decoders (OpenJPEG in both, but possibly different builds)
        assert np.abs(ra.astype(int) - rb).mean() < 1.0


@pytest.mark.shared
def test_marrow_pngs_open_as_single_level(marrow_pngs):
    assert len(marrow_pngs) == 8
    for p in marrow_pngs:
        with open_slide(p) as s:
            assert s.level_count == 1 and s.shape == (1200, 1200) and s.backend == "image"
            assert s.mpp is None
    with open_slide(marrow_pngs[0], mpp=0.25) as s:  # override for files without µm/px
        assert s.mpp == 0.25


@pytest.mark.shared
def test_mpp_override_beats_metadata(cmu_svs):
    with open_slide(cmu_svs, mpp=0.25) as s:
        assert s.mpp == 0.25


# ---------------------------------------------------------------- writer


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_written_pyramid_levels_and_pixels(pyramid, backend):
    path, img = pyramid
    with open_slide(path, backend=backend) as s:
        assert [lv.shape for lv in s.levels] == [(2100, 3000), (1050, 1500), (525, 750),
                                                   (263, 375)]
        assert [lv.downsample for lv in s.levels] == pytest.approx([1, 2, 4, 8], rel=2e-3)
        assert s.mpp == pytest.approx(0.25)
        full = s.read_region(0, 0, 0, 3000, 2100)
        # JPEG at quality 90 on a smooth pattern: small mean error, bounded max error
        err = np.abs(full.astype(int) - img)
        assert err.mean() < 2.0 and np.percentile(err, 99.9) < 16
        small = s.read_region(2, 0, 0, 750, 525).astype(float)
        ref = img.reshape(525, 4, 750, 4, 3).mean(axis=(1, 3))
        assert np.abs(small - ref).mean() < 3.0


def test_writer_streams_from_a_callable_and_on_dask(tmp_path):
    img = _pattern(700, 900, seed=3)

    class Src:
        def __call__(self, x, y, w, h):
            return img[y : y + h, x : x + w]

    a = write_pyramid_tiff(tmp_path / "a.tiff", Src(), (700, 900), mpp=0.5, tile_size=128)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        b = write_pyramid_tiff(tmp_path / "b.tiff", Src(), (700, 900), mpp=0.5,
                               tile_size=128, client=client, prefetch=5)
    with open_slide(a) as sa, open_slide(b) as sb:
        assert len(sa.levels) == len(sb.levels) == 2
        for lv in range(2):
            h, w = sa.levels[lv].shape
            np.testing.assert_array_equal(sa.read_region(lv, 0, 0, w, h),
                                          sb.read_region(lv, 0, 0, w, h))
    assert not (tmp_path / "a.tiff.part").exists()


# ---------------------------------------------------------------- bad input


def _corrupt_copy(src: Path, dst: Path, tile: int, how: str) -> Path:
    page = tifffile.TiffFile(src).pages[0]
    off, n = page.dataoffsets[tile], page.databytecounts[tile]
    data = bytearray(src.read_bytes())
    if how == "truncate":
        data = data[: off + n // 2]
    else:
        data[off : off + n] = bytes(range(256)) * (n // 256) + bytes(n % 256)
    dst.write_bytes(bytes(data))
    return dst


def test_missing_file(tmp_path):
    with pytest.raises(SlideNotFoundError, match="no such file") as e:
        open_slide(tmp_path / "nope.svs")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, SlideReadError)
    assert str(tmp_path / "nope.svs") in str(e.value)


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "dir.svs").mkdir()
    with pytest.raises(SlideNotFoundError, match="folder"):
        open_slide(tmp_path / "dir.svs")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(CorruptSlideError, match="empty file"):
        open_slide(p)


def test_truncated_tiff_names_the_tile(pyramid, tmp_path):
    bad = _corrupt_copy(pyramid[0], tmp_path / "cut.tiff", tile=37, how="truncate")
    with pytest.raises(CorruptSlideError, match="truncated TIFF") as e:
        with open_slide(bad, backend="tifffile") as s:
            s.read_region(0, 0, 0, *s.shape[::-1])
    assert "cut.tiff" in str(e.value)


@pytest.mark.shared
def test_truncated_svs_with_directories_at_the_end(cmu_svs, tmp_path):
    bad = _corrupt_copy(cmu_svs, tmp_path / "cut.svs", tile=37, how="truncate")
    with pytest.raises(CorruptSlideError, match="truncated TIFF"):
        open_slide(bad)


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_corrupt_jpeg_tile(pyramid, tmp_path, backend):
    bad = _corrupt_copy(pyramid[0], tmp_path / "bad tile.tiff", tile=5, how="garble")
    with open_slide(bad, backend=backend) as s:
        s.read_region(0, 2048, 1792, 100, 100)  # an intact tile still reads
        with pytest.raises(CorruptSlideError) as e:
            s.read_region(0, 0, 0, 3000, 2100)
    msg = str(e.value)
    assert "bad tile.tiff" in msg and "\n" not in msg
    if backend == "tifffile":
        assert "corrupt tile 5 of level 0" in msg


def test_random_bytes_with_slide_extension(tmp_path):
    p = tmp_path / "noise.svs"
    p.write_bytes(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(SlideReadError, match="noise.svs"):
        open_slide(p)


def test_text_file_with_image_extension(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(CorruptSlideError, match="not a valid PNG"):
        open_slide(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(UnsupportedFormatError, match="unrecognised format"):
        open_slide(p)


def test_path_with_spaces_and_non_ascii(pyramid, tmp_path):
    p = tmp_path / "Färbung und Ödem — 切片 1.tiff"
    shutil.copy(pyramid[0], p)
    with open_slide(p) as s:
        assert s.shape == (2100, 3000)


def test_implausible_mpp_override_is_refused(pyramid):
    with pytest.raises(SlideReadError, match="implausible"):
        open_slide(pyramid[0], mpp=-1.0)


@pytest.mark.parametrize(
    "name, array, note",
    [
        ("gray.png", np.full((40, 50), 90, np.uint8), "grayscale"),
        ("rgba.png", np.dstack([np.full((40, 50, 3), 10, np.uint8),
                                np.zeros((40, 50), np.uint8)]), "RGBA"),
        ("deep.png", np.full((40, 50, 3), 40000, np.uint16), "16-bit"),
    ],
)
def test_images_needing_conversion_warn_and_convert(tmp_path, name, array, note):
    import imagecodecs

    p = tmp_path / name
    p.write_bytes(imagecodecs.png_encode(array))
    with open_slide(p) as s, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        region = s.read_region(0, 0, 0, 50, 40)
    assert region.shape == (40, 50, 3) and region.dtype == np.uint8
    assert any(note in str(w.message) for w in caught)
    if note == "RGBA":  # fully transparent over white is white
        assert (region == 255).all()
    if note == "16-bit":
        assert (region == 40000 >> 8).all()


def test_cmyk_image_is_refused(tmp_path):
    from PIL import Image

    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(p)
    with pytest.raises(UnsupportedFormatError, match="CMYK"):
        open_slide(p)


def test_huge_declared_size_with_tiny_data(tmp_path):
    """A TIFF header that declares 100k x 100k tiles backed by a few bytes fails clearly."""
    p = tmp_path / "huge.tiff"
    with tifffile.TiffWriter(p, bigtiff=True) as tw:
        tw.write(np.zeros((256, 256, 3), np.uint8), tile=(256, 256), compression="jpeg",
                 photometric="rgb")
    data = bytearray(p.read_bytes())
    page = tifffile.TiffFile(p).pages[0]
    # rewrite ImageWidth / ImageLength to 100000: tile offsets now miss for most tiles
    for tag in ("ImageWidth", "ImageLength"):
        t = page.tags[tag]
        fmt = "<Q" if t.dtype == 16 else ("<I" if t.dtype == 4 else "<H")
        import struct

        data[t.valueoffset : t.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, 100000)
    p.write_bytes(bytes(data))
    with pytest.raises(SlideReadError, match="huge.tiff"):
        with open_slide(p) as s:
            s.read_region(0, 50000, 50000, 512, 512)


def test_one_by_one_image(tmp_path):
    import imageio.v3 as iio

    p = tmp_path / "dot.png"
    iio.imwrite(p, np.array([[[200, 100, 150]]], np.uint8))
    with open_slide(p) as s:
        assert s.shape == (1, 1)
        assert s.read_region(0, 0, 0, 1, 1).tolist() == [[[200, 100, 150]]]


def test_no_fd_leak_on_close(pyramid):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with open_slide(pyramid[0]) as s:
            s.read_region(0, 0, 0, 10, 10)
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_ome_tiff_mpp_and_levels(tmp_path):
    """OME-TIFF: µm/px from PhysicalSizeX (here given in nm), pyramid from SubIFDs."""
    img = _pattern(600, 800, seed=5)
    p = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(p, bigtiff=True) as tw:
        tw.write(img, tile=(256, 256), photometric="rgb", subifds=1, compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": 350.0, "PhysicalSizeXUnit": "nm",
                           "PhysicalSizeY": 350.0, "PhysicalSizeYUnit": "nm"})
        tw.write(img[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1,
                 compression="zlib")
    with open_slide(p) as s:
        assert s.format == "ome-tiff" and s.backend == "tifffile"
        assert s.mpp == pytest.approx(0.35)
        assert [lv.shape for lv in s.levels] == [(600, 800), (300, 400)]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 800, 600), img)  # lossless
        np.testing.assert_array_equal(s.read_region(1, 10, 20, 30, 40),
                                      img[::2, ::2][20:60, 10:40])
