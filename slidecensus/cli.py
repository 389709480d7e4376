"""The ``slidecensus`` command: parses arguments, then calls one library function.

Subcommands import their implementation lazily so ``slidecensus --help`` stays fast and a
missing optional piece (torch, say) only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SlidecensusError


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 4096x4096, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def _cmd_info(args: argparse.Namespace) -> int:
    from .tiling import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        print(slide.describe())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .cluster import get_client
    from .tiling.synth import synth_cohort

    width, height = args.size
    with get_client(args.cluster) if args.cluster else _null() as client:
        csv = synth_cohort(
            args.out, n_slides=args.slides, size=(height, width), seed=args.seed,
            mpp=args.mpp, client=client,
        )
    print(f"cohort written: {csv}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .engine.segment import segment_file

    table = segment_file(args.image, args.out, mpp=args.mpp)
    print(f"{len(table)} nuclei -> {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, cluster=args.cluster, seed=args.seed)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``slidecensus`` command (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="slidecensus",
        description="Census of every cell in a cohort of whole-slide images.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a slide: levels, µm/px, format")
    s.add_argument("slide", type=Path)
    s.add_argument("--mpp", type=float, default=None, help="µm/px for files without it")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("synth", help="write synthetic marrow slides with known cells")
    s.add_argument("out", type=Path, help="output folder")
    s.add_argument("--slides", type=int, default=4, help="number of slides")
    s.add_argument("--size", type=_size, default=(4096, 4096), help="WxH in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.5, help="µm/px of level 0")
    s.add_argument("--cluster", default=None,
                   help="render tiles on a Dask cluster (local, local:N, tcp://host:port)")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("segment", help="segment the nuclei of one image or slide")
    s.add_argument("image", type=Path)
    s.add_argument("--out", type=Path, required=True, help="cells table (.parquet)")
    s.add_argument("--mpp", type=float, default=None, help="µm/px for files without it")
    s.set_defaults(func=_cmd_segment)

    s = sub.add_parser("demo", help="generate a demo cohort and run the census on it")
    s.add_argument("out", type=Path, nargs="?", default=Path("demo"))
    s.add_argument("--cluster", default="local")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SlidecensusError as exc:
        print(f"slidecensus: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
