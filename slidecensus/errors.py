"""Typed errors shared by every layer: the cohort runner catches :class:`SlidecensusError`
and writes its message to ``slides.csv``, so each message names the file and the reason."""

from __future__ import annotations

from pathlib import Path


class SlidecensusError(Exception):
    """Base class of every error slidecensus raises on purpose."""


class SlideReadError(SlidecensusError, OSError):
    """A slide could not be opened or read; carries the path and a one-line reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the two arguments through pickling (Dask ships errors)
        return (type(self), (self.path, self.reason))


class SlideNotFoundError(SlideReadError, FileNotFoundError):
    """The path does not exist, or is a folder where a file was expected."""


class UnsupportedFormatError(SlideReadError):
    """The file is not an image format slidecensus (or OpenSlide) can read."""


class CorruptSlideError(SlideReadError):
    """The file is an image but its bytes are damaged: empty, truncated or undecodable."""


class InvalidInputError(SlidecensusError, ValueError):
    """An argument or an input table is malformed (message says what was expected)."""


class TileError(SlideReadError):
    """Tiles of an otherwise readable slide could not be read or segmented; the reason
    names the first such tile (index, position in µm and level-0 px) and its error."""


class OutputLockedError(SlidecensusError, RuntimeError):
    """Another run holds the output folder's lock; the message names its pid, host and start
    time, and how to clear a lock that a vanished run left."""
