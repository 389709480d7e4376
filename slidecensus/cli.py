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


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine.pipeline import CensusParams, run_cohort

    params = CensusParams(tile_size=args.tile_size, region_um=args.region_um)
    model = args.model
    if model is None and not args.no_classify:
        # the contract: `run` without --model trains on the cohort first (resumable)
        from .engine.pipeline import train_from_cohort
        from .models import TrainConfig

        model = Path(args.out) / "model.pt"
        if not model.exists():
            train_from_cohort(args.cohort, model, config=TrainConfig(k=args.k),
                              cluster=args.cluster, params=params)
    table = run_cohort(args.cohort, args.out, model=model, cluster=args.cluster,
                       params=params, slides_in_flight=args.slides_in_flight)
    failed = int((table["status"] != "ok").sum())
    print(f"{len(table) - failed} slides ok, {failed} failed -> {args.out}")
    return 1 if failed else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.pipeline import train_from_cohort
    from .models import TrainConfig

    kw = {"k": args.k, "seed": args.seed, "width": args.width}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.iterations is not None:
        kw["iterations"] = args.iterations
    path = train_from_cohort(args.cohort, args.out, config=TrainConfig(**kw),
                             cluster=args.cluster, seed=args.seed,
                             tiles_per_slide=args.tiles_per_slide,
                             cells_per_slide=args.cells_per_slide)
    print(f"model written: {path}")
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

    s = sub.add_parser("train", help="train the InfoGAN on a sample of the cohort's cells")
    s.add_argument("cohort", help="CSV with a path column, a folder, or a quoted glob")
    s.add_argument("--out", type=Path, required=True, help="checkpoint file (.pt)")
    s.add_argument("--k", type=int, default=5, help="cell clusters (categorical code values)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=128, help="channels of the residual blocks")
    s.add_argument("--epochs", type=float, default=None, help="default 10, as in the paper")
    s.add_argument("--iterations", type=int, default=None, help="overrides --epochs")
    s.add_argument("--tiles-per-slide", type=int, default=8)
    s.add_argument("--cells-per-slide", type=int, default=2000)
    s.add_argument("--cluster", default="local")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("run", help="the census: segment, classify and map every cell")
    s.add_argument("cohort", help="CSV with a path column, a folder, or a quoted glob")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--model", type=Path, default=None, help="trained checkpoint (.pt)")
    s.add_argument("--cluster", default="local",
                   help="local, local:N, tcp://host:port (kubernetes: planned)")
    s.add_argument("--tile-size", type=int, default=2048, help="tile core in level-0 px")
    s.add_argument("--region-um", type=float, default=256.0, help="map region edge in µm")
    s.add_argument("--slides-in-flight", type=int, default=2)
    s.add_argument("--k", type=int, default=5, help="clusters when training (no --model)")
    s.add_argument("--no-classify", action="store_true",
                   help="count and map cells without a model (no training)")
    s.set_defaults(func=_cmd_run)

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
