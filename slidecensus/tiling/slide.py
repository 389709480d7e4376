"""Lazy access to whole-slide images: one :class:`Slide` over three small backends.

* TIFF family (SVS, generic pyramidal TIFF, OME-TIFF, NDPI where tifffile reads it):
  tifffile. Levels are exposed as Zarr arrays through tifffile's Zarr store, and
  ``read_region`` decodes the native tiles it needs directly (positional reads of the
  compressed bytes plus an LRU cache of decoded tiles), which keeps reads close to the
  raw decode rate.
* Other vendor formats (MRXS, SCN, VMS, BIF, ...): OpenSlide, behind a Zarr store.
* PNG / JPEG / other plain images: one level, decoded on first read.

Nothing is decoded when a slide is opened. ``Slide`` pickles as (path, mpp, backend), so
tasks can carry it to workers, which reopen the file (file handles do not pickle).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptSlideError, SlideNotFoundError, SlideReadError, UnsupportedFormatError

if TYPE_CHECKING:  # zarr is imported where a level is opened as an array: it costs about
    import zarr  # 0.2 s, which a plain image read (`slidecensus segment x.png`) never needs

log = logging.getLogger(__name__)

#: Plausible range of µm/px for bright-field microscopy (100x oil to 1x macro).
MPP_RANGE = (0.01, 100.0)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PLAIN_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Level:
    """One pyramid level: ``shape`` = (height, width), ``downsample`` relative to level 0."""

    shape: tuple[int, int]
    downsample: float


def to_rgb8(array: np.ndarray, source: str = "image",
            notes: set[str] | None = None) -> np.ndarray:
    """Convert a decoded image to uint8 RGB (h, w, 3), warning about what was converted.

    Grayscale is replicated, alpha is composited over white, 16-bit and float data are
    rescaled to 8 bits. Anything else (e.g. CMYK, multi-channel fluorescence) is refused.
    The conversions made are also added to ``notes`` when given (a backend keeps them, so
    the census can report them in ``slides.csv`` whichever process decoded the pixels).
    """
    a = np.asarray(array)
    done = []
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar -> interleaved
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
            done.append("16-bit -> 8-bit")
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
            done.append("binary -> 8-bit")
        elif np.issubdtype(a.dtype, np.floating):
            hi = 1.0 if np.nanmax(a) <= 1.0 else 255.0
            a = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
            done.append(f"{array.dtype} -> 8-bit")
        elif np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            scale = 255.0 / max(int(a.max()) if a.size else 1, 1) if info.max > 65535 else 1 / 257
            a = np.clip(a * scale, 0, 255).astype(np.uint8)
            done.append(f"{array.dtype} -> 8-bit")
        else:
            raise UnsupportedFormatError(source, f"unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
        done.append("grayscale -> RGB")
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
        done.append("grayscale -> RGB")
    elif a.ndim == 3 and a.shape[2] == 2:  # gray + alpha
        g, alpha = a[..., 0].astype(np.float32), a[..., 1:2].astype(np.float32) / 255
        a = np.repeat((g[..., None] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8), 3, 2)
        done.append("grayscale+alpha -> RGB over white")
    elif a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:4]
        if alpha.min() < 255:
            f = alpha.astype(np.float32) / 255
            a = (a[..., :3] * f + 255 * (1 - f) + 0.5).astype(np.uint8)
        else:
            a = a[..., :3]
        done.append("RGBA -> RGB over white")
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise UnsupportedFormatError(
            source, f"cannot interpret pixel layout {array.shape} {array.dtype} as RGB"
        )
    if done:
        warnings.warn(f"{source}: converted {', '.join(done)}", stacklevel=2)
        if notes is not None:
            notes.add(f"converted {', '.join(done)}")
    return np.ascontiguousarray(a)


def check_mpp(mpp: float | None, path: str | Path) -> float | None:
    """Validate a µm/px value (None passes through)."""
    if mpp is None:
        return None
    mpp = float(mpp)
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise SlideReadError(path, f"implausible µm/px {mpp!r} (expected {MPP_RANGE[0]} to "
                                   f"{MPP_RANGE[1]})")
    return mpp


class SlideBackend(ABC):
    """What a reader must provide; :class:`Slide` adds bounds handling and conveniences."""

    name: str = "?"
    format: str = "?"
    levels: tuple[Level, ...]
    mpp: float | None
    #: native tile (chunk) edge of each level, in pixels
    chunks: tuple[int, ...]
    #: pixel conversions made so far (e.g. "converted grayscale -> RGB"); set by backends
    notes: set[str]

    @abstractmethod
    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return uint8 (h, w, 3) for a window that lies inside the level."""

    @abstractmethod
    def level_array(self, level: int) -> zarr.Array:
        """The level as a lazy, read-only Zarr array (h, w, 3)."""

    def associated_names(self) -> tuple[str, ...]:
        return ()

    def associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


