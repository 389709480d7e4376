"""What a person sees from the command: quiet Dask, progress on a terminal or in a pipe,
JSON lines for pods, and the summary at the end of a run."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest

from slidecensus.cli import build_parser, main
from slidecensus.console import JsonFormatter, ProgressDisplay, command_logging, run_summary
from slidecensus.engine.census import Progress

#: A log line of one of Dask's loggers at INFO, in the text or the JSON format.
DASK_INFO = re.compile(r"INFO distributed\.|\"level\": \"INFO\", \"logger\": \"distributed\.")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Two synthetic 1024 x 1024 slides (four tiles each at --tile-size 512)."""
    from slidecensus.tiling.synth import synth_cohort

    return synth_cohort(tmp_path_factory.mktemp("tiny"), n_slides=2, size=(1024, 1024),
                        seed=0, mpp=0.5)


def _run_in_a_pipe(cohort, out, before=(), after=()) -> subprocess.CompletedProcess:
    """The real command, stdout and stderr captured (no terminal), on one local worker;
    ``before`` and ``after`` are options before and after the subcommand."""
    env = {k: v for k, v in os.environ.items() if k != "DASK_LOGGING"}
    cmd = [sys.executable, "-m", "slidecensus", *before, "run", str(cohort), "--out",
           str(out), "--no-classify", "--cluster", "local:1", "--tile-size", "512", *after]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_a_run_in_a_pipe_is_quiet_shows_progress_lines_and_ends_with_a_summary(
        tiny_cohort, tmp_path):
    res = _run_in_a_pipe(tiny_cohort, tmp_path / "out", after=["--progress-every", "0.2"])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert not [ln for ln in lines if DASK_INFO.search(ln)], res.stderr[-3000:]
    progress = [ln for ln in lines if "slidecensus.progress: census: " in ln]
    assert progress and re.search(r"census: 2/2 slides, [\d,]+ cells, done in", progress[-1])
    assert sum("Dask dashboard: http" in ln for ln in lines) == 1
    assert "tqdm" not in res.stderr and "|" not in "".join(progress)  # no bar in a pipe
    assert "2 slides ok, 0 partial, 0 failed" in res.stdout
    assert "slidecensus export" in res.stdout and "slides.csv" in res.stdout


def test_verbose_json_lines_parse_and_include_dasks_info_lines(tiny_cohort, tmp_path):
    """``--log-json`` before the subcommand and ``-v`` after it: every stderr line is one
    JSON object (also those of the worker process), and Dask's INFO lines are among them."""
    res = _run_in_a_pipe(tiny_cohort, tmp_path / "out", before=["--log-json"],
                         after=["-v", "--progress-every", "0.2"])
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(ln) for ln in res.stderr.splitlines() if ln.strip()]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    loggers = {r["logger"] for r in records if r["level"] == "INFO"}
    assert "distributed.scheduler" in loggers and "distributed.worker" in loggers
    assert any(r["logger"] == "slidecensus.progress" and "census: 2/2" in r["message"]
               for r in records)


def test_global_options_go_before_or_after_the_subcommand():
    p = build_parser()
    for argv in (["-v", "--log-json", "run", "c", "--out", "o"],
                 ["run", "c", "--out", "o", "-v", "--log-json"]):
        args = p.parse_args(argv)
        assert (args.verbose, args.log_json, args.progress_every) == (1, True, 30.0)
    args = p.parse_args(["--progress-every", "5", "segment", "x", "--out", "y"])
    assert (args.verbose, args.log_json, args.progress_every) == (0, False, 5.0)


def test_the_progress_fallback_prints_plain_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="slidecensus.progress")
    stream = io.StringIO()  # not a terminal
    with ProgressDisplay(every=0.05, stream=stream) as show:
        assert not show.bar
        show(Progress("census", 1, 3, cells=10, dashboard="http://127.0.0.1:1/status"))
        time.sleep(0.3)
        show(Progress("census", 2, 3, cells=25, item="b", status="ok"))
        show(Progress("census", 3, 3, cells=40, item="c", status="failed"))
    lines = [r.getMessage() for r in caplog.records if r.name == "slidecensus.progress"]
    assert lines[0] == "Dask dashboard: http://127.0.0.1:1/status"
    assert any(re.fullmatch(r"census: 1/3 slides, 10 cells, \d+ s elapsed", ln)
               for ln in lines)  # periodic, before a second slide (no rate yet)
    assert re.fullmatch(r"census: 3/3 slides, 40 cells, done in \d+ s, [\d.]+ slides/"
                        r"(s|min)", lines[-1])
    assert stream.getvalue() == ""  # nothing drawn


