"""A corpus of bad (and awkward but valid) inputs, generated on the fly, never committed.

Each :class:`Case` is one row of a cohort: a file made here (or a path that must not exist),
what a cohort run must record for it (``status`` and a regular expression the one-line
``error`` must match) and, for files the reader can open, the typed error
:func:`slidecensus.tiling.open_slide` (plus a full read) must raise.

``python -m tests.reliability.corpus DIR`` builds the corpus in DIR, runs the census on it
and prints the table of ``docs/reliability.md`` (the actual messages).
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from slidecensus.engine.plan import CensusParams
from slidecensus.errors import CorruptSlideError, SlideNotFoundError, UnsupportedFormatError
from slidecensus.tiling import open_slide, write_pyramid_tiff
from slidecensus.tiling.synth import synth_cohort

#: µm/px of the synthetic slides: the default of files without µm/px (PNG), so a PNG made
#: from the good slide's pixels is segmented at the same scale and must give the same cells.
MPP = 0.25
SIZE = (1024, 1024)  # (height, width): small, four 512-px native tiles on level 0
#: census parameters of the corpus runs: 512-px tiles, so the small slides have several
PARAMS = CensusParams(tile_size=512)
#: a name no shell may act on: if anything ran a cohort path through a shell, this file
#: would appear beside the corpus
PWNED = "PWNED"


@dataclass(frozen=True)
class Case:
    """One cohort row of the corpus and what must happen to it."""

    slide_id: str
    what: str  # the bad input, in words (a row of the documented table)
    status: str  # "ok" or "failed" in slides.csv
    error: str = ""  # regex the slides.csv error must match (failed rows)
    open_error: type[Exception] | None = None  # open_slide + full read raise this
    open_match: str = ""  # regex on that error's message
    warning: str = ""  # regex on the slides.csv warning column (ok rows)
    same_cells_as_good: bool = False  # same pixels as the good slide: same census


@dataclass(frozen=True)
class Corpus:
    """The built corpus: its folder, cohort CSV, cases and the good slide."""

    root: Path
    csv: Path
    cases: tuple[Case, ...]
    good: Path
    paths: dict[str, Path]


def _good_pixels(good: Path) -> np.ndarray:
    with open_slide(good) as s:
        return s.read_region(0, 0, 0, SIZE[1], SIZE[0])


def wide_slide(pixels: np.ndarray, dst: Path) -> None:
    """A 512 x 4096 pyramid (the middle rows of ``pixels`` side by side four times): wide
    enough that the thumbnail and the stain sample come from coarser levels, so a damaged
    level-0 tile is met only by the tile tasks."""
    strip = pixels[256:768]
    write_pyramid_tiff(dst, np.concatenate([strip] * 4, axis=1), mpp=MPP, tile_size=512)


def corrupt_tile_in_tissue(src: Path, dst: Path) -> tuple[int, tuple[int, int]]:
    """Copy ``src`` with the level-0 tile holding the most tissue overwritten by garbage
    (same length, so every offset stays valid); returns (tile index, (x, y) px of its corner).
    """
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        tw, tl = page.tilewidth, page.tilelength
        cols = -(-page.imagewidth // tw)
    with open_slide(src) as s:
        img = s.read_region(0, 0, 0, s.shape[1], s.shape[0])
    darkness = [float((255 - img[r * tl:(r + 1) * tl, c * tw:(c + 1) * tw]).mean())
                for r in range(-(-img.shape[0] // tl)) for c in range(cols)]
    idx = int(np.argmax(darkness))
    data = bytearray(src.read_bytes())
    off, n = offsets[idx], counts[idx]
    # keep the JPEG start-of-image marker, garble the rest: the decoder must fail
    noise = np.random.default_rng(1).integers(0, 256, n - 2, dtype=np.uint8).tobytes()
    data[off + 2 : off + n] = noise
    dst.write_bytes(bytes(data))
    return idx, ((idx % cols) * tw, (idx // cols) * tl)


def truncate_mid_tile(src: Path, dst: Path, tile: int) -> None:
    """Copy ``src`` cut in the middle of level-0 tile ``tile``."""
    with tifffile.TiffFile(src) as tif:
        off, n = tif.pages[0].dataoffsets[tile], tif.pages[0].databytecounts[tile]
    dst.write_bytes(src.read_bytes()[: off + n // 2])


def huge_declared_size(dst: Path) -> None:
    """A tiled TIFF whose header declares 100000 x 100000 px backed by one 256-px tile."""
    with tifffile.TiffWriter(dst, bigtiff=True) as tw:
        tw.write(np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), compression="jpeg",
                 photometric="rgb")
    data = bytearray(dst.read_bytes())
    with tifffile.TiffFile(dst) as tif:
        tags = tif.pages[0].tags
        places = [(tags[t].valueoffset, tags[t].dtype) for t in ("ImageWidth", "ImageLength")]
    for offset, dtype in places:
        fmt = {16: "<Q", 4: "<I"}.get(int(dtype), "<H")
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, 100000)
    dst.write_bytes(bytes(data))


def dense_nuclei(shape: tuple[int, int], spacing_px: int = 12, radius_px: float = 4.0,
                 seed: int = 0) -> np.ndarray:
    """An RGB field packed with separate round nuclei (H&E colours of the synthetic slides):
    at 0.5 µm/px, one nucleus of 12.6 µm² every 6 µm, as dense as nuclei of about the
    smallest counted size can lie and still be told apart."""
    from scipy import ndimage as ndi

    h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = (yy // spacing_px) * spacing_px + spacing_px / 2
    cx = (xx // spacing_px) * spacing_px + spacing_px / 2
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    a = ndi.gaussian_filter(np.clip(radius_px + 0.5 - r, 0, 1), 0.7)[..., None]
    nucleus, background = np.float32([87, 60, 118]), np.float32([225, 180, 215])
    img = background * (1 - a) + nucleus * a + rng.normal(0, 4, (h, w, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def build(root: Path) -> Corpus:
    """Write the corpus under ``root`` and its cohort CSV; return what was made."""
    import imagecodecs
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    synth_csv = synth_cohort(root / "synth", n_slides=1, size=SIZE, seed=3, mpp=MPP)
    good = Path(pd.read_csv(synth_csv).path[0])
    pixels = _good_pixels(good)
    d = root / "inputs"
    d.mkdir(exist_ok=True)
    paths: dict[str, Path] = {"good": good}
    makers: dict[str, Callable[[Path], None]] = {}

    def add(sid: str, name: str, make: Callable[[Path], None] | None) -> None:
        paths[sid] = d / name
        if make is not None:
            makers[sid] = make

    add("missing", "does not exist.svs", None)
    add("folder", "folder.svs", lambda p: p.mkdir())
    add("empty", "empty.svs", lambda p: p.write_bytes(b""))
    add("truncated", "truncated.tiff", lambda p: truncate_mid_tile(good, p, tile=2))
    wide = root / "wide.tiff"
    wide_slide(pixels, wide)
    paths["wide"] = wide
    add("corrupt_tile", "corrupt tile.tiff", lambda p: corrupt_tile_in_tissue(wide, p))
    add("noise", "noise.svs",
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)))
    add("text", "notes.png", lambda p: p.write_text("this is not an image\n"))
    add("one_pixel", "dot.png", lambda p: p.write_bytes(imagecodecs.png_encode(
        np.array([[[200, 100, 150]]], np.uint8))))
    add("white", "white.tiff", lambda p: write_pyramid_tiff(
        p, np.full((*SIZE, 3), 255, np.uint8), mpp=MPP, tile_size=512))
    add("gray", "gray.png", lambda p: p.write_bytes(imagecodecs.png_encode(
        (pixels.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) + 0.5).astype(
            np.uint8))))
    add("rgba", "rgba.png", lambda p: p.write_bytes(imagecodecs.png_encode(
        np.dstack([pixels, np.full(SIZE, 255, np.uint8)]))))
    add("deep", "deep.png", lambda p: p.write_bytes(imagecodecs.png_encode(
        pixels.astype(np.uint16) * 257)))
    add("cmyk", "cmyk.jpg", lambda p: Image.fromarray(pixels).convert("CMYK").save(p))
    add("huge", "huge.tiff", huge_declared_size)
    add("unicode_path", "Färbung und Ödem — 切片 1.tiff", lambda p: shutil.copy(good, p))
    add("shell_path", f"$(touch {PWNED}); `touch {PWNED}` & x.tiff",
        lambda p: shutil.copy(good, p))
    add("shell_missing", f"$(touch {PWNED}).svs", None)
    add("../../escape", "hostile id.tiff", lambda p: shutil.copy(good, p))
    for sid, make in makers.items():
        make(paths[sid])

    def name(sid: str) -> str:
        return re.escape(paths[sid].name)

    cases = (
        Case("good", "a good synthetic slide (1024 x 1024, 0.25 µm/px)", "ok"),
        Case("wide", "a good 512 x 4096 slide (the corrupt-tile slide before damage)", "ok"),
        Case("missing", "missing path", "failed", f"{name('missing')}: no such file",
             SlideNotFoundError, "no such file"),
        Case("folder", "a folder where a file is expected", "failed",
             "folder.svs: is a folder, expected a slide file", SlideNotFoundError, "folder"),
        Case("empty", "zero-byte file", "failed", r"empty.svs: empty file \(0 bytes\)",
             CorruptSlideError, "empty file"),
        Case("truncated", "TIFF cut in the middle of level-0 tile 2", "failed",
             r"truncated.tiff: truncated TIFF: ", CorruptSlideError, "truncated TIFF"),
        Case("corrupt_tile", "the 512 x 4096 slide with its level-0 tile of most tissue "
             "holding corrupt JPEG bytes", "failed",
             r"corrupt tile.tiff: tile \d+ of \d+ at \(\d+, \d+\) µm \(level-0 px \d+, \d+\) "
             r"unreadable: corrupt tile \d+ of level 0 \(x=\d+, y=\d+ px\): ",
             CorruptSlideError, r"corrupt tile \d+ of level 0"),
        Case("noise", "random bytes with a slide extension", "failed",
             r"noise.svs: not a valid SVS file", CorruptSlideError, "not a valid SVS"),
        Case("text", "a text file with an image extension", "failed",
             r"notes.png: not a valid PNG file", CorruptSlideError, "not a valid PNG"),
        Case("one_pixel", "a 1 x 1 image", "failed",
             r"dot.png: image too small for a census: 1 x 1 px"),
        Case("white", "an all-white slide (no tissue)", "ok", warning="no tissue found"),
        Case("gray", "grayscale PNG (the good slide's luminance)", "ok",
             warning=r"converted grayscale -> RGB"),
        Case("rgba", "RGBA PNG (the good slide, opaque)", "ok",
             warning=r"converted RGBA -> RGB over white",
             same_cells_as_good=True),
        Case("deep", "16-bit RGB PNG (the good slide x 257)", "ok",
             warning=r"converted 16-bit -> 8-bit",
             same_cells_as_good=True),
        Case("cmyk", "CMYK JPEG", "failed", r"cmyk.jpg: unsupported colour mode CMYK",
             UnsupportedFormatError, "CMYK"),
        Case("huge", "TIFF declaring 100000 x 100000 px backed by one 256-px tile", "failed",
             r"huge.tiff: inconsistent TIFF: level 0 declares 100000 x 100000 px",
             CorruptSlideError, "declares 100000 x 100000"),
        Case("unicode_path", "the good slide under a path with spaces and non-ASCII "
             "(`Färbung und Ödem — 切片 1.tiff`)", "ok",
             same_cells_as_good=True),
        Case("shell_path", "the good slide under a name full of shell syntax "
             "(``$(touch PWNED); `touch PWNED` & x.tiff``)", "ok",
             same_cells_as_good=True),
        Case("shell_missing", "a missing path full of shell syntax (`$(touch PWNED).svs`)",
             "failed",
             f"{name('shell_missing')}: no such file", SlideNotFoundError, "no such file"),
        Case("../../escape", "the good slide with a hostile `slide_id` (`../../escape`)", "ok",
             same_cells_as_good=True),
    )
    assert {c.slide_id for c in cases} == set(paths)
    table = pd.DataFrame({"slide_id": [c.slide_id for c in cases],
                          "path": [str(paths[c.slide_id]) for c in cases], "label": ""})
    csv = root / "cohort.csv"
    table.to_csv(csv, index=False)
    return Corpus(root, csv, cases, good, paths)


def _markdown(corpus: Corpus, table: pd.DataFrame) -> str:
    """The documented table: each input and what the run recorded for it."""
    rows = table.set_index("slide_id")
    out = ["| input | status | n_cells | error or warning (as written to `slides.csv`) |",
           "| --- | --- | --- | --- |"]
    for c in corpus.cases:
        r = rows.loc[c.slide_id]
        text = r.error if r.status != "ok" else (r.get("warning") or "")
        text = str(text if isinstance(text, str) else "").replace(str(corpus.root), "…")
        out.append(f"| {c.what} | `{r.status}` | {int(r.n_cells)} | {text} |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    from slidecensus.engine.census import run_cohort

    where = Path(sys.argv[1] if len(sys.argv) > 1 else "reliability-corpus")
    built = build(where)
    result = run_cohort(built.csv, where / "out", cluster="local:2", params=PARAMS)
    print(_markdown(built, result))
