"""Slides in, lazy arrays out: readers, pyramid levels and µm/px, tissue mask, tile grid,
the pyramidal TIFF writer and synthetic slides. Knows nothing of the other subpackages."""

from .grid import Tile, grid_windows, level_for_mpp, plan_tiles
from .slide import Level, Slide, cached_slide, open_slide, to_rgb8
from .tissue import TissueMask, tissue_mask, tissue_mask_rgb
from .writer import ArraySource, RegionSource, write_pyramid_tiff

__all__ = [
    "ArraySource", "Level", "RegionSource", "Slide", "Tile", "TissueMask", "cached_slide",
    "grid_windows", "level_for_mpp", "open_slide", "plan_tiles", "tissue_mask",
    "tissue_mask_rgb", "to_rgb8", "write_pyramid_tiff",
]
