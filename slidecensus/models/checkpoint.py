"""One checkpoint file per trained cell model: config, weights of G, D and Q, summary.

The file is a plain dictionary of tensors, numbers, strings, lists and dicts, written with
``torch.save`` and read with ``torch.load(..., weights_only=True)``, so loading never runs
pickled code. It is written atomically (temporary file, then ``os.replace``) so a crash
mid-write leaves the previous checkpoint intact, which is what resuming relies on.

Layout (``FORMAT_VERSION`` 1)::

    {"format": "slidecensus.infogan", "format_version": 1,
     "config": {...TrainConfig fields...},
     "weights": {"G": state_dict, "D_trunk": ..., "D_head": ..., "Q_head": ...},
     "summary": {"iteration", "epochs_done", "time_s", "seed", "device", "versions", "history"},
     "train_state": {optimiser states, RNG state, data permutation} or None}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..weightsfile import CheckpointError, load_weights_file, save_weights_file

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "slidecensus.infogan"
#: Bumped whenever the layout or the network definitions change incompatibly.
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a cell-model ``payload`` (without the format keys) to ``path`` atomically;
    returns the path (see :func:`~slidecensus.weightsfile.save_weights_file`)."""
    return save_weights_file(payload, path, FORMAT, FORMAT_VERSION)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a cell-model checkpoint with ``weights_only=True`` and check its format version.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a slidecensus cell-model checkpoint, or was written
        by an incompatible format version (the message names both versions).
    """
    return load_weights_file(path, FORMAT, FORMAT_VERSION, ("config", "weights", "summary"),
                             "cell-model")
