"""Shared fixtures: the real reference data beside the project (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SLIDECENSUS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real test images; tests needing it skip where it is absent.

    In CI (``CI`` set) a missing folder is an error, so the real-data tests cannot be
    skipped silently there.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs (JPEG tiles, 0.499 µm/px)."""
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def marrow_pngs(shared_data: Path) -> list[Path]:
    """The 8 bone-marrow H&E PNGs (1200 x 1200) with annotated cell centres."""
    return sorted((shared_data / "bone-marrow-he" / "images").glob("*.png"))