# --------------------------------------------------------------------------- TIFF


def _tiff_mpp(tif: Any, page: Any) -> float | None:
    """µm/px of level 0 from Aperio, OME, NDPI or plain resolution tags."""
    desc = page.description or ""
    if tif.is_svs or desc.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return float(m.group(1))
    if tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.pages[0].description or "")
        if m:
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.pages[0].description or "")
            value = float(m.group(1))
            scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(
                unit.group(1) if unit else "µm", 1.0)
            return value * scale
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):
            px_per_unit = num / den
            um_per_unit = 25400.0 if unit == 2 else 10000.0
            mpp = um_per_unit / px_per_unit
            if MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                return mpp
    return None


def _diagnose_tiff(path: Path, exc: BaseException | None) -> str:
    """A one-line reason why tifffile could not open ``path``."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    try:
        order = "<" if head[:2] == b"II" else ">"
        if head[2:4] in (b"*\x00", b"\x00*"):
            first = struct.unpack(order + "I", head[4:8])[0]
        else:
            first = struct.unpack(order + "Q", head[8:16])[0]
    except struct.error:
        return f"truncated TIFF: only {size} bytes, the header is incomplete"
    if first >= size:
        return (f"truncated TIFF: the first image directory (byte {first}) lies past the end "
                f"of the file ({size} bytes)")
    if exc is None:
        return "TIFF holds no readable image"
    return f"unreadable TIFF: {type(exc).__name__}: {exc}".splitlines()[0]


class _TileCache:
    """Thread-safe LRU cache of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
            return v

    def put(self, key: tuple[int, int], value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.nbytes


class _TiledPage:
    """Direct tile decoding for one tiled, contiguous, 8-bit TIFF page."""

    def __init__(self, page: Any, level: int, fd: int, file_size: int, path: str,
                 notes: set[str] | None = None) -> None:
        self.page = page
        self.notes = notes
        self.level = level
        self.fd = fd
        self.path = path
        self.th, self.tw = page.tilelength, page.tilewidth
        self.h, self.w = page.imagelength, page.imagewidth
        self.cols = -(-self.w // self.tw)
        self.rows = -(-self.h // self.th)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.spp = page.samplesperpixel
        self._decode = page.decode
        self._tables = getattr(page, "jpegtables", None)
        if len(self.offsets) < self.rows * self.cols or len(self.counts) != len(self.offsets):
            raise CorruptSlideError(
                path, f"inconsistent TIFF: level {level} declares {self.w} x {self.h} px "
                      f"({self.rows * self.cols} tiles) but holds {len(self.offsets)} tile "
                      f"offsets")
        for i, (off, n) in enumerate(zip(self.offsets, self.counts, strict=True)):
            if n and off + n > file_size:
                raise CorruptSlideError(
                    path, f"truncated TIFF: tile {i} of level {level} ends past the end of the "
                          f"file ({off + n} > {file_size} bytes)")

    def tile(self, index: int) -> np.ndarray:
        """Decode one tile to uint8 (th, tw, 3); a missing (0-byte) tile reads as white."""
        n = self.counts[index]
        if n == 0:
            return np.full((self.th, self.tw, 3), 255, np.uint8)
        data = os.pread(self.fd, n, self.offsets[index])
        if len(data) != n:
            raise CorruptSlideError(self.path, f"truncated TIFF: tile {index} of level "
                                               f"{self.level} is cut short")
        try:
            seg, _, _ = self._decode(data, index, jpegtables=self._tables)
        except Exception as exc:  # codec errors come in many types
            x, y = (index % self.cols) * self.tw, (index // self.cols) * self.th
            raise CorruptSlideError(
                self.path, f"corrupt tile {index} of level {self.level} (x={x}, y={y} px): "
                           f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        if seg is None:
            return np.full((self.th, self.tw, 3), 255, np.uint8)
        seg = np.asarray(seg).reshape(self.th, self.tw, -1)
        if seg.shape[2] != 3 or seg.dtype != np.uint8:
            seg = to_rgb8(seg, self.path, self.notes)
        return seg


class TiffBackend(SlideBackend):
    """TIFF-family slides through tifffile; tiles decoded directly, levels as Zarr."""

    name = "tifffile"

    def __init__(self, path: Path, cache_bytes: int = 96 << 20) -> None:
        import tifffile

        self.path = path
        self.notes = set()
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as exc:
            raise CorruptSlideError(path, _diagnose_tiff(path, exc)) from None
        if not levels or not levels[0].pages:
            raise CorruptSlideError(path, _diagnose_tiff(path, None))
        tif = self._tif
        self.format = ("svs" if tif.is_svs else "ome-tiff" if tif.is_ome else
                       "ndpi" if tif.is_ndpi else "tiff")
        self._series = series
        shapes = []
        for lv in levels:
            shp = tuple(int(s) for s in lv.shape if s != 1 or len(lv.shape) <= 2)
            if len(shp) == 3 and shp[0] in (3, 4) and shp[2] not in (3, 4):
                shp = (shp[1], shp[2], shp[0])
            if len(shp) not in (2, 3):
                raise UnsupportedFormatError(path, f"unsupported TIFF layout {lv.shape} "
                                                   f"(axes {lv.axes})")
            shapes.append(shp[:2])
        base = shapes[0]
        self.levels = tuple(
            Level((h, w), float(np.mean([base[0] / h, base[1] / w]))) for h, w in shapes
        )
        self.mpp = _tiff_mpp(tif, levels[0].pages[0] if levels[0].pages else tif.pages[0])
        self._fd = os.open(path, os.O_RDONLY)
        file_size = os.fstat(self._fd).st_size
        self._pages: list[_TiledPage | None] = []
        chunks = []
        for i, lv in enumerate(levels):
            page = lv.pages[0] if len(lv.pages) == 1 else None
            fast = (
                page is not None and page.is_tiled and page.bitspersample == 8
                and page.planarconfig == 1 and page.samplesperpixel in (1, 3, 4)
                and page.imagedepth == 1 and not getattr(page, "is_ndpi", False)
            )
            tp = (_TiledPage(page, i, self._fd, file_size, str(path), self.notes) if fast
                  else None)
            self._pages.append(tp)
            chunks.append(page.tilewidth if page is not None and page.is_tiled else 512)
        self.chunks = tuple(chunks)
        self._caches = [_TileCache(cache_bytes) for _ in levels]
        self._arrays: dict[int, zarr.Array] = {}

    def level_array(self, level: int) -> zarr.Array:
        if level not in self._arrays:
            import zarr

            store = self._series.aszarr(level=level)
            self._arrays[level] = zarr.open_array(store, mode="r")
        return self._arrays[level]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tp = self._pages[level]
        if tp is None:  # stripped, planar, NDPI...: through the Zarr store
            try:
                a = self.level_array(level)
                sel = a[y : y + h, x : x + w] if a.ndim >= 2 else a
            except Exception as exc:
                raise CorruptSlideError(self.path, f"failed reading level {level}: "
                                                   f"{type(exc).__name__}: {exc}") from None
            return to_rgb8(np.asarray(sel), str(self.path), self.notes)
        out = np.empty((h, w, 3), np.uint8)
        cache = self._caches[level]
        r0, r1 = y // tp.th, (y + h - 1) // tp.th
        c0, c1 = x // tp.tw, (x + w - 1) // tp.tw
        for r in range(r0, r1 + 1):
            ty = r * tp.th
            ya, yb = max(y, ty), min(y + h, ty + tp.th)
            for c in range(c0, c1 + 1):
                tx = c * tp.tw
                xa, xb = max(x, tx), min(x + w, tx + tp.tw)
                idx = r * tp.cols + c
                inner = ya == ty and yb == ty + tp.th and xa == tx and xb == tx + tp.tw
                t = cache.get((idx, 0))
                if t is None:
                    t = tp.tile(idx)
                    if not inner:  # tiles fully used now are unlikely to be read again
                        cache.put((idx, 0), t)
                out[ya - y : yb - y, xa - x : xb - x] = t[ya - ty : yb - ty, xa - tx : xb - tx]
        return out

    def associated_names(self) -> tuple[str, ...]:
        return tuple(s.name.lower() for s in self._tif.series[1:] if s.name)

    def associated(self, name: str) -> np.ndarray:
        for s in self._tif.series[1:]:
            if s.name and s.name.lower() == name:
                return to_rgb8(s.asarray(), f"{self.path} [{name}]")
        raise KeyError(name)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()


# ------------------------------------------------------------------------ OpenSlide


class OpenSlideBackend(SlideBackend):
    """Vendor formats through OpenSlide (the openslide-bin wheel ships the library)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise UnsupportedFormatError(path, "not a slide format OpenSlide recognises") from None
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(path, f"OpenSlide cannot read it: {exc}") from None
        self.path = path
        self.notes = set()
        props = self._osr.properties
        self.format = props.get("openslide.vendor", "openslide")
        self.levels = tuple(
            Level((int(h), int(w)), float(d))
            for (w, h), d in zip(self._osr.level_dimensions, self._osr.level_downsamples,
                                 strict=True)
        )
        mpp = props.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        tw = props.get("openslide.level[0].tile-width")
        self.chunks = tuple(
            int(props.get(f"openslide.level[{i}].tile-width", tw or 512)) for i in
            range(len(self.levels))
        )
        self._lock = threading.Lock()

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self.levels[level].downsample
        try:
            with self._lock:  # an OpenSlide handle is thread-safe, but errors are sticky
                im = self._osr.read_region((int(round(x * ds)), int(round(y * ds))), level,
                                           (w, h))
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(self.path, f"OpenSlide failed reading level {level} at "
                                               f"({x}, {y}): {exc}") from None
        rgba = np.asarray(im)
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        f = alpha.astype(np.float32) / 255  # OpenSlide gives un-premultiplied RGBA
        return (rgba[..., :3] * f + 255 * (1 - f) + 0.5).astype(np.uint8)

    def level_array(self, level: int) -> zarr.Array:
        import zarr

        from .store import RegionStore

        store = RegionStore(lambda x, y, w, h: self.read(level, x, y, w, h),
                            self.levels[level].shape, chunk=self.chunks[level])
        return zarr.open_array(store, mode="r")

    def associated_names(self) -> tuple[str, ...]:
        return tuple(self._osr.associated_images.keys())

    def associated(self, name: str) -> np.ndarray:
        return to_rgb8(np.asarray(self._osr.associated_images[name]),
                       f"{self.path} [{name}]")

    def close(self) -> None:
        self._osr.close()


# ------------------------------------------------------------------------- plain


class ImageBackend(SlideBackend):
    """PNG, JPEG and other plain images as a single level, decoded on first read."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notes = set()
        self.format = path.suffix.lower().lstrip(".") or "image"
        try:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                self._mode = im.mode
        except Exception as exc:
            raise UnsupportedFormatError(path, f"not a readable image: {exc}") from None
        if w < 1 or h < 1:
            raise CorruptSlideError(path, f"image has no pixels ({w} x {h})")
        if self._mode in ("CMYK", "YCbCr", "LAB", "HSV") or self._mode.startswith("P;"):
            raise UnsupportedFormatError(path, f"unsupported colour mode {self._mode}; save "
                                               f"it as RGB")
        self.levels = (Level((h, w), 1.0),)
        self.mpp = None
        self.chunks = (512,)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                import imagecodecs

                try:
                    try:  # imagecodecs keeps 16-bit PNG samples; PIL is the fallback
                        data = imagecodecs.imread(self.path)
                    except Exception:
                        from PIL import Image

                        with Image.open(self.path) as im:
                            data = np.asarray(im)
                except Exception as exc:
                    raise CorruptSlideError(self.path, f"cannot decode image: "
                                                       f"{type(exc).__name__}: {exc}") from None
                if data.ndim == 2 and self._mode == "P":
                    from PIL import Image

                    with Image.open(self.path) as im:
                        data = np.asarray(im.convert("RGB"))
                self._pixels = to_rgb8(data, str(self.path), self.notes)
            return self._pixels

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._load()[y : y + h, x : x + w].copy()

    def level_array(self, level: int) -> zarr.Array:
        import zarr

        from .store import RegionStore

        store = RegionStore(lambda x, y, w, h: self.read(level, x, y, w, h),
                            self.levels[0].shape, chunk=self.chunks[0])
        return zarr.open_array(store, mode="r")


# ------------------------------------------------------------------------- Slide


def _sniff(path: Path) -> str:
    """Decide the backend from the file's first bytes (extensions lie)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in _TIFF_MAGIC:
        return "tifffile"
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return "image"
    return "openslide"


class Slide:
    """A whole-slide image with lazy levels; open it with :func:`open_slide`.

    Attributes
    ----------
    path : the file.
    mpp : µm per pixel at level 0 (from metadata, or the override), None when unknown.
    levels : pyramid levels, finest first.
    format : e.g. ``svs``, ``tiff``, ``ome-tiff``, ``aperio`` (OpenSlide vendor), ``png``.
    backend : ``tifffile``, ``openslide`` or ``image``.
    """

    def __init__(self, backend: SlideBackend, path: Path, mpp: float | None,
                 requested_backend: str | None) -> None:
        self._backend = backend
        self.path = path
        self.mpp = mpp
        self._requested = requested_backend

    # -- pickling: ship the recipe, not the file handle
    def __reduce__(self):
        return (_reopen, (str(self.path), self.mpp, self._requested))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.shape
        return (f"Slide({str(self.path)!r}, {w}x{h}, levels={len(self.levels)}, "
                f"mpp={self.mpp}, backend={self.backend!r})")

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._backend.levels

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.levels[0].shape

    @property
    def format(self) -> str:
        return self._backend.format

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def conversions(self) -> tuple[str, ...]:
        """Pixel conversions made while reading so far (e.g. ``converted grayscale -> RGB``);
        each also raised a warning. Empty for plain 8-bit RGB slides."""
        return tuple(sorted(getattr(self._backend, "notes", ())))

    def tile_size(self, level: int = 0) -> int:
        """Native tile (chunk) edge of a level, in pixels."""
        return self._backend.chunks[level]

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range: {self.path} has "
                             f"{len(self.levels)} levels")

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a (h, w, 3) uint8 window at ``level`` (x, y in that level's pixels).

        Parts of the window outside the image read as white (glass).
        """
        self._check_level(level)
        if w < 0 or h < 0:
            raise ValueError(f"region size must be non-negative, got w={w} h={h}")
        H, W = self.levels[level].shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._backend.read(level, x, y, w, h)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._backend.read(level, x0, y0,
                                                                       x1 - x0, y1 - y0)
        return out

    def level_array(self, level: int = 0) -> zarr.Array:
        """A lazy, read-only Zarr array (h, w, 3) of one level; nothing decoded yet."""
        self._check_level(level)
        return self._backend.level_array(level)

    def to_dask(self, level: int = 0, chunk: int | None = None) -> Any:
        """A dask array view (h, w, 3) of a level, chunked on the native tiles.

        Each chunk is a task carrying only (path, level, window); workers reopen the slide.
        """
        import dask.array as da

        self._check_level(level)
        c = chunk or self.tile_size(level)
        H, W = self.levels[level].shape
        chunks = (tuple(min(c, H - y) for y in range(0, H, c)),
                  tuple(min(c, W - x) for x in range(0, W, c)), (3,))
        recipe = (str(self.path), self.mpp, self._requested)
        return da.map_blocks(
            _read_block, recipe, level, c, dtype=np.uint8, chunks=chunks,
            name=f"slide-{abs(hash((recipe, level, c))):x}", meta=np.empty((0, 0, 0), np.uint8),
        )

    def best_level(self, downsample: float) -> int:
        """The finest level whose downsample does not exceed ``downsample`` (+1% slack)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.01:
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An RGB overview whose long side is at most ``max_size`` pixels."""
        H, W = self.shape
        target = max(H, W) / max_size
        level = self.best_level(target)
        lh, lw = self.levels[level].shape
        region = self.read_region(level, 0, 0, lw, lh)
        scale = max(lh, lw) / max_size
        if scale <= 1:
            return region
        from skimage.transform import resize

        out_shape = (max(1, round(lh / scale)), max(1, round(lw / scale)))
        return (resize(region, out_shape, order=1, anti_aliasing=True,
                       preserve_range=True) + 0.5).astype(np.uint8)

    @property
    def associated_images(self) -> tuple[str, ...]:
        """Names of associated images (label, macro, thumbnail) where the format has them."""
        return self._backend.associated_names()

    def associated_image(self, name: str) -> np.ndarray:
        """Decode one associated image to RGB."""
        return self._backend.associated(name)

    def describe(self) -> str:
        """A human-readable summary (used by ``slidecensus info``)."""
        lines = [f"{self.path}", f"  format {self.format} via {self.backend}",
                 f"  µm/px  {self.mpp if self.mpp is not None else 'unknown'}"]
        for i, lv in enumerate(self.levels):
            lines.append(f"  level {i}: {lv.shape[1]} x {lv.shape[0]} px, downsample "
                         f"{lv.downsample:g}, tile {self.tile_size(i)}")
        if self.associated_images:
            lines.append(f"  associated: {', '.join(self.associated_images)}")
        return "\n".join(lines)

    def close(self) -> None:
        self._backend.close()


def open_slide(path: str | os.PathLike, mpp: float | None = None,
               backend: str | None = None) -> Slide:
    """Open a slide or image lazily.

    Parameters
    ----------
    path : the file.
    mpp : µm/px of level 0; overrides the file's metadata (needed for plain images).
    backend : force ``"tifffile"``, ``"openslide"`` or ``"image"``; by default chosen from
        the file's magic bytes (TIFF family → tifffile, PNG/JPEG → image, else OpenSlide).

    Raises
    ------
    SlideNotFoundError, UnsupportedFormatError, CorruptSlideError (all ``SlideReadError``).
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file")
    if p.is_dir():
        if p.suffix.lower() == ".zarr":
            raise UnsupportedFormatError(p, "Zarr folders are not slides (yet)")
        raise SlideNotFoundError(p, "is a folder, expected a slide file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise SlideReadError(p, f"cannot stat: {exc.strerror}") from None
    if size == 0:
        raise CorruptSlideError(p, "empty file (0 bytes)")
    try:
        kind = backend or _sniff(p)
    except OSError as exc:
        raise SlideReadError(p, f"cannot read: {exc.strerror}") from None
    makers: dict[str, Callable[[Path], SlideBackend]] = {
        "tifffile": TiffBackend, "openslide": OpenSlideBackend, "image": ImageBackend,
    }
    if kind not in makers:
        raise ValueError(f"backend must be one of {sorted(makers)}, got {kind!r}")
    if kind == "openslide" and backend is None:
        import openslide

        if openslide.OpenSlide.detect_format(str(p)) is None:
            if p.suffix.lower() in _PLAIN_EXT | {".tif", ".tiff", ".svs", ".ndpi"}:
                raise CorruptSlideError(p, f"not a valid {p.suffix.lstrip('.').upper()} file "
                                           f"(unrecognised content)")
            raise UnsupportedFormatError(p, "unrecognised format (not TIFF, PNG, JPEG or a "
                                            "format OpenSlide reads)")
    impl = makers[kind](p)
    try:
        meta_mpp = check_mpp(impl.mpp, p) if impl.mpp is not None else None
    except SlideReadError:
        log.warning("%s: ignoring implausible µm/px %r in metadata", p, impl.mpp)
        meta_mpp = None
    chosen = check_mpp(mpp, p) if mpp is not None else meta_mpp
    return Slide(impl, p, chosen, backend)


def _reopen(path: str, mpp: float | None, backend: str | None) -> Slide:
    return open_slide(path, mpp=mpp, backend=backend)


# Per-process cache of open slides for dask chunk tasks (workers reopen by path).
_OPEN: OrderedDict[tuple, Slide] = OrderedDict()
_OPEN_LOCK = threading.Lock()


def cached_slide(path: str, mpp: float | None = None, backend: str | None = None,
                 max_open: int = 8) -> Slide:
    """Open ``path`` once per process and reuse it (bounded LRU of open slides)."""
    key = (path, mpp, backend)
    with _OPEN_LOCK:
        s = _OPEN.get(key)
        if s is not None:
            _OPEN.move_to_end(key)
            return s
    s = open_slide(path, mpp=mpp, backend=backend)
    with _OPEN_LOCK:
        _OPEN[key] = s
        while len(_OPEN) > max_open:
            _, old = _OPEN.popitem(last=False)
            old.close()
    return s


def _read_block(recipe: tuple, level: int, chunk: int, block_info: Any = None) -> np.ndarray:
    info = block_info[None]
    (y0, y1), (x0, x1), _ = info["array-location"]
    slide = cached_slide(*recipe)
    return slide.read_region(level, x0, y0, x1 - x0, y1 - y0)
