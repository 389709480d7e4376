"""Fault injection shared by the worker-loss tests: kill a real worker mid-segmentation."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any


def kill_worker_when_segmenting(client: Any, pid: int, delay_s: float = 0.2,
                                timeout_s: float = 120) -> tuple[threading.Thread,
                                                                 threading.Event]:
    """Start a thread that ``kill -9``s worker ``pid`` once any segmentation task runs.

    Returns the thread and an event set when the kill happened, so the test can assert that
    it really exercised a loss.
    """
    killed = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = client.processing()
            if any(any("segment_tile_task" in str(k) for k in keys) for keys in busy.values()):
                time.sleep(delay_s)
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed
