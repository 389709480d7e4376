"""The 0.1 import paths under slidecensus.engine still work for one release, with a warning."""

from __future__ import annotations

import importlib
import sys

import pytest

import slidecensus.engine as engine


def _forget(monkeypatch, *names: str) -> None:
    """Make the next import of these old paths run again (they are cached after one)."""
    for name in names:
        monkeypatch.delitem(sys.modules, f"slidecensus.engine.{name}", raising=False)
        if name in vars(engine):  # (hasattr would import it: the package's __getattr__)
            monkeypatch.delattr(engine, name)


def test_an_old_module_path_warns_and_gives_the_new_module(monkeypatch):
    from slidecensus.nuclei import segment as new

    _forget(monkeypatch, "segment")
    with pytest.warns(DeprecationWarning, match=r"slidecensus\.nuclei\.segment") as rec:
        from slidecensus.engine.segment import segment_image
    assert segment_image is new.segment_image
    assert sys.modules["slidecensus.engine.segment"] is new
    assert rec[0].filename == __file__  # attributed to the importing line, not to importlib

    _forget(monkeypatch, "heatmap")
    with pytest.warns(DeprecationWarning, match=r"slidecensus\.reports\.heatmap"):
        old = importlib.import_module("slidecensus.engine.heatmap")
    assert old is importlib.import_module("slidecensus.reports.heatmap")


def test_the_split_pipeline_forwards_each_name_to_its_new_module(monkeypatch):
    from slidecensus.engine import census, plan, train

    _forget(monkeypatch, "pipeline")
    with pytest.warns(DeprecationWarning, match=r"run_cohort from slidecensus\.engine\.census"):
        from slidecensus.engine.pipeline import run_cohort
    assert run_cohort is census.run_cohort
    with pytest.warns(DeprecationWarning, match=r"slidecensus\.engine\.plan"):
        from slidecensus.engine.pipeline import CensusParams
    assert CensusParams is plan.CensusParams
    with pytest.warns(DeprecationWarning, match=r"slidecensus\.engine\.train"):
        from slidecensus.engine.pipeline import train_from_cohort
    assert train_from_cohort is train.train_from_cohort
    with pytest.raises(ImportError):
        from slidecensus.engine.pipeline import no_such_name  # noqa: F401


def test_unknown_engine_modules_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("slidecensus.engine.no_such_module")
