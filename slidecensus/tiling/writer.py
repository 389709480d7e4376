"""Pyramidal tiled TIFF writer (JPEG tiles, µm/px in the resolution tags).

Slides of any size are written tile by tile from a *source*, a picklable callable that
renders one level-0 region, so memory stays flat: level 0 is streamed straight into the
file and each coarser level is accumulated, already downsampled, in a temporary on-disk Zarr array.
The files open in tifffile and in OpenSlide (its ``generic-tiff`` format, which reads the
levels as separate directories and the µm/px from XResolution/YResolution in cm).
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from ..errors import InvalidInputError

RegionSource = Callable[[int, int, int, int], np.ndarray]
"""``source(x, y, w, h) -> uint8 array (h, w, 3)`` rendering a level-0 region."""

SOFTWARE = "slidecensus"


class ArraySource:
    """A :data:`RegionSource` over an in-memory (or memory-mapped) RGB array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __call__(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.asarray(self.array[y : y + h, x : x + w, :3])


def downsample2(tile: np.ndarray) -> np.ndarray:
    """Halve an (h, w, 3) uint8 image by 2 x 2 box averaging (odd edges replicate)."""
    h, w = tile.shape[:2]
    if h % 2 or w % 2:
        tile = np.pad(tile, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    t = tile.astype(np.uint16)
    s = t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def _render_tile(
    source: RegionSource, x: int, y: int, w: int, h: int, tile_size: int, quality: int
) -> tuple[bytes, np.ndarray]:
    """Render one tile: JPEG bytes of the padded tile, and its 2x-downsampled pixels."""
    region = np.asarray(source(x, y, w, h))
    if region.shape != (h, w, 3) or region.dtype != np.uint8:
        raise InvalidInputError(
            f"source returned {region.dtype} {region.shape} for region "
            f"x={x} y={y} w={w} h={h}; expected uint8 {(h, w, 3)}"
        )
    padded = np.full((tile_size, tile_size, 3), 255, np.uint8)
    padded[:h, :w] = region
    return imagecodecs.jpeg8_encode(padded, level=quality), downsample2(region)


def _tile_windows(shape: tuple[int, int], tile_size: int) -> list[tuple[int, int, int, int]]:
    height, width = shape
    return [
        (x, y, min(tile_size, width - x), min(tile_size, height - y))
        for y in range(0, height, tile_size)
        for x in range(0, width, tile_size)
    ]


def _iter_rendered(
    source: RegionSource,
    shape: tuple[int, int],
    tile_size: int,
    quality: int,
    client: Any | None,
    prefetch: int,
) -> Iterator[tuple[tuple[int, int, int, int], bytes, np.ndarray]]:
    """Yield rendered tiles in row-major order, computed locally or on a Dask client."""
    windows = _tile_windows(shape, tile_size)
    if client is None:
        for win in windows:
            data, half = _render_tile(source, *win, tile_size, quality)
            yield win, data, half
        return
    # Bounded window of futures: the client never holds more than `prefetch` tiles.
    [source_future] = client.scatter([source], broadcast=True)
    pending: deque = deque()
    it = iter(windows)
    for win in it:
        pending.append((win, client.submit(_render_tile, source_future, *win, tile_size,
                                           quality, pure=False)))
        if len(pending) >= prefetch:
            break
    while pending:
        win, fut = pending.popleft()
        data, half = fut.result()
        fut.release()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, client.submit(_render_tile, source_future, *nxt,
                                               tile_size, quality, pure=False)))
        yield win, data, half


def write_pyramid_tiff(
    path: str | os.PathLike,
    source: RegionSource | np.ndarray,
    shape: tuple[int, int] | None = None,
    *,
    mpp: float,
    tile_size: int = 512,
    quality: int = 90,
    min_level_size: int = 512,
    description: str = "",
    client: Any | None = None,
    prefetch: int = 64,
) -> Path:
    """Write a pyramidal tiled TIFF with JPEG tiles and µm/px metadata.

    Parameters
    ----------
    path : output file (BigTIFF); written to ``path + '.part'`` then renamed, so a crash
        never leaves a file that looks complete.
    source : a :data:`RegionSource` (picklable when ``client`` is given) or an RGB array.
    shape : (height, width) of level 0; taken from ``source`` when it is an array.
    mpp : µm per pixel of level 0.
    tile_size : tile edge in pixels (multiple of 16).
    quality : JPEG quality (1-100).
    min_level_size : stop adding 2x-downsampled levels once the long side is at most this.
    client : optional ``distributed.Client``; tiles are then rendered and encoded on workers.

    Returns
    -------
    The path written.
    """
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] < 3 or source.dtype != np.uint8:
            raise InvalidInputError(f"expected a uint8 (h, w, 3) array, got {source.dtype} "
                                    f"{source.shape}")
        shape = source.shape[:2] if shape is None else shape
        source = ArraySource(source)
    if shape is None:
        raise InvalidInputError("shape=(height, width) is required with a callable source")
    height, width = (int(shape[0]), int(shape[1]))
    if height < 1 or width < 1:
        raise InvalidInputError(f"slide shape must be positive, got {shape}")
    if tile_size % 16 or tile_size < 16:
        raise InvalidInputError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not mpp > 0:
        raise InvalidInputError(f"mpp must be positive, got {mpp}")

    path = Path(path)
    part = path.with_name(path.name + ".part")
    res = 1e4 / mpp  # pixels per cm
    common = dict(
        dtype=np.uint8, tile=(tile_size, tile_size), photometric="rgb", compression="jpeg",
        resolutionunit="CENTIMETER", metadata=None, software=SOFTWARE,
    )
    import zarr  # lazily: importing the tiling package must not pay for zarr

    with tempfile.TemporaryDirectory(prefix="slidecensus-pyramid-") as tmp:
        with tifffile.TiffWriter(part, bigtiff=True) as tw:
            level_shape = (height, width)
            level_source: RegionSource = source
            level = 0
            level_client = client
            while True:
                down_shape = ((level_shape[0] + 1) // 2, (level_shape[1] + 1) // 2)
                more = max(level_shape) > min_level_size and min(down_shape) >= 1
                buffer = None
                if more:
                    # The next level is accumulated in an on-disk Zarr array (not a memmap,
                    # whose pages would count as resident memory): one chunk per half tile.
                    half = tile_size // 2
                    buffer = zarr.create_array(
                        store=os.path.join(tmp, f"level{level + 1}.zarr"),
                        shape=(*down_shape, 3), chunks=(half, half, 3), dtype=np.uint8,
                        compressors=None, fill_value=255, zarr_format=3,
                    )

                def tiles(buffer=buffer, level_source=level_source, level_shape=level_shape,
                          level_client=level_client) -> Iterator[bytes]:
                    for (x, y, _w, _h), data, half in _iter_rendered(
                        level_source, level_shape, tile_size, quality, level_client, prefetch
                    ):
                        if buffer is not None:
                            buffer[y // 2 : y // 2 + half.shape[0],
                                   x // 2 : x // 2 + half.shape[1]] = half
                        yield data

                scale = 2**level
                tw.write(
                    tiles(), shape=(*level_shape, 3), resolution=(res / scale, res / scale),
                    subfiletype=0 if level == 0 else 1,
                    description=(description or None) if level == 0 else None,
                    **common,
                )
                if buffer is None:
                    break
                level_shape = down_shape
                level_source = ArraySource(buffer)
                level_client = None  # coarser levels are small: encode them here
                level += 1
    os.replace(part, path)
    return path
