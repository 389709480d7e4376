"""Tiny benchmark harness: time a callable, record peak RSS, write machine-readable JSON.

Benchmarks measure and never assert. Results go to ``benchmarks/results/<name>.json`` and
the figures are copied by hand into ``docs/benchmarks.md`` with the command that made them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Run ``fn`` ``repeat`` times; return the fastest wall time (s) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` with machine facts to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": machine(), "results": results}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(json.dumps(payload["results"], indent=2, default=float))
    return path


def vm_hwm_mb() -> float:
    """Peak resident memory of this process image in MB (``VmHWM``).

    Unlike ``ru_maxrss``, which Linux carries across ``exec`` (a child started by a large
    parent would report the parent's peak), ``VmHWM`` belongs to the current image only.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def run_cli(*args: str) -> float:
    """Run ``slidecensus ARGS`` in a subprocess, as a user would; its wall time (s). Fails
    loudly; stdout is dropped, logs stay on stderr."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slidecensus.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t
