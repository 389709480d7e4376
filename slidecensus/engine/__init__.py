"""Per-tile science and the cohort graph: stain ops, segmentation, cells and crops, census."""
