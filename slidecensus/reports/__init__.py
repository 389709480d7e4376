"""What users read after a run: heatmaps, galleries, QuPath export, slide classification
and cluster names, all read from a finished census folder (:mod:`slidecensus.engine.results`).
"""
