"""Reading a cohort: a CSV with a ``path`` column, a folder, or a quoted glob.

A malformed cohort stops before any work, with a message that names the line. Output
names derived from ``slide_id`` are sanitised so a hostile id cannot escape the output
folder.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
from pathlib import Path

import pandas as pd

from ..errors import InvalidInputError

#: File suffixes taken from a folder or glob cohort.
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".png", ".jpg", ".jpeg",
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(slide_id: str) -> str:
    """A file-name-safe form of ``slide_id``: no separators, no ``..``, never empty."""
    name = _UNSAFE.sub("_", str(slide_id)).strip("._") or "slide"
    return name[:200]


def read_cohort(spec: str | os.PathLike) -> pd.DataFrame:
    """The cohort as a table ``slide_id, path, label`` (label may be empty).

    Parameters
    ----------
    spec : a CSV file (``path`` column; optional ``slide_id``, ``label``, ``mpp`` (µm/px for
        files that do not record it); relative paths are
        relative to the CSV's folder), a folder (its slide files, sorted), or a glob.
    """
    text = str(spec)
    p = Path(text)
    if p.is_file() and p.suffix.lower() in {".csv", ".tsv"}:
        return _read_csv(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file()
                       and f.suffix.lower() in SLIDE_SUFFIXES)
        if not files:
            raise InvalidInputError(f"cohort folder {p} holds no slide files "
                                    f"({', '.join(sorted(SLIDE_SUFFIXES))})")
        return _from_paths(files)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise InvalidInputError(f"cohort glob {text!r} matches no files")
        return _from_paths(files)
    if p.is_file():
        raise InvalidInputError(f"cohort {p} must be a .csv file, a folder or a glob")
    raise InvalidInputError(f"cohort {p} does not exist")


def _from_paths(files: list[Path]) -> pd.DataFrame:
    ids = [f.stem for f in files]
    if len(set(ids)) != len(ids):  # same stem in different folders: keep the parent too
        ids = [f"{f.parent.name}_{f.stem}" for f in files]
    _check_unique(ids, [None] * len(ids))
    return pd.DataFrame({"slide_id": ids, "path": [str(f) for f in files], "label": ""})


def _read_csv(path: Path) -> pd.DataFrame:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delim)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise InvalidInputError(f"{path}: line 1: no 'path' column (columns: "
                                    f"{', '.join(cols) or 'none'})")
        rows, lines = [], []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            line = reader.line_num
            if not any(row.values()):
                continue
            if not row.get("path"):
                raise InvalidInputError(f"{path}: line {line}: empty path")
            sp = Path(row["path"])
            if not sp.is_absolute():
                sp = path.parent / sp
            sid = row.get("slide_id", "") if "slide_id" in cols else ""
            if "slide_id" in cols and not sid:
                raise InvalidInputError(f"{path}: line {line}: missing slide_id")
            rec = {"slide_id": sid or sp.stem, "path": str(sp), "label": row.get("label", "")}
            if "mpp" in cols:  # µm/px for images that do not record it (JPEG, PNG)
                rec["mpp"] = _parse_mpp(row.get("mpp", ""), path, line)
            rows.append(rec)
            lines.append(line)
    if not rows:
        raise InvalidInputError(f"{path}: the cohort has no rows")
    _check_unique([r["slide_id"] for r in rows], lines, path)
    columns = ["slide_id", "path", "label"] + (["mpp"] if "mpp" in cols else [])
    return pd.DataFrame(rows, columns=columns)


def _parse_mpp(text: str, path: Path, line: int) -> float:
    """An ``mpp`` cell: a positive number, or empty (NaN: the file's own µm/px)."""
    if not text:
        return float("nan")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"{path}: line {line}: mpp must be a positive number of "
                                f"µm per pixel, got {text!r}")
    return value


def _check_unique(ids: list[str], lines: list[int | None], path: Path | None = None) -> None:
    seen: dict[str, int | None] = {}
    safe: dict[str, str] = {}
    for sid, line in zip(ids, lines, strict=True):
        where = f"{path}: line {line}: " if path else ""
        if sid in seen:
            first = f" (first on line {seen[sid]})" if seen[sid] else ""
            raise InvalidInputError(f"{where}duplicate slide_id {sid!r}{first}")
        s = safe_name(sid)
        if s in safe:
            raise InvalidInputError(f"{where}slide_id {sid!r} and {safe[s]!r} map to the same "
                                    f"output name {s!r}")
        seen[sid], safe[s] = line, sid
