"""Weights files: a plain dictionary of tensors, numbers, strings, lists and dicts.

Written with ``torch.save`` atomically (a temporary file, then ``os.replace``) and read with
``torch.load(..., weights_only=True)``, so loading never runs pickled code. Every kind of
model (the cell model, the neural stain normaliser) names its ``format`` and
``format_version`` in the file, and a file of another kind is refused in one line.
torch is imported only when a file is read or written.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, SlidecensusError

__all__ = ["CheckpointError", "load_weights_file", "save_weights_file"]


class CheckpointError(InvalidInputError):
    """A checkpoint file is missing, unreadable, or from an incompatible version."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        SlidecensusError.__init__(self, f"{self.path}: {reason}")

    def __reduce__(self):  # keep both arguments through pickling
        return (type(self), (self.path, self.reason))


def save_weights_file(payload: dict[str, Any], path: str | Path, fmt: str,
                      version: int) -> Path:
    """Write ``payload`` (without the format keys) to ``path`` atomically.

    Parameters
    ----------
    payload : dict
        ``config``, ``weights``, ``summary`` and ``train_state`` as described above.
    path : str or Path
        Destination; its folder is created if needed.

    Returns
    -------
    Path
        The written path.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": fmt, "format_version": version, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights_file(path: str | Path, fmt: str, version: int,
                      sections: tuple[str, ...], what: str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its format and version.

    ``fmt``, ``version``, ``sections`` and ``what`` (its name in messages) describe the kind
    of model expected; the defaults are the cell model's.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a slidecensus cell-model checkpoint, or was written
        by an incompatible format version (the message names both versions).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        # torch's message spans many lines and suggests allow-listing the object: one line
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        if found is not None:
            reason = (f"refused: the checkpoint holds a pickled object ({found.group(1)}), not "
                      f"only weights; models are loaded with weights_only=True and no pickled "
                      f"code is run")
        else:
            reason = (f"not a readable weights-only checkpoint ({type(exc).__name__}: "
                      f"{first[:200]})")
        raise CheckpointError(path, reason) from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(path, f"not a slidecensus {what} checkpoint (expected format "
                                    f"{fmt!r}, found {found!r})")
    found_version = data.get("format_version")
    if found_version != version:
        raise CheckpointError(
            path,
            f"checkpoint format version {found_version} is incompatible with this slidecensus, "
            f"which reads version {version}; retrain the model "
            f"or use the slidecensus release that wrote it",
        )
    for key in sections:
        if key not in data:
            raise CheckpointError(path, f"checkpoint lacks the {key!r} section")
    return data
