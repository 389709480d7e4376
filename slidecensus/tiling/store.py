"""A read-only Zarr v3 store that serves one image level from a region-reading function.

tifffile already exposes TIFF levels as Zarr stores; this store gives the same lazy Zarr
view to every other backend (OpenSlide's vendor formats, plain PNG/JPEG images). Chunks
are rendered on request, so nothing is decoded until a region is read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable

import numpy as np
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype

Reader = Callable[[int, int, int, int], np.ndarray]
"""``reader(x, y, w, h) -> uint8 (h, w, 3)`` for a region inside the level."""

FILL = 255  # white: slides are bright-field, outside the image is glass


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :]
    raise TypeError(f"unsupported byte range {byte_range!r}")


class RegionStore(Store):
    """Zarr v3 array store (shape (h, w, 3), uint8) whose chunks come from ``reader``.

    Parameters
    ----------
    reader : renders a region of the level; called once per chunk.
    shape : (height, width) of the level.
    chunk : chunk edge in pixels (the native tile size of the source where it has one).
    """

    def __init__(self, reader: Reader, shape: tuple[int, int], chunk: int = 512) -> None:
        super().__init__(read_only=True)
        self._reader = reader
        self._shape = (int(shape[0]), int(shape[1]))
        self._chunk = int(chunk)
        meta = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [*self._shape, 3],
            "data_type": "uint8",
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [self._chunk, self._chunk, 3]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": FILL,
            "codecs": [{"name": "bytes"}],
            "attributes": {},
            "dimension_names": ["y", "x", "c"],
        }
        self._meta = json.dumps(meta).encode()
        self._grid = (-(-self._shape[0] // self._chunk), -(-self._shape[1] // self._chunk))

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return id(self)

    def _chunk_index(self, key: str) -> tuple[int, int] | None:
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "c" or parts[3] != "0":
            return None
        try:
            i, j = int(parts[1]), int(parts[2])
        except ValueError:
            return None
        if 0 <= i < self._grid[0] and 0 <= j < self._grid[1]:
            return i, j
        return None

    def _render(self, i: int, j: int) -> bytes:
        c = self._chunk
        y, x = i * c, j * c
        h, w = min(c, self._shape[0] - y), min(c, self._shape[1] - x)
        out = np.full((c, c, 3), FILL, np.uint8)
        out[:h, :w] = self._reader(x, y, w, h)
        return out.tobytes()

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if key == "zarr.json":
            return prototype.buffer.from_bytes(_slice(self._meta, byte_range))
        idx = self._chunk_index(key)
        if idx is None:
            return None
        return prototype.buffer.from_bytes(_slice(self._render(*idx), byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def exists(self, key: str) -> bool:
        return key == "zarr.json" or self._chunk_index(key) is not None

    @property
    def supports_writes(self) -> bool:
        return False

    @property
    def supports_deletes(self) -> bool:
        return False

    @property
    def supports_listing(self) -> bool:
        return True

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError("RegionStore is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError("RegionStore is read-only")

    def _keys(self) -> list[str]:
        return ["zarr.json"] + [
            f"c/{i}/{j}/0" for i in range(self._grid[0]) for j in range(self._grid[1])
        ]

    async def list(self) -> AsyncIterator[str]:
        for k in self._keys():
            yield k

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for k in self._keys():
            if k.startswith(prefix):
                yield k

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        seen: set[str] = set()
        for k in self._keys():
            if prefix and not k.startswith(prefix + "/"):
                continue
            head = (k[len(prefix) + 1 :] if prefix else k).split("/")[0]
            if head not in seen:
                seen.add(head)
                yield head
