"""slidecensus: a census of every cell in a cohort of whole-slide images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slidecensus")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
