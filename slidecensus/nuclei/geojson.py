"""A GeoJSON ``FeatureCollection`` written a batch of features at a time.

Both ``slidecensus segment --geojson`` (:mod:`.segment`) and the QuPath export of a census
run (:mod:`slidecensus.reports.export`) stream their features through :class:`GeoJSONWriter`,
so a slide's million features never sit in memory together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

__all__ = ["GeoJSONWriter", "write_geojson"]


class GeoJSONWriter:
    """A GeoJSON FeatureCollection written a batch of features at a time (a context manager),
    so a slide's million features never sit in memory together."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.count = 0
        self._fh = open(path, "w", encoding="utf-8")
        self._fh.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, features: Iterable[dict]) -> None:
        """Append features."""
        for f in features:
            if self.count:
                self._fh.write(",\n")
            self._fh.write(json.dumps(f, separators=(",", ":"), ensure_ascii=False))
            self.count += 1

    def close(self) -> None:
        """Finish the document and close the file."""
        if not self._fh.closed:
            self._fh.write("\n]}\n")
            self._fh.close()

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_geojson(features: Iterator[dict], path: str | os.PathLike) -> int:
    """Stream features into a GeoJSON FeatureCollection file; returns the feature count."""
    with GeoJSONWriter(path) as w:
        w.write(features)
    return w.count
