"""The README demo: a synthetic normal/abnormal marrow cohort, a small model, the census.

Runs on a fresh machine with no slides: everything it reads it generates first. On CPU the
model is deliberately small and briefly trained (a demo, not a benchmark); pass a real
checkpoint to ``slidecensus run`` for real work.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out: str | Path, cluster: str = "local", seed: int = 0, n_slides: int = 4,
             size: int = 2048, iterations: int = 40, width: int = 16) -> int:
    """Synthesise ``n_slides`` slides, train a small model on them, run the census."""
    from .cluster import get_client
    from .engine.census import run_cohort
    from .engine.train import train_from_cohort
    from .models import TrainConfig
    from .tiling.synth import synth_cohort

    out = Path(out)
    t0 = time.perf_counter()
    with get_client(cluster) as client:
        cohort = synth_cohort(out / "slides", n_slides=n_slides, size=(size, size), seed=seed,
                              mpp=0.5, client=client)
        print(f"[{time.perf_counter() - t0:6.1f}s] synthetic cohort: {cohort}")
        model = out / "model.pt"
        config = TrainConfig(k=5, width=width, iterations=iterations, seed=seed,
                             checkpoint_every=max(iterations, 1))
        if not model.exists():
            train_from_cohort(cohort, model, config=config, client=client, seed=seed,
                              tiles_per_slide=4, cells_per_slide=1500)
        print(f"[{time.perf_counter() - t0:6.1f}s] model: {model}")
        table = run_cohort(cohort, out / "census", model=model, client=client)
    print(f"[{time.perf_counter() - t0:6.1f}s] census: {out / 'census'}")
    import pandas as pd

    truth_n, truth_blast = [], []
    for sid in table["slide_id"]:  # the synthetic slides' known cells, for comparison
        t = pd.read_parquet(out / "slides" / f"{sid}.cells.parquet")
        truth_n.append(len(t))
        truth_blast.append(float((t["type"] == "myeloblast").mean()) if len(t) else 0.0)
    table = table.assign(truth_cells=truth_n, truth_blasts=truth_blast)
    cols = [c for c in table.columns if c in ("slide_id", "label", "status", "n_cells",
                                              "truth_cells", "truth_blasts")
            or c.startswith("p_")]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nThe demo model trained {iterations} iterations at width {width} on CPU: enough to "
          f"exercise the pipeline, not to give meaningful clusters. Train for real with "
          f"`slidecensus train` (on a GPU) and pass `--model` to `slidecensus run`.")
    return 0 if (table["status"] == "ok").all() else 1
