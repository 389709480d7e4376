"""``slidecensus normalize``: a cohort's images in one reference style, with the metrics.

For each input it writes the normalised image (PNG for plain images, pyramidal TIFF for
slides, same size, µm/px and file name), one row of ``metrics.csv`` (Yuan & Suh's histogram
metrics to the target before and after, and the grey-level SSIM to the input), and at the
end a contact sheet ``normalize.png``. An image's metrics are computed on all its pixels
(Yuan & Suh's patches); a slide's on a thumbnail, its histograms on the thumbnail's tissue
(a slide is mostly glass). An input that cannot be read or normalised fails
alone: its row carries the reason and the others are written.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.cohort import SLIDE_SUFFIXES, read_cohort
from ..engine.plan import fit_neural_to_slide, tissue_patches
from ..errors import InvalidInputError, SlidecensusError
from ..nuclei.normalize import (
    NORM_METHODS,
    colour_histograms,
    fit_normalizer,
    grey_ssim,
    histogram_metrics,
    normalized_window,
    stain_target,
)
from ..tiling import TissueMask, open_slide, tissue_mask_rgb

__all__ = ["METRIC_COLUMNS", "load_target", "normalize_images", "resolve_inputs"]

log = logging.getLogger(__name__)

_PLAIN = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
#: Images up to this many pixels are read whole (target, metrics); larger ones are slides.
WHOLE_PX = 4096 * 4096
#: Side of the thumbnails the metrics of a slide are computed on.
METRIC_THUMB = 1024
#: Level-0 patches a slide target contributes (and their side in px).
TARGET_PATCHES, TARGET_PATCH_PX = 32, 512

METRIC_COLUMNS = [
    "input", "output", "method", "status", "error", "width", "height", "mpp",
    "euclidean_before", "euclidean_after", "correlation_before", "correlation_after",
    "hellinger_before", "hellinger_after", "ssim", "seconds",
]


def resolve_inputs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Images and slides named by ``specs``: files, folders, globs or cohort CSVs, in order,
    each once. Nothing found is a one-line error."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file() and p.suffix.lower() not in {".csv", ".tsv"}:
            out.append(p)
        else:
            out.extend(Path(x) for x in read_cohort(spec)["path"])
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    if not uniq:
        raise InvalidInputError("no input images to normalise")
    return uniq


def _read_for_target(path: Path, seed: int) -> list[np.ndarray]:
    """A target file's pixels: the whole image when it is small, else tissue patches."""
    with open_slide(path) as slide:
        h, w = slide.shape
        if h * w <= WHOLE_PX:
            return [slide.read_region(0, 0, 0, w, h)]
        thumb = slide.thumbnail(1024)
        mask = TissueMask(tissue_mask_rgb(thumb), max(h / thumb.shape[0], w / thumb.shape[1]))
        return tissue_patches(slide, mask, TARGET_PATCHES, TARGET_PATCH_PX, seed)


