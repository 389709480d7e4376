"""Slides in, lazy arrays out: readers, pyramid levels and µm/px, tissue mask, tile grid,
the pyramidal TIFF writer and synthetic slides. Knows nothing of the other subpackages."""

from .writer import ArraySource, RegionSource, write_pyramid_tiff

__all__ = ["ArraySource", "RegionSource", "write_pyramid_tiff"]
