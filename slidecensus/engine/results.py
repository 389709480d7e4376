"""Reading a finished census folder back: the common ground of every report.

A run folder (local or ``s3://``) holds ``slides.csv``, ``census.zarr`` (one group per
slide), ``cells/<slide>.parquet``, ``crops.zarr`` and ``manifest.json``; :class:`RunResults`
opens them lazily and knows the cluster names from ``clusters.toml``.
"""

from __future__ import annotations

import io
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from .cohort import safe_name
from .outputs import OutputDir

__all__ = ["CLUSTER_FILE", "RunResults", "read_cluster_names"]

#: Name of the naming file inside a run folder.
CLUSTER_FILE = "clusters.toml"


def read_cluster_names(path: str | os.PathLike) -> dict[int, str]:
    """The ``[clusters]`` table of a TOML file as {id: name}; {} when the file is absent.

    Keys must be non-negative integers and names non-empty strings; anything else is an
    :class:`InvalidInputError` naming the entry, because a silently ignored typo would
    mislabel every report.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p}: not valid TOML: {exc}") from None
    table = data.get("clusters", {})
    if not isinstance(table, dict):
        raise InvalidInputError(f"{p}: [clusters] must be a table of id = \"name\" lines")
    names: dict[int, str] = {}
    for key, value in table.items():
        try:
            j = int(key)
        except ValueError:
            raise InvalidInputError(f"{p}: cluster id {key!r} is not an integer") from None
        if j < 0:
            raise InvalidInputError(f"{p}: cluster id {j} is negative")
        if not isinstance(value, str) or not value.strip():
            raise InvalidInputError(f"{p}: cluster {j} needs a non-empty name, got {value!r}")
        names[j] = value.strip()
    return names


class RunResults:
    """A census output folder opened for reporting (nothing is loaded until asked)."""

    def __init__(self, location: str | os.PathLike | OutputDir) -> None:
        self.out = location if isinstance(location, OutputDir) else OutputDir(location)
        raw = self.out.read_bytes("slides.csv")
        if raw is None:
            raise InvalidInputError(f"{self.out.location} is not a census folder: it has no "
                                    f"slides.csv (run `slidecensus run` first)")
        self.slides = pd.read_csv(io.BytesIO(raw), dtype={"slide_id": str, "label": str,
                                                          "error": str, "path": str})
        self.slides = self.slides.fillna({"label": "", "error": ""})
        self.manifest: dict[str, Any] = self.out.read_json("manifest.json") or {}
        self.k = sum(1 for c in self.slides.columns if c.startswith("p_") and
                     c[2:].isdigit())
        self.names = self._names()

    @property
    def types(self) -> tuple[str, ...]:
        """The cell types of a guided model's run, in cluster order (() otherwise)."""
        cfg = self.manifest.get("model_config") or {}
        return tuple(cfg.get("classes") or ()) if cfg.get("kind") == "guided" else ()

    @property
    def guided(self) -> bool:
        """Whether the run classified with a guided model (named types)."""
        return bool(self.types)

    def _names(self) -> dict[int, str]:
        """Cluster names: a guided model's types, then ``clusters.toml`` (which wins)."""
        return {**dict(enumerate(self.types)), **self._toml_names()}

    def _toml_names(self) -> dict[int, str]:
        if self.out.local:
            names = read_cluster_names(Path(self.out.root) / CLUSTER_FILE)
        else:
            raw = self.out.read_bytes(CLUSTER_FILE)
            names = {}
            if raw is not None:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    p = Path(tmp) / CLUSTER_FILE
                    p.write_bytes(raw)
                    names = read_cluster_names(p)
        bad = [j for j in names if j >= max(self.k, 1)]
        if bad and self.k:
            raise InvalidInputError(f"{CLUSTER_FILE} names cluster(s) {bad} but the run has "
                                    f"clusters 0..{self.k - 1}")
        return names

    def ok_slides(self, only: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows of slides that completed; ``only`` restricts to those ids (all must exist)."""
        ok = self.slides[self.slides["status"] == "ok"]
        if only:
            missing = sorted(set(only) - set(ok["slide_id"]))
            if missing:
                raise InvalidInputError(f"no completed slide named {', '.join(missing)} in "
                                        f"{self.out.location}")
            ok = ok[ok["slide_id"].isin(only)]
        return ok.reset_index(drop=True)

    def census(self, slide_id: str) -> Any:
        """The slide's maps as an xarray Dataset (``counts``, ``proportion``, ``cells``,
        ``tissue``; coordinates in µm), loaded into memory (they are small)."""
        import xarray as xr

        return xr.open_zarr(self.out.url("census.zarr"), group=safe_name(slide_id),
                            zarr_format=3, consolidated=False).load()

    def cells(self, slide_id: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The slide's cell table (optionally only some columns)."""
        table = self.out.read_parquet(f"cells/{safe_name(slide_id)}.parquet")
        return table if columns is None else table[list(columns)]

    def crop_sample(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The slide's seeded crop sample (n, 32, 32, 3) and each crop's cluster."""
        import zarr

        try:
            arr = zarr.open_array(self.out.url(f"crops.zarr/{safe_name(slide_id)}"), mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
            return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)
        clusters = np.asarray(arr.attrs.get("cluster", []), np.int64)
        return (np.asarray(arr[:]) if arr.shape[0] else np.zeros(arr.shape, np.uint8)), clusters

    def cluster_totals(self) -> np.ndarray:
        """Classified cells per cluster over all completed slides (int64, length k)."""
        total = np.zeros(self.k, np.int64)
        for sid in self.ok_slides()["slide_id"]:
            total += self.census(sid)["counts"].sum(dim=("y", "x")).to_numpy()[: self.k]
        return total

    def model_path(self) -> str | None:
        """The checkpoint the run classified with, when it is still where the run saw it."""
        from .modelfiles import model_exists

        model = self.manifest.get("model")
        return model if model and model_exists(model) else None