def load_target(spec: str | os.PathLike, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """The reference style's pixels (one image, a slide's tissue patches, or every image of
    a folder) and its name. An empty folder or a missing file is a one-line error."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file()
                       and f.suffix.lower() in SLIDE_SUFFIXES | _PLAIN)
        if not files:
            raise InvalidInputError(f"target folder {p} holds no images")
    elif p.is_file():
        files = [p]
    else:
        raise InvalidInputError(f"target {p} does not exist")
    images = [im for f in files for im in _read_for_target(f, seed)]
    return images, p.name


def _fit(method: str, slide: Any, target: Any, model: str | None, lightness: str,
         whole: np.ndarray | None) -> Any:
    """The input's fitted normaliser; ``whole``: its pixels when it is read whole."""
    h, w = slide.shape
    if method == "neural":
        mask = None
        if whole is None:
            thumb = slide.thumbnail(1024)
            mask = TissueMask(tissue_mask_rgb(thumb),
                              max(h / thumb.shape[0], w / thumb.shape[1]))
        return fit_neural_to_slide(model, slide, mask, 0, lightness)[0]
    return fit_normalizer(method, whole if whole is not None else slide.thumbnail(2048),
                          target)


def _write_png(path: Path, rgb: np.ndarray, mpp: float | None) -> None:
    """PNG written aside and renamed; µm/px as the pHYs resolution when known."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        kw = {"dpi": (25400.0 / mpp, 25400.0 / mpp)} if mpp else {}
        Image.fromarray(rgb).save(tmp, format="PNG", **kw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one(path: Path, out: Path, method: str, target: Any, model: str | None,
         lightness: str, target_hist: np.ndarray | None, mpp: float | None) -> dict:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"input": str(path), "method": method}
    with open_slide(path, mpp=mpp) as slide:
        hist_src = hist_res = None
        h, w = slide.shape
        row.update(width=w, height=h, mpp=slide.mpp)
        plain = path.suffix.lower() in _PLAIN and h * w <= WHOLE_PX
        whole = slide.read_region(0, 0, 0, w, h) if h * w <= WHOLE_PX else None
        norm = _fit(method, slide, target, model, lightness, whole)
        if plain:
            src = whole
            res = np.round(norm(src)).astype(np.uint8)  # whole: the neural one tiles inside
            dst = out / (path.stem + ".png")
            _write_png(dst, res, slide.mpp)
        else:
            from ..tiling.writer import write_pyramid_tiff

            dst = out / (path.stem + ".tif")

            def source(x: int, y: int, tw: int, th: int) -> np.ndarray:
                return normalized_window(slide, 0, x, y, tw, th, norm)

            write_pyramid_tiff(dst, source, (h, w), mpp=slide.mpp or 0.25,
                               tile_size=1024 if method == "neural" else 512,
                               description=f"slidecensus normalize --method {method}")
            src = slide.thumbnail(METRIC_THUMB)
            with open_slide(dst) as written:
                res = written.thumbnail(METRIC_THUMB)
            if res.shape != src.shape:  # pyramids may round their levels differently
                from skimage.transform import resize

                res = (resize(res, src.shape[:2], preserve_range=True, anti_aliasing=True)
                       .round().astype(np.uint8))
            tissue = tissue_mask_rgb(src)
            if tissue.sum() >= 100:  # a slide's histograms: its tissue, not its glass
                hist_src, hist_res = src[tissue], res[tissue]
    if hist_src is None:
        hist_src, hist_res = src, res
    nan = {"euclidean": np.nan, "correlation": np.nan, "hellinger": np.nan}
    before = nan if target_hist is None else histogram_metrics(colour_histograms(hist_src),
                                                               target_hist)
    after = nan if target_hist is None else histogram_metrics(colour_histograms(hist_res),
                                                              target_hist)
    row.update(output=str(dst), status="ok", error="", ssim=grey_ssim(res, src),
               seconds=time.perf_counter() - t0,
               **{f"{k}_before": v for k, v in before.items()},
               **{f"{k}_after": v for k, v in after.items()})
    return row


def normalize_images(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     target: str | os.PathLike | None = None, method: str = "reinhard",
                     model: str | os.PathLike | None = None,
                     save_model: str | os.PathLike | None = None, lightness: str = "0.75",
                     mpp: float | None = None, iterations: int | None = None, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Normalise ``inputs`` to ``target``'s style with ``method``; write images,
    ``metrics.csv`` and ``normalize.png`` into ``out``; return the metrics table.

    Parameters
    ----------
    inputs : images, slides, folders, globs or cohort CSVs
    out : output folder (created)
    target : one image or slide, or a folder of them: the reference style. Needed except
        for ``neural`` with a ``model`` (whose target is inside it).
    method : ``reinhard``, ``macenko``, ``neural`` or ``none``
    model : a trained neural normaliser to reuse (``neural``)
    save_model : where to save the neural normaliser trained on ``target``
    lightness : ``keep``, ``match`` or a fraction (neural;
        :data:`slidecensus.nuclei.colorize.LIGHTNESS`)
    mpp : µm/px of inputs that do not record it (written into the outputs)
    iterations : training iterations of the neural normaliser (default its config's)
    """
    if method not in NORM_METHODS:
        raise InvalidInputError(f"--method must be one of {', '.join(NORM_METHODS)}, "
                                f"got {method!r}")
    if method != "neural" and (model is not None or save_model is not None):
        raise InvalidInputError("--model and --save-model are for --method neural")
    if method == "neural":
        from ..nuclei.colorize import lightness_fraction

        lightness_fraction(lightness)  # a bad value stops here, before any training
    files = resolve_inputs(inputs)
    if target is None and not (method == "neural" and model is not None):
        raise InvalidInputError("--target is needed (the reference style), except for "
                                "--method neural with --model")
    images, name = load_target(target, seed) if target is not None else ([], "")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tgt = stain_target(images, name=name) if images else None  # a grey target stops here
    if method == "neural":
        from ..nuclei.colorize import (
            ColorizerConfig,
            load_colorizer,
            save_colorizer,
            train_colorizer,
        )

        if model is None:
            cfg = ColorizerConfig(seed=seed, **({"iterations": iterations} if iterations
                                                else {}))
            payload = train_colorizer(images, cfg, name=name)
            model = save_model or out / "neural-normalizer.pt"
            save_colorizer(payload, model)
            log.info("neural normaliser saved: %s (%.0f s to train)", model,
                     payload["summary"]["time_s"])
        else:
            load_colorizer(model)  # a cell model or a damaged file stops here, in one line
        model = str(model)
    # neural with --model and no --target: normalised, but no histogram metrics
    target_hist = colour_histograms(images) if images else None
    rows = []
    for i, f in enumerate(files):
        try:
            rows.append(_one(f, out, method, tgt, model, lightness, target_hist, mpp))
        except (SlidecensusError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            log.warning("%s: not normalised: %s", f, reason)
            rows.append({"input": str(f), "method": method, "status": "failed",
                         "error": " ".join(str(reason).split())[:300]})
        if progress is not None:
            progress(i + 1, len(files))
    table = pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS)
    _write_csv(table, out / "metrics.csv")
    _contact_sheet(table, images, out / "normalize.png")
    return table


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    table.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, path)


def _thumb(rgb: np.ndarray, side: int = 256) -> np.ndarray:
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / side)))
    return rgb[::step, ::step]


def _contact_sheet(table: pd.DataFrame, target: list[np.ndarray], path: Path,
                   max_rows: int = 6) -> None:
    """Inputs and outputs side by side (the first ``max_rows`` that worked), the target
    beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"].head(max_rows)
    n = max(len(ok), 1)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for r in range(n):
        for c in range(3):
            axes[r, c].axis("off")
    for r, (_, row) in enumerate(ok.iterrows()):
        with open_slide(row["input"], mpp=row["mpp"] if pd.notna(row["mpp"]) else None) as s:
            src = s.thumbnail(256)
        with open_slide(row["output"]) as s:
            res = s.thumbnail(256)
        axes[r, 0].imshow(src)
        axes[r, 0].set_title(Path(row["input"]).name, fontsize=8)
        axes[r, 1].imshow(res)
        axes[r, 1].set_title(f"{row['method']}: corr {row['correlation_before']:.2f} → "
                             f"{row['correlation_after']:.2f}, SSIM {row['ssim']:.2f}",
                             fontsize=8)
    if target:
        axes[0, 2].imshow(_thumb(target[0]))
        axes[0, 2].set_title("target", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
