"""``slidecensus normalize`` and ``--stain-norm``: outputs, metrics, bad inputs, manifest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage import io

from slidecensus.cli import main


@pytest.fixture(scope="module")
def monuseg(shared_data):
    return sorted((shared_data / "monuseg-train" / "images").glob("*.png"))


def test_normalize_writes_images_metrics_and_a_contact_sheet(monuseg, tmp_path, capsys):
    out = tmp_path / "n"
    args = ["normalize", str(monuseg[1]), str(monuseg[2]), "--target", str(monuseg[0]),
            "--method", "macenko", "--out", str(out)]
    assert main(args) == 0
    assert "2 of 2 images normalised" in capsys.readouterr().out
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["status"]) == ["ok", "ok"]
    for f, (_, row) in zip(monuseg[1:3], table.iterrows(), strict=True):
        written = io.imread(out / f.name)
        assert written.shape == io.imread(f)[..., :3].shape
        assert row["width"] == written.shape[1] and row["height"] == written.shape[0]
        assert row["correlation_after"] > row["correlation_before"]
        assert 0.9 < row["ssim"] <= 1.0
    assert (out / "normalize.png").stat().st_size > 10_000


def test_a_bad_input_fails_alone_with_its_reason(monuseg, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "n"
    rc = main(["normalize", str(bad), str(monuseg[1]), "--target", str(monuseg[0]),
               "--out", str(out)])
    assert rc == 1
    assert "failed: " in capsys.readouterr().out
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["status"]) == ["failed", "ok"]
    assert "broken.png" in table["input"][0] and len(table["error"][0]) > 5
    assert (out / monuseg[1].name).exists()


def test_bad_targets_and_models_are_one_line_errors(monuseg, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    grey = tmp_path / "grey.png"
    io.imsave(grey, np.repeat(io.imread(monuseg[0])[..., :1], 3, axis=2), check_contrast=False)
    cell = tmp_path / "cell.pt"
    import torch

    torch.save({"format": "slidecensus.infogan", "format_version": 1}, cell)
    cases = [(["--target", str(empty)], "holds no images"),
             (["--target", str(grey)], "grey-level"),
             (["--method", "neural", "--model", str(cell)], "not a slidecensus neural"),
             ([], "--target is needed")]
    for extra, message in cases:
        rc = main(["normalize", str(monuseg[1]), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, (extra, err)


def test_neural_trains_saves_and_is_reused(monuseg, tmp_path):
    model = tmp_path / "n.pt"
    assert main(["normalize", str(monuseg[1]), "--target", str(monuseg[0]), "--method",
                 "neural", "--iterations", "40", "--save-model", str(model),
                 "--out", str(tmp_path / "a")]) == 0
    first = io.imread(tmp_path / "a" / monuseg[1].name)
    mtime = model.stat().st_mtime_ns
    assert main(["normalize", str(monuseg[1]), "--target", str(monuseg[0]), "--method",
                 "neural", "--model", str(model), "--out", str(tmp_path / "b")]) == 0
    assert model.stat().st_mtime_ns == mtime  # reused, not retrained
    np.testing.assert_array_equal(io.imread(tmp_path / "b" / monuseg[1].name), first)


@pytest.mark.shared
def test_a_slide_comes_out_as_a_pyramid_of_the_same_size_and_mpp(cmu_svs, monuseg,
                                                                    tmp_path):
    from slidecensus.tiling import open_slide

    out = tmp_path / "n"
    assert main(["normalize", str(cmu_svs), "--target", str(monuseg[0]), "--out",
                 str(out)]) == 0
    with open_slide(cmu_svs) as src, open_slide(out / "CMU-1-Small-Region.tif") as dst:
        assert dst.shape == src.shape and len(dst.levels) > 1
        assert dst.mpp == pytest.approx(src.mpp, rel=1e-3)
    row = pd.read_csv(out / "metrics.csv").iloc[0]
    # a slide's histograms are its tissue's: Reinhard moves them towards the target's
    assert row["status"] == "ok" and row["correlation_after"] > row["correlation_before"]


def test_segment_with_stain_norm_none_matches_the_default_cells(marrow_pngs, tmp_path):
    """The segmenter calibrates itself (Reinhard to its target) either way, so ``none`` and
    the default find the same nuclei; macenko finds nearly as many."""
    counts = {}
    for norm in ("reinhard", "none", "macenko"):
        assert main(["segment", str(marrow_pngs[0]), "--out", str(tmp_path / f"{norm}.parquet"),
                     "--stain-norm", norm]) == 0
        counts[norm] = len(pd.read_parquet(tmp_path / f"{norm}.parquet"))
    assert counts["none"] == counts["reinhard"] > 300
    assert abs(counts["macenko"] - counts["reinhard"]) < 0.15 * counts["reinhard"]


def test_run_records_the_stain_norm_and_a_change_recomputes(marrow_pngs, tmp_path):
    cohort = tmp_path / "c.csv"
    pd.DataFrame({"path": [str(marrow_pngs[0])], "mpp": [0.25]}).to_csv(cohort, index=False)
    out = tmp_path / "run"
    base = ["run", str(cohort), "--out", str(out), "--no-classify", "--cluster", "local:1"]
    assert main([*base, "--stain-norm", "none"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["params"]["stain_norm"]["method"] == "none"
    assert main([*base, "--stain-norm", "macenko", "--stain-target", str(marrow_pngs[1])]) == 0
    second = json.loads((out / "manifest.json").read_text())
    assert second["params"]["stain_norm"]["method"] == "macenko"
    assert second["params"]["stain_norm"]["target"]["name"] == marrow_pngs[1].name
    assert second["digest"]["params"] != first["digest"]["params"]
