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

from .errors import InvalidInputError, SlidecensusError


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
    from .engine.census import Progress
    from .nuclei.segment import segment_file, segment_params_from

    spec = _stain_norm(args)
    fit = None
    if not spec.is_default:
        import functools

        from .engine.plan import fit_slide_normalizer

        fit = functools.partial(fit_slide_normalizer, spec)
    from .nuclei.segment import Segmenter

    segmenter = Segmenter.resolve(args.segmenter, args.segmenter_model)
    with _progress(args) as show:
        table = segment_file(args.image, args.out, mpp=args.mpp,
                             params=segment_params_from(args.set), crops=args.crops,
                             crop_masked=args.crop_mode == "masked", geojson=args.geojson,
                             progress=lambda done, total, n: show(
                                 Progress("segment", done, total, unit="tiles", cells=n)),
                             normalizer=fit, segmenter=segmenter)
    print(f"{len(table)} nuclei -> {args.out}")
    if args.crops is not None:
        print(f"{len(table)} crops ({args.crop_mode}) -> {args.crops}")
    if args.geojson is not None:
        print(f"{len(table)} outlines (QuPath detections) -> {args.geojson}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .console import run_summary
    from .engine.census import run_cohort
    from .engine.plan import CensusParams
    from .nuclei.segment import segment_params_from

    params = CensusParams(tile_size=args.tile_size, region_um=args.region_um,
                          outlines=args.outlines, segment=segment_params_from(args.set),
                          stain_norm=_stain_norm(args),
                          segmenter=_segmenter(args))
    model, train_first = args.model, False
    if model is None and not args.no_classify:
        # the contract: `run` without --model trains on the cohort first (resumable)
        from .engine.modelfiles import is_url, model_exists

        # next to the outputs; on object storage the training worker uploads it there
        model = (f"{args.out.rstrip('/')}/model.pt" if is_url(args.out)
                 else str(Path(args.out) / "model.pt"))
        train_first = not model_exists(model)
    with _progress(args) as show:
        if train_first:
            from .engine.train import train_from_cohort

            train_from_cohort(args.cohort, model, preset=args.preset,
                              settings={"k": args.k}, cluster=args.cluster, params=params,
                              progress=show)
        table = run_cohort(args.cohort, args.out, model=model, cluster=args.cluster,
                           params=params, slides_in_flight=args.slides_in_flight,
                           max_bad_tiles=args.max_bad_tiles, progress=show)
    print(run_summary(table, args.out))
    # exit 1 when any slide failed; `partial` slides (allowed by --max-bad-tiles) do not
    return 1 if (table["status"] == "failed").any() else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.plan import CensusParams
    from .engine.train import train_from_cohort
    from .nuclei.segment import segment_params_from

    if args.labels is not None:
        return _train_guided(args)
    if args.guide is not None:
        raise InvalidInputError("--guide needs --labels CELLS.csv (a guided model)")
    if args.views is not None:
        raise InvalidInputError("--views needs --labels CELLS.csv (a guided model)")
    if args.crop_size is not None:
        raise InvalidInputError("--crop-size needs --labels CELLS.csv (the InfoGAN's crops "
                                "are 32 px, as in Hu et al.)")

    settings = {"k": args.k, "width": args.width, "epochs": args.epochs,
                "iterations": args.iterations}
    if args.epochs is not None and args.iterations is None:
        settings["iterations"] = None  # --epochs sets the length
    params = CensusParams(segment=segment_params_from(args.set), stain_norm=_stain_norm(args),
                          segmenter=_segmenter(args))
    with _progress(args) as show:
        path = train_from_cohort(args.cohort, args.out, preset=args.preset,
                                 settings={key: v for key, v in settings.items()
                                           if v is not None},
                                 cluster=args.cluster, seed=args.seed, params=params,
                                 tiles_per_slide=args.tiles_per_slide,
                                 cells_per_slide=args.cells_per_slide, progress=show)
    print(f"model written: {path}")
    return 0


def _train_guided(args: argparse.Namespace) -> int:
    """``train --labels``: a guided model (Gräbel et al.) from labelled points."""
    from .engine.plan import CensusParams
    from .engine.train import train_guided_from_cohort
    from .nuclei.segment import segment_params_from

    settings = {key: v for key, v in (("epochs", args.epochs), ("width", args.width),
                                      ("crop_size", args.crop_size), ("views", args.views))
                if v is not None}
    if "epochs" in settings:
        settings["epochs"] = max(1, int(round(settings["epochs"])))
    params = CensusParams(segment=segment_params_from(args.set), stain_norm=_stain_norm(args))
    with _progress(args) as show:
        path, report = train_guided_from_cohort(
            args.cohort, args.labels, args.out, guide=args.guide, cluster=args.cluster,
            seed=args.seed, params=params, settings=settings,
            unmatched_out=args.unmatched, progress=show)
    bad = report[~report["matched"]]
    print(f"{len(report) - len(bad)} of {len(report)} labelled points matched a nucleus")
    if len(bad):
        where = args.unmatched or f"{args.out}.unmatched.csv"
        print(f"{len(bad)} unmatched (listed in {where})")
    from .models import load_model

    s = load_model(path).summary
    print(f"guided model written: {path} (validation macro F1 {s['val_macro_f1']:.3f}, "
          f"head {s['head']}, epoch {s['best_epoch']})")
    return 0


def _cmd_embedmap(args: argparse.Namespace) -> int:
    from .reports.embedmap import make_embedmap

    path = make_embedmap(args.dir, slide=args.slide,
                         out=str(args.out) if args.out else None, n=args.n, seed=args.seed)
    print(f"embedding map: {path}")
    return 0


def _cmd_normalize(args: argparse.Namespace) -> int:
    from .reports.normalize import normalize_images

    with _progress(args) as show:
        from .engine.census import Progress

        table = normalize_images(args.inputs, args.out, target=args.target, method=args.method,
                                 model=args.model, save_model=args.save_model,
                                 lightness=args.lightness, mpp=args.mpp,
                                 iterations=args.iterations, seed=args.seed,
                                 progress=lambda done, total: show(
                                     Progress("normalize", done, total, unit="images")))
    ok = table[table["status"] == "ok"]
    for _, row in table[table["status"] != "ok"].iterrows():
        print(f"failed: {row['input']}: {row['error']}")
    if len(ok) and ok["correlation_after"].notna().any():
        print(f"{len(ok)} of {len(table)} images normalised ({args.method}) -> {args.out}: "
              f"histogram correlation to the target {ok['correlation_before'].mean():.3f} -> "
              f"{ok['correlation_after'].mean():.3f}, Hellinger "
              f"{ok['hellinger_before'].mean():.3f} -> {ok['hellinger_after'].mean():.3f}, "
              f"grey SSIM to the input {ok['ssim'].mean():.3f}")
    else:
        print(f"{len(ok)} of {len(table)} images normalised ({args.method}) -> {args.out}")
    return 0 if len(ok) == len(table) else 1


def _stain_norm(args: argparse.Namespace):
    """The ``--stain-norm`` / ``--stain-target`` pair as a StainNorm."""
    from .nuclei.normalize import parse_stain_norm, stain_target

    target, cohort = None, str(args.stain_target) == "cohort"
    if args.stain_target is not None and not cohort:
        from .reports.normalize import load_target

        images, name = load_target(args.stain_target)
        target = stain_target(images, name=name)
    return parse_stain_norm(args.stain_norm, target, cohort=cohort)


def _segmenter(args: argparse.Namespace):
    """The ``--segmenter`` pair as a checked Segmenter (a bad model file fails here)."""
    from .nuclei.segment import Segmenter

    return Segmenter.resolve(getattr(args, "segmenter", "threshold"),
                             getattr(args, "segmenter_model", None))


def _add_segmenter(s: argparse.ArgumentParser) -> None:
    """``--segmenter threshold|unet`` and ``--segmenter-model PATH``."""
    s.add_argument("--segmenter", choices=["threshold", "unet"], default="threshold",
                   help="threshold (Hu et al.'s pipeline, default) or unet (a U-Net trained "
                        "on synthetic patches; see docs/benchmarks.md)")
    s.add_argument("--segmenter-model", default=None, metavar="PATH",
                   help="the U-Net file (default: the one shipped in the package)")


def _cmd_segmenter_train(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .nuclei.unet import UNetConfig
    from .nuclei.unettrain import SegmenterTraining, train_segmenter

    training = SegmenterTraining(n_patches=args.patches, iterations=args.iterations,
                                 importance=args.importance, hard=not args.no_hard,
                                 background=args.background, adapt_bn=not args.no_adapt_bn,
                                 seed=args.seed)
    config = (UNetConfig() if args.min_relative_iod is None
              else UNetConfig(min_relative_iod_um2=args.min_relative_iod))
    path = train_segmenter(args.images, args.out, training, config=config,
                           command=shlex.join(["slidecensus", *sys.argv[1:]]))
    print(f"U-Net segmenter written: {path}")
    return 0


def _add_stain_norm(s: argparse.ArgumentParser) -> None:
    s.add_argument("--stain-norm", default="reinhard", metavar="METHOD",
                   help="normalise each tile before segmentation and crops: reinhard "
                        "(default), macenko, neural:MODEL.pt (see `normalize`), none")
    s.add_argument("--stain-target", type=Path, default=None, metavar="IMAGE",
                   help="reference image or folder for reinhard/macenko, or `cohort` "
                        "(reinhard: crops in the training slides' pooled style, recorded in "
                        "the model); default: the crops keep each slide's colours")


def _add_preset(s: argparse.ArgumentParser) -> None:
    s.add_argument("--preset", choices=["auto", "fast", "paper"], default="auto",
                   help="training configuration: paper (Hu et al., width 128, a GPU job), "
                        "fast (minutes on a CPU), auto (default): paper on a GPU worker, "
                        "else fast")


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from .reports.heatmap import HeatmapParams, make_heatmaps

    params = HeatmapParams(min_cells=args.min_cells, min_tissue=args.min_tissue,
                           vmax=args.vmax)
    table = make_heatmaps(args.dir, args.clusters, name=args.name, slides=args.slides,
                          params=params)
    cols = ["slide_id", "label", "proportion", "p90_region", "max_region"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from .reports.gallery import make_gallery

    path = make_gallery(args.dir, model=str(args.model) if args.model else None,
                        per_cluster=args.per_cluster, seed=args.seed)
    print(f"gallery: {path} (name the clusters in clusters.toml beside it)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .reports.export import export_geojson

    paths = export_geojson(args.dir, slides=args.slides)
    print(f"{len(paths)} QuPath GeoJSON file(s) -> {args.dir}/qupath/")
    return 0


def _slide_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, cluster=args.cluster, seed=args.seed)


def _cmd_classify(args: argparse.Namespace) -> int:
    from .reports.classify import apply_run, classify_run, format_report

    if args.apply is not None:
        if args.save_model is not None:
            raise InvalidInputError("--save-model and --apply exclude each other")
        report = apply_run(args.dir, args.apply, labels=args.labels)
    elif args.labels is None or args.method is None:
        raise InvalidInputError("classify needs --labels LABELS.csv and --method kmeans|svm "
                                "(or --apply MODEL)")
    else:
        report = classify_run(args.dir, args.labels, args.method, folds=args.folds,
                              seed=args.seed, features=args.features,
                              save_model_to=args.save_model)
    print(format_report(report))
    return 0


def _cmd_cluster_spec(args: argparse.Namespace) -> int:
    from .cluster.kubernetes import KubernetesOptions, cluster_objects, to_yaml

    kw = {k: v for k, v in vars(args).items() if k in KubernetesOptions.__dataclass_fields__
          and v is not None}
    print(to_yaml(cluster_objects(KubernetesOptions(**kw))), end="")
    return 0


def _cmd_cluster_wait(args: argparse.Namespace) -> int:
    from .cluster.kubernetes import wait_for_workers

    try:
        cpu, gpu = wait_for_workers(args.address, gpu_workers=args.gpu_workers,
                                    cpu_workers=args.cpu_workers, timeout_s=args.timeout)
    except TimeoutError as exc:
        print(f"slidecensus: {exc}", file=sys.stderr)
        return 1
    print(f"{cpu} CPU and {gpu} GPU workers at {args.address}")
    return 0


def _progress(args: argparse.Namespace):
    """The command's progress display (a bar on a terminal, else a line every
    ``--progress-every`` seconds; never a bar with ``--log-json``)."""
    from .console import ProgressDisplay

    return ProgressDisplay(every=args.progress_every, bar=False if args.log_json else None,
                           handler=getattr(args, "log_handler", None))


#: Commands whose work runs on Dask (their worker processes get the command's logging).
_DASK_COMMANDS = {"synth", "train", "run", "demo"}


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v, --log-json and --progress-every, accepted before or after the subcommand (on
    the subcommands they default to "not given", so they never undo the top level's)."""
    def default(value: object) -> dict:
        return {"default": value if top else argparse.SUPPRESS}

    parser.add_argument("-v", "--verbose", action="count", **default(0),
                        help="more messages: -v shows Dask's INFO lines and slidecensus's "
                             "debug messages, -vv everything")
    parser.add_argument("--log-json", action="store_true", **default(False),
                        help="log one JSON object per line on stderr (time, level, logger, "
                             "message), for pods; no progress bar")
    parser.add_argument("--progress-every", type=float, metavar="SECONDS", **default(30.0),
                        help="without a terminal (a pod, a pipe), a progress line every "
                             "SECONDS (default 30)")


def _add_to_subcommands(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_global_options(sub, top=False)
                _add_to_subcommands(sub)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _add_segment_set(parser: argparse.ArgumentParser) -> None:
    """The ``--set NAME=VALUE`` option of the commands that segment (segment, train, run)."""
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a segmentation parameter (SegmentParams, physical units), e.g. "
                             "hematoxylin_threshold=150 or min_area_um2=12; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``slidecensus`` command (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="slidecensus",
        description="Census of every cell in a cohort of whole-slide images.",
    )
    _add_global_options(p, top=True)
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
    s.add_argument("--crops", type=Path, default=None,
                   help="also write the 32 x 32 crops, row i = cell_id i (.zarr or .npy)")
    s.add_argument("--crop-mode", choices=["masked", "box"], default="masked",
                   help="masked: outside the nucleus white (Hu et al.); box: the plain window")
    s.add_argument("--geojson", type=Path, default=None,
                   help="also write nucleus outlines as QuPath detections (.geojson)")
    _add_segment_set(s)
    _add_stain_norm(s)
    _add_segmenter(s)
    s.set_defaults(func=_cmd_segment)

    s = sub.add_parser("segmenter", help="the learned nuclei segmenter")
    ssub = s.add_subparsers(dest="segmenter_cmd", required=True)
    t = ssub.add_parser("train", help="train a U-Net segmenter from unlabelled images "
                                      "(synthetic patches, Hou et al.)")
    t.add_argument("images", nargs="+", type=Path)
    t.add_argument("--out", type=Path, required=True, help="the U-Net file (.pt)")
    t.add_argument("--patches", type=int, default=1200, help="synthetic patches")
    t.add_argument("--iterations", type=int, default=600)
    t.add_argument("--seed", type=int, default=0)
    imp = t.add_mutually_exclusive_group()
    imp.add_argument("--importance", dest="importance", action="store_true", default=False,
                     help="weight patches by how real they look (Hou et al. 3.3; off by "
                          "default: it lowered AJI, docs/benchmarks.md)")
    imp.add_argument("--no-importance", dest="importance", action="store_false",
                     help="no importance weights (the default)")
    t.add_argument("--no-hard", action="store_true", help="no hard examples")
    t.add_argument("--background", choices=["shaped", "liberal"], default="shaped",
                   help="what is cut out of the synthetic background as possibly nuclear: "
                        "nucleus-shaped or hematoxylin-dominated dark parts (shaped, default) "
                        "or every dark pixel (liberal, as before)")
    t.add_argument("--no-adapt-bn", action="store_true",
                   help="keep the batch-norm statistics of the synthetic patches (no AdaBN)")
    t.add_argument("--min-relative-iod", type=float, default=None, metavar="UM2",
                   help="the model drops nuclei holding less hematoxylin than this area "
                        "(µm²) at the slide's nuclear split OD (default 18: marrow F1 level "
                        "with the threshold segmenter; 0 keeps the small pale nuclei that "
                        "other organs' annotators mark)")
    t.set_defaults(func=_cmd_segmenter_train)

    s = sub.add_parser("train", help="train the InfoGAN on a sample of the cohort's cells, "
                                     "or a guided model from labelled cells (--labels)")
    s.add_argument("cohort", help="CSV with a path column, a folder, or a quoted glob")
    s.add_argument("--out", required=True, help="checkpoint file (.pt; a path or s3://...)")
    _add_preset(s)
    s.add_argument("--k", type=int, default=5, help="cell clusters (categorical code values)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=None,
                   help="network channels (paper preset 128, fast 16)")
    s.add_argument("--epochs", type=float, default=None,
                   help="schedule in epochs over the sample (paper preset: 10)")
    s.add_argument("--iterations", type=int, default=None,
                   help="generator iterations; overrides --epochs (fast preset: a fixed "
                        "number)")
    s.add_argument("--tiles-per-slide", type=int, default=8)
    s.add_argument("--cells-per-slide", type=int, default=2000)
    s.add_argument("--labels", type=Path, default=None, metavar="CELLS.csv",
                   help="labelled points (path or slide_id, x_px, y_px, label): train a "
                        "guided model (Gräbel et al.) that names cell types instead")
    s.add_argument("--guide", type=Path, default=None, metavar="GUIDE.toml",
                   help="with --labels: the embedding guide (default: the haematopoietic "
                        "guide that ships with slidecensus)")
    s.add_argument("--unmatched", type=Path, default=None, metavar="CSV",
                   help="with --labels: where to list points that matched no nucleus "
                        "(default OUT.unmatched.csv)")
    s.add_argument("--crop-size", type=int, default=None, metavar="PX",
                   help="with --labels: crop side in px for the same 18 µm window (default "
                        "64 where the window spans more than 48 px of the labelled slides, "
                        "else 32; the census cuts the model's size)")
    s.add_argument("--views", type=int, default=None, choices=(1, 2, 4, 8),
                   help="with --labels: rotations and mirror images averaged per cell "
                        "(default 8; the census' classification cost grows with it)")
    _add_segment_set(s)
    _add_stain_norm(s)
    _add_segmenter(s)
    s.add_argument("--cluster", default="local")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("run", help="the census: segment, classify and map every cell")
    s.add_argument("cohort", help="CSV with a path column, a folder, or a quoted glob")
    s.add_argument("--out", required=True,
                   help="output folder: a local path or an fsspec URL such as s3://bucket/run")
    s.add_argument("--model", default=None, help="trained checkpoint (.pt; a path or s3://...)")
    s.add_argument("--cluster", default="local",
                   help="local, local:N, tcp://host:port, kubernetes[:NAME]")
    s.add_argument("--tile-size", type=int, default=2048, help="tile core in level-0 px")
    s.add_argument("--region-um", type=float, default=256.0, help="map region edge in µm")
    s.add_argument("--outlines", action="store_true",
                   help="keep every nucleus's outline (cells' outline_px; `export` then "
                        "writes polygons for QuPath)")
    _add_segment_set(s)
    _add_stain_norm(s)
    _add_segmenter(s)
    s.add_argument("--slides-in-flight", type=int, default=2)
    s.add_argument("--max-bad-tiles", type=int, default=0,
                   help="unreadable tiles a slide may have and still be counted (as 'partial', "
                        "tiles_done < tiles_planned); default 0: such a slide fails")
    s.add_argument("--k", type=int, default=5, help="clusters when training (no --model)")
    _add_preset(s)
    s.add_argument("--no-classify", action="store_true",
                   help="count and map cells without a model (no training)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("normalize", help="normalise images or slides to a reference stain "
                                         "style, with histogram metrics and a contact sheet")
    s.add_argument("inputs", nargs="+", help="images, slides, folders, globs or cohort CSVs")
    s.add_argument("--target", type=Path, default=None,
                   help="reference image, slide or folder (the style to match)")
    s.add_argument("--method", choices=["reinhard", "macenko", "neural", "none"],
                   default="reinhard")
    s.add_argument("--out", type=Path, required=True,
                   help="folder: normalised images, metrics.csv, normalize.png")
    s.add_argument("--model", type=Path, default=None,
                   help="neural: a trained normaliser to reuse (its target is inside it)")
    s.add_argument("--save-model", type=Path, default=None,
                   help="neural: where to save the normaliser trained on --target")
    s.add_argument("--lightness", default="0.75", metavar="keep|match|F",
                   help="neural: keep the input's lightness (the structure cannot change), "
                        "match its tissue mean and spread to the target's, or go a fraction "
                        "F of the way (default 0.75; see docs/normalization.md)")
    s.add_argument("--iterations", type=int, default=None,
                   help="neural: training iterations (default 1500)")
    s.add_argument("--mpp", type=float, default=None, help="µm/px for files without it")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_normalize)

    s = sub.add_parser("classify", help="classify slides from their cell proportions (CV)")
    s.add_argument("dir", help="census output folder (slides.csv, census.zarr)")
    s.add_argument("--labels", type=Path, default=None, help="CSV with slide_id,label")
    s.add_argument("--method", choices=["kmeans", "svm"], default=None,
                   help="k-means (unsupervised) or linear L2-SVM")
    s.add_argument("--folds", type=int, default=4, help="stratified cross-validation folds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--features", choices=["proportions", "proportions+regions"],
                   default="proportions", help="add per-region percentiles from census.zarr")
    s.add_argument("--save-model", default=None, help="save a model fitted on all slides")
    s.add_argument("--apply", default=None, metavar="MODEL",
                   help="apply a saved model (and its features) to DIR's slides instead")
    s.set_defaults(func=_cmd_classify)

    s = sub.add_parser("heatmap", help="maps of the chosen clusters' proportion per region")
    s.add_argument("dir", help="census output folder (local path or s3://...)")
    s.add_argument("--clusters", required=True,
                   help="cluster ids or names from clusters.toml, e.g. 1,4 or myeloblast")
    s.add_argument("--name", default=None, help="what the map shows, e.g. blast")
    s.add_argument("--slides", type=_slide_list, default=None, help="only these slide ids")
    s.add_argument("--min-cells", type=int, default=20,
                   help="regions with fewer classified cells are left transparent")
    s.add_argument("--min-tissue", type=float, default=0.05,
                   help="regions with less tissue (fraction) are left transparent")
    s.add_argument("--vmax", type=float, default=None,
                   help="top of the colour scale (default: cohort 99th percentile)")
    s.set_defaults(func=_cmd_heatmap)

    s = sub.add_parser("gallery", help="real and generated crops per cluster, to name them")
    s.add_argument("dir", help="census output folder")
    s.add_argument("--model", type=Path, default=None,
                   help="checkpoint for the generator column (default: the run's model)")
    s.add_argument("--per-cluster", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_gallery)

    s = sub.add_parser("export", help="every classified cell as QuPath GeoJSON")
    s.add_argument("dir", help="census output folder")
    s.add_argument("--slides", type=_slide_list, default=None, help="only these slide ids")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("embedmap", help="a guided run's cells on the guide map (PNG)")
    s.add_argument("dir", help="census output folder (run with a guided model)")
    s.add_argument("--slide", default=None, help="one slide id (default: the cohort)")
    s.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default DIR/embedmap.png)")
    s.add_argument("--n", type=int, default=5000, help="cells drawn (a seeded sample)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_embedmap)

    s = sub.add_parser("demo", help="generate a demo cohort and run the census on it")
    s.add_argument("out", type=Path, nargs="?", default=Path("demo"))
    s.add_argument("--cluster", default="local")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("cluster", help="Kubernetes (Dask operator) cluster: spec, wait")
    csub = s.add_subparsers(dest="cluster_command", required=True)
    c = csub.add_parser("spec", help="print the DaskCluster, GPU worker group and autoscaler "
                                     "YAML that --cluster kubernetes:NAME would apply")
    c.add_argument("--name", default=None, help="cluster name (default slidecensus)")
    c.add_argument("--namespace", default=None)
    c.add_argument("--image", default=None, help="CPU image (scheduler, CPU workers)")
    c.add_argument("--gpu-image", default=None, help="CUDA image (GPU workers)")
    c.add_argument("--cpu-workers", type=int, default=None, help="initial CPU workers")
    c.add_argument("--min-cpu-workers", type=int, default=None, help="autoscaler minimum")
    c.add_argument("--max-cpu-workers", type=int, default=None, help="autoscaler maximum")
    c.add_argument("--gpu-workers", type=int, default=None, help="GPU workers (0: no group)")
    c.add_argument("--data-claim", default=None, help="PVC with slides and model (/data)")
    c.add_argument("--s3-secret", default=None, help="Secret with the AWS_* credentials")
    c.set_defaults(func=_cmd_cluster_spec)
    c = csub.add_parser("wait", help="wait until a scheduler has its GPU (and CPU) workers")
    c.add_argument("address", help="scheduler address, e.g. tcp://NAME-scheduler:8786")
    c.add_argument("--gpu-workers", type=int, default=1)
    c.add_argument("--cpu-workers", type=int, default=0)
    c.add_argument("--timeout", type=float, default=600.0, help="seconds (exit 1 after)")
    c.set_defaults(func=_cmd_cluster_wait)
    _add_to_subcommands(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from .console import command_logging

    args = build_parser().parse_args(argv)
    with command_logging(args.verbose, args.log_json,
                         dask=args.command in _DASK_COMMANDS) as handler:
        args.log_handler = handler
        try:
            return int(args.func(args) or 0)
        except SlidecensusError as exc:
            if args.log_json:
                logging.getLogger("slidecensus").error("error: %s", exc)
            else:
                print(f"slidecensus: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