def test_a_phase_that_starts_with_a_finished_step_counts_from_the_previous_phase(caplog):
    """Training reports only finished records: its rate counts from zero and from the end
    of the sampling phase before it, not from its first record."""
    caplog.set_level(logging.INFO, logger="slidecensus.progress")
    with ProgressDisplay(every=60, stream=io.StringIO()) as show:
        show(Progress("sample", 0, 1))
        show(Progress("sample", 1, 1, cells=50, item="a", status="ok"))
        time.sleep(0.2)
        show(Progress("train", 6, 6, unit="iterations", detail="it 6/6"))
    last = [r.getMessage() for r in caplog.records if r.name == "slidecensus.progress"][-1]
    assert re.fullmatch(r"train: 6/6 iterations, done in \d+ s, [\d.]+ iterations/(s|min) "
                        r"\(it 6/6\)", last), last
    rate = float(re.search(r"([\d.]+) iterations/s", last).group(1))
    assert rate < 6 / 0.15  # measured over the 0.2 s since sampling ended


def test_on_a_terminal_a_bar_is_drawn_and_log_lines_go_above_it():
    term = _Terminal()
    with command_logging(stream=term) as handler, \
            ProgressDisplay(every=10, handler=handler, stream=term) as show:
        assert show.bar
        show(Progress("train", 0, 40, unit="iterations", dashboard="http://x/status"))
        logging.getLogger("slidecensus.test").info("a line above the bar")
        show(Progress("train", 40, 40, unit="iterations", detail="it 40/40 L_D 0.1"))
        show(Progress("train", 40, 40, unit="iterations"))  # (after the end: ignored)
    text = term.getvalue()
    assert "train: 40/40 iterations |" in text
    assert text.count("Dask dashboard: http://x/status") == 1
    assert "INFO slidecensus.test: a line above the bar" in text


def test_json_formatter_writes_the_four_fields():
    record = logging.LogRecord("slidecensus.x", logging.WARNING, __file__, 1, "%d \"cells\"",
                               (3,), None)
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "WARNING" and out["logger"] == "slidecensus.x"
    assert out["message"] == '3 "cells"' and re.match(r"\d{4}-\d\d-\d\dT", out["time"])


def test_command_logging_is_undone_after_the_command():
    root = logging.getLogger()
    before = (root.handlers[:], root.level, os.environ.get("DASK_LOGGING"),
              logging.getLogger("distributed").level)
    with command_logging(verbose=1, json_lines=True, dask=True, stream=io.StringIO()):
        assert logging.getLogger("distributed").level == logging.INFO
        assert "JsonFormatter" in os.environ["DASK_LOGGING"]
    assert (root.handlers, root.level, os.environ.get("DASK_LOGGING"),
            logging.getLogger("distributed").level) == before


def test_the_run_summary_names_outputs_next_steps_and_failed_slides():
    table = pd.DataFrame({"slide_id": ["a", "b", "c"], "status": ["ok", "failed", "partial"],
                          "error": ["", "b.svs: not a slide", "2 of 9 tiles unreadable"],
                          "p_0": [0.5, None, 0.4], "p_1": [0.5, None, 0.6]})
    text = run_summary(table, "runs/x")
    assert text.splitlines()[0] == "1 slides ok, 1 partial, 1 failed -> runs/x"
    assert "b (failed): b.svs: not a slide" in text and "c (partial): 2 of 9" in text
    for hint in ("runs/x/slides.csv", "slidecensus gallery runs/x",
                 "slidecensus heatmap runs/x --clusters", "slidecensus export runs/x",
                 "runs/x/clusters.toml"):
        assert hint in text
    counted = run_summary(table[["slide_id", "status", "error"]].iloc[:1], "o")
    assert "gallery" not in counted and "not classified" in counted


def test_segment_reports_its_tiles(tiny_cohort, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="slidecensus.progress")
    slide = str(pd.read_csv(tiny_cohort)["path"][0])  # (absolute)
    assert main(["segment", slide, "--out", str(tmp_path / "c.parquet"),
                 "--progress-every", "0.05"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "slidecensus.progress"]
    assert lines and re.match(r"segment: 1/1 tiles, [\d,]+ cells, done in", lines[-1])
    assert "nuclei ->" in capsys.readouterr().out
