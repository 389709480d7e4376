"""Per-tile science, arrays in and arrays out: stain ops, segmentation, cell table, crops,
outlines, scoring against annotations, and the GeoJSON writer for outlines.

Imports only :mod:`slidecensus.tiling` and :mod:`slidecensus.errors`; the cohort graph
(:mod:`slidecensus.engine`) calls these functions from its tasks.
"""
