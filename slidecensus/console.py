"""What a person sees from the ``slidecensus`` command: log lines, progress and summaries.

- :func:`command_logging` shows slidecensus's own messages and every warning; Dask's INFO
  lines only with ``-v``; one JSON object per line with ``--log-json``. It also sets up
  the Dask workers that a local cluster starts as subprocesses (through ``DASK_LOGGING``,
  which they read when they import Dask).
- :class:`ProgressDisplay` draws a tqdm bar on a terminal and logs a plain line every N
  seconds elsewhere (a pod, a pipe); the engine reports to it through the ``progress``
  callback of ``run_cohort`` and ``train_from_cohort``
  (:class:`slidecensus.engine.census.Progress`) and never prints.
- :func:`run_summary` ends ``slidecensus run``: outputs, what to open next, failed slides.

The library only logs; this module belongs to the command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import pandas as pd

    from .engine.census import Progress

__all__ = ["JsonFormatter", "ProgressDisplay", "command_logging", "run_summary"]

#: Format of a text log line.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Logger of the plain progress lines (pods and pipes).
PROGRESS_LOGGER = "slidecensus.progress"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, local time with its offset),
    ``level``, ``logger``, ``message``, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created).astimezone().isoformat(
                   timespec="milliseconds"),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _ConsoleHandler(logging.StreamHandler):
    """The command's stderr handler; while a progress bar is drawn, lines go above it."""

    bar_active = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.bar_active:
            return super().emit(record)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging does: a broken handler never breaks the command
            self.handleError(record)


def _dask_levels(verbose: int) -> dict[str, str]:
    """Levels of Dask's loggers (and the web servers it uses) for ``-v`` given n times."""
    dask = "WARNING" if verbose < 1 else "INFO" if verbose == 1 else "DEBUG"
    quiet = "WARNING" if verbose < 2 else "DEBUG"
    return {"distributed": dask, "distributed.client": quiet, "distributed.gc": quiet,
            "bokeh": "ERROR", "tornado": "CRITICAL", "tornado.application": "ERROR"}


