"""The cohort graph: it ties tiling, nuclei, models and cluster together in one Dask graph.

- :mod:`.cohort`: the cohort table (CSV, folder or glob) and safe slide names;
- :mod:`.plan`: :class:`~.plan.CensusParams` and a slide's plan (tissue, stain model, tiles);
- :mod:`.tasks`: the worker tasks (segment a tile, classify crops, finish a slide);
- :mod:`.census`: :func:`~.census.run_cohort`, which streams slides through the cluster and
  commits each one;
- :mod:`.train`: :func:`~.train.train_from_cohort`, the training gather;
- :mod:`.outputs`, :mod:`.results`, :mod:`.modelfiles`: the output folder, reading a
  finished run back, and checkpoints on disk or object storage.

The per-tile science moved to :mod:`slidecensus.nuclei` and the reports to
:mod:`slidecensus.reports`. Their old paths here (``slidecensus.engine.segment``,
``slidecensus.engine.heatmap``, ..., and ``slidecensus.engine.pipeline``, now split into
plan, tasks, census and train) still import for one release, with a DeprecationWarning
naming the new path. They are served by a finder on ``sys.meta_path`` (no files here).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
import warnings
from typing import Any

#: Old module name under ``slidecensus.engine`` -> the module it moved to.
MOVED: dict[str, str] = {
    **{m: f"slidecensus.nuclei.{m}" for m in ("stain", "segment", "crops", "outlines",
                                               "scoring")},
    **{m: f"slidecensus.reports.{m}" for m in ("heatmap", "gallery", "export", "classify",
                                                "clusters")},
}
#: ``slidecensus.engine.pipeline`` was split; its names are found in these modules.
PIPELINE_PARTS = ("slidecensus.engine.plan", "slidecensus.engine.tasks",
                  "slidecensus.engine.census", "slidecensus.engine.train")
_IMPORTLIB = os.path.dirname(importlib.__file__) + os.sep


def _warn(message: str) -> None:
    """A DeprecationWarning attributed to the code that used the old path: this file's and
    importlib's frames are stepped over (``warnings`` itself skips importlib's bootstrap)."""
    frame, level = sys._getframe(1), 2
    while frame is not None:
        name = frame.f_code.co_filename
        bootstrap = "importlib" in name and "_bootstrap" in name
        if not (bootstrap or name == __file__ or name.startswith(_IMPORTLIB)):
            break
        level += 0 if bootstrap else 1
        frame = frame.f_back
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def _pipeline_getattr(name: str) -> Any:
    """Attribute lookup of the old ``pipeline`` module: forwarded to the part that holds it."""
    parts = [importlib.import_module(p) for p in PIPELINE_PARTS]
    owners = ([m for m in parts if name in getattr(m, "__all__", ())]
              or [m for m in parts if name in vars(m)])
    if not owners:
        raise AttributeError(f"module 'slidecensus.engine.pipeline' has no attribute {name!r}")
    _warn(f"slidecensus.engine.pipeline is deprecated: import {name} from "
          f"{owners[0].__name__} (the old path will be removed in the next release)")
    return vars(owners[0])[name]


def _pipeline_all() -> list[str]:
    return sorted(n for p in PIPELINE_PARTS for n in importlib.import_module(p).__all__)


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the 0.1 module paths under ``slidecensus.engine`` that moved elsewhere."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or (name not in MOVED and name != "pipeline"):
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a plain module, replaced or filled in by exec_module

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__.rpartition(".")[2]
        if name == "pipeline":
            module.__doc__ = ("Deprecated: split into slidecensus.engine.plan, .tasks, "
                              ".census and .train.")
            module.__getattr__ = _pipeline_getattr  # type: ignore[method-assign]
            module.__all__ = _pipeline_all()  # type: ignore[attr-defined]
            return
        _warn(f"{module.__name__} is deprecated: it moved to {MOVED[name]} "
              f"(the old path will be removed in the next release)")
        # the import system returns what sys.modules holds after exec_module: the new module
        sys.modules[module.__name__] = importlib.import_module(MOVED[name])


if not any(type(f).__name__ == "_OldPaths" for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPaths())


def __getattr__(name: str) -> Any:
    """``slidecensus.engine.segment`` as an attribute (without an import statement)."""
    if name in MOVED or name == "pipeline":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