def _worker_logging(verbose: int, json_lines: bool) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` that local Dask workers apply when they start:
    the same lines as the command's (text or JSON), at the same levels."""
    fmt: dict[str, Any] = ({"()": f"{__name__}.JsonFormatter"} if json_lines
                           else {"format": TEXT_FORMAT})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"slidecensus": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "slidecensus"}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        # slidecensus's INFO lines of a worker (a training record, say) stay there: the
        # command reports progress itself, and another process's lines break a bar
        "loggers": {name: {"level": level} for name, level in _dask_levels(verbose).items()}
        | {"slidecensus": {"level": "DEBUG" if verbose else "WARNING"}},
    }


@contextlib.contextmanager
def command_logging(verbose: int = 0, json_lines: bool = False, *, dask: bool = False,
                    stream: TextIO | None = None) -> Iterator[logging.Handler]:
    """Log lines for one command, restored afterwards (a command may run in-process).

    slidecensus logs at INFO (DEBUG with ``verbose``); other libraries show only warnings,
    Dask its INFO lines with ``verbose == 1`` and everything with 2. Python warnings become
    log records, so ``json_lines`` output is JSON throughout. With ``dask``, the same holds
    in the worker processes that a local cluster starts: they get ``DASK_LOGGING``, a
    logging configuration they apply when they import Dask.
    """
    handler = _ConsoleHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    levels = {"": "WARNING", "slidecensus": "DEBUG" if verbose else "INFO"}
    levels |= _dask_levels(verbose)
    root, dist = logging.getLogger(), logging.getLogger("distributed")
    saved_levels = {name: logging.getLogger(name).level for name in levels}
    saved_handlers, saved_dist = root.handlers[:], (dist.handlers[:], dist.propagate)
    saved_env = os.environ.get("DASK_LOGGING")
    undo_dask = contextlib.ExitStack()
    root.handlers = [h for h in root.handlers if type(h) is not logging.StreamHandler
                     and not isinstance(h, _ConsoleHandler)] + [handler]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    # Dask's own stderr handler (added when distributed is imported before any handler
    # exists) would print its lines in its own format: they go through ours instead
    dist.handlers = [h for h in dist.handlers if type(h) is not logging.StreamHandler]
    dist.propagate = True
    if dask:
        import dask.config  # reads the environment now, before DASK_LOGGING is set below

        # distributed, when imported here later, sets these levels (and no handler)
        undo_dask.enter_context(dask.config.set(
            {"logging": {k: v.lower() for k, v in _dask_levels(verbose).items()}}))
        os.environ["DASK_LOGGING"] = repr(_worker_logging(verbose, json_lines))
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        undo_dask.close()
        root.handlers = saved_handlers
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        dist.handlers, dist.propagate = saved_dist
        if saved_env is None:
            os.environ.pop("DASK_LOGGING", None)
        else:
            os.environ["DASK_LOGGING"] = saved_env


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _rate(n: float, seconds: float, unit: str) -> str:
    """``2.5 slides/min``: per second when above one a second."""
    if n <= 0 or seconds <= 0:
        return f"- {unit}/s"
    per_s = n / seconds
    return f"{per_s:.3g} {unit}/s" if per_s >= 1 else f"{per_s * 60:.3g} {unit}/min"


#: The iteration count and speed that start a training record (the bar shows them).
_TRAIN_COUNTS = re.compile(r"^it \d+/\d+\s+[\d.]+ it/s\s+")


class _Phase:
    """One phase's counts, and what its display needs (start time, its bar)."""

    def __init__(self, p: Progress, t0: float) -> None:
        self.name, self.unit, self.total, self.last, self.t0 = p.phase, p.unit, p.total, p, t0
        # a phase's first report is its start (a resumed run counts what was done before
        # as done, not as this run's rate), or already a finished step (training records)
        self.first = 0 if (p.item or p.detail) else p.done
        self.bar: Any = None

    def line(self) -> str:
        """``census: 3/10 slides, 1,234 cells, 0.5 slides/min, ETA 14 min``."""
        p = self.last
        elapsed = time.monotonic() - self.t0
        parts = [f"{p.done}/{p.total} {p.unit}"]
        if p.cells:
            parts.append(f"{p.cells:,} cells")
        new = p.done - self.first
        if p.done >= p.total:
            parts.append(f"done in {_duration(elapsed)}")
        else:
            parts.append(f"{_duration(elapsed)} elapsed")
        if new > 0:
            parts.append(_rate(new, elapsed, p.unit))
            if p.done < p.total:
                parts.append(f"ETA {_duration(elapsed / new * (p.total - p.done))}")
        line = f"{p.phase}: " + ", ".join(parts)
        return f"{line} ({p.detail})" if p.detail else line


class ProgressDisplay:
    """Shows :class:`~slidecensus.engine.census.Progress` reports: a tqdm bar per phase on
    a terminal (``bar``), else a plain log line every ``every`` seconds and at each phase's
    end. The Dask dashboard's address is shown once.

    Use as the ``progress`` callback of ``run_cohort`` / ``train_from_cohort`` (it may be
    called from Dask's event thread), inside ``with``.
    """

    def __init__(self, every: float = 30.0, bar: bool | None = None,
                 handler: logging.Handler | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = (self.stream.isatty() if bar is None else bar)
        self.every = max(0.05, float(every))
        self.handler = handler
        self.log = logging.getLogger(PROGRESS_LOGGER)
        self.phase: _Phase | None = None
        self._ended: float | None = None  # when the last phase ended (the next starts then)
        self.dashboards: set[str] = set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> ProgressDisplay:
        self._ticker = threading.Thread(target=self._tick, name="slidecensus-progress",
                                        daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, p: Progress) -> None:
        with self._lock:
            if p.dashboard and p.dashboard not in self.dashboards:
                self.dashboards.add(p.dashboard)
                self._say(f"Dask dashboard: {p.dashboard}")
            if self.phase is None or self.phase.name != p.phase:
                self._end_phase()
                self.phase = _Phase(p, self._ended or time.monotonic())
                if self.bar:
                    self._open_bar(self.phase)
            ph = self.phase
            ph.last, ph.total = p, p.total
            if ph.bar is not None:
                ph.bar.total = p.total
                ph.bar.set_postfix_str(f"{p.cells:,} cells" if p.cells else
                                       _TRAIN_COUNTS.sub("", p.detail)[:70], refresh=False)
                if p.done > ph.bar.n:
                    ph.bar.update(p.done - ph.bar.n)  # (tqdm's rate needs its updates)
                else:
                    ph.bar.refresh()
            if p.done >= p.total:
                self._end_phase()

    def close(self) -> None:
        """End the display: the last phase's final line, bars closed, ticker stopped."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5)
        with self._lock:
            self._end_phase()

    # -- internals

    def _say(self, text: str) -> None:
        if self.bar:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.log.info("%s", text)

    def _open_bar(self, ph: _Phase) -> None:
        from tqdm import tqdm

        ph.bar = tqdm(total=ph.total, initial=ph.first, desc=ph.name, unit=f" {ph.unit}",
                      file=self.stream, dynamic_ncols=True, smoothing=0.1, leave=True,
                      bar_format="{desc}: {n_fmt}/{total_fmt}{unit} |{bar}| "
                                 "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        ph.bar.start_t -= max(0.0, time.monotonic() - ph.t0)  # the phase began before its bar
        if isinstance(self.handler, _ConsoleHandler):
            self.handler.bar_active = True

    def _end_phase(self) -> None:
        ph, self.phase = self.phase, None
        if ph is None:
            return
        self._ended = time.monotonic()
        if ph.bar is not None:
            ph.bar.close()
            if isinstance(self.handler, _ConsoleHandler):
                self.handler.bar_active = False
        else:
            self.log.info("%s", ph.line())

    def _tick(self) -> None:
        """Every ``every`` seconds a plain line (no terminal); a bar's clock otherwise."""
        period = 1.0 if self.bar else self.every
        while not self._stop.wait(period):
            with self._lock:
                ph = self.phase
                if ph is None:
                    continue
                if ph.bar is not None:
                    ph.bar.refresh()
                else:
                    self.log.info("%s", ph.line())


def run_summary(table: pd.DataFrame, out: str, *, show_failed: int = 10) -> str:
    """The end of ``slidecensus run``: counts, failed slides and why, where the outputs
    are and the commands that read them."""
    status = table["status"].astype(str)
    ok, partial, failed = (int((status == s).sum()) for s in ("ok", "partial", "failed"))
    k = sum(1 for c in table.columns if c.startswith("p_") and c[2:].isdigit())
    lines = [f"{ok} slides ok, {partial} partial, {failed} failed -> {out}"]
    bad = table[status.isin(["failed", "partial"])]
    if len(bad):
        lines.append("slides not fully counted:")
        for _, r in bad.head(show_failed).iterrows():
            lines.append(f"  {r['slide_id']} ({r['status']}): {r.get('error', '') or '?'}")
        if len(bad) > show_failed:
            lines.append(f"  ... and {len(bad) - show_failed} more: see {out}/slides.csv")
    sep = "/" if not str(out).endswith("/") else ""
    lines += ["outputs:",
              f"  {out}{sep}slides.csv    one row per slide: status, cells, cluster proportions",
              f"  {out}{sep}cells/        one table per slide: every cell, its place and cluster",
              f"  {out}{sep}census.zarr   per-region maps (counts, proportions, tissue)"]
    if ok + partial == 0:
        return "\n".join(lines)
    q = _quote(out)
    if k:
        hints = [(f"slidecensus gallery {q}", "crops per cluster: name them in "
                  f"{out}{sep}clusters.toml"),
                 (f"slidecensus heatmap {q} --clusters 0,1", "maps of chosen clusters' share"),
                 (f"slidecensus export {q}", "every cell as QuPath GeoJSON, by cluster")]
    else:
        hints = [(f"slidecensus export {q}", "every cell as QuPath GeoJSON (not classified: "
                  "no model)"),
                 ("slidecensus train COHORT --out MODEL.pt", "then `run --model MODEL.pt` "
                  "classifies the cells")]
    width = max(len(c) for c, _ in hints)
    lines.append("next:")
    lines += [f"  {c.ljust(width)}   {why}" for c, why in hints]
    return "\n".join(lines)


def _quote(text: str) -> str:
    """``text`` as a shell word (quoted only when it needs to be)."""
    import shlex

    return shlex.quote(str(text))
