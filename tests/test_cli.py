"""The command line: each subcommand reaches its library function; errors are one line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from slidecensus.cli import main


def test_console_script_is_installed():
    exe = shutil.which("slidecensus")
    cmd = [exe] if exe else [sys.executable, "-m", "slidecensus"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for name in ("synth", "segment", "train", "run", "info", "demo", "classify", "heatmap",
                 "gallery", "export", "cluster", "normalize"):
        assert name in res.stdout


@pytest.mark.shared
def test_info_describes_a_real_slide(cmu_svs, capsys):
    assert main(["info", str(cmu_svs)]) == 0
    out = capsys.readouterr().out
    assert "svs via tifffile" in out and "0.499" in out and "2220 x 2967" in out


def test_missing_slide_is_a_one_line_error_and_status_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slidecensus: error:") and "no such file" in err
    assert "\n" not in err


def test_bad_size_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path), "--size", "12by34"])
    assert e.value.code == 2
    assert "expected WxH" in capsys.readouterr().err


def test_synth_then_segment(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "c"), "--slides", "1", "--size", "640x512",
                 "--seed", "4"]) == 0
    cohort = pd.read_csv(tmp_path / "c" / "cohort.csv")
    assert len(cohort) == 1
    slide = cohort.path[0]
    out = tmp_path / "cells.parquet"
    assert main(["segment", slide, "--out", str(out)]) == 0
    cells = pd.read_parquet(out)
    truth = pd.read_parquet(tmp_path / "c" / f"{cohort.slide_id[0]}.cells.parquet")
    assert {"x_px", "y_px", "area_um2"} <= set(cells.columns)
    assert 0.7 * len(truth) < len(cells) < 1.3 * len(truth)
    # the file's own 0.5 µm/px was used: areas in µm² = px * 0.25
    assert (cells.area_um2 / cells.area_px).round(6).eq(0.25).all()


def test_run_with_a_malformed_cohort_stops_before_work(tmp_path, capsys):
    bad = tmp_path / "cohort.csv"
    bad.write_text("path,slide_id\na.svs,A\nb.svs,A\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out"), "--no-classify"]) == 2
    assert "line 3: duplicate slide_id 'A'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "slides.csv").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_local_cluster(tmp_path, capsys):
    """The README demo path (synth -> train -> census) on a 2-worker LocalCluster, small."""
    from slidecensus.demo import run_demo

    assert run_demo(tmp_path, cluster="local:2", n_slides=2, size=768, k=5, iterations=2,
                    width=8) == 0
    table = pd.read_csv(tmp_path / "census" / "slides.csv")
    assert table.status.tolist() == ["ok", "ok"]
    assert (table.n_cells > 0).all()
    props = table[[f"p_{j}" for j in range(5)]].to_numpy()
    assert abs(props.sum(axis=1) - 1).max() < 1e-9
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "census" / "census.zarr").is_dir()
    # the demo trains as a multi-slide cohort: crops in the cohort's style, recorded
    from slidecensus.models import load_model

    cfg = load_model(tmp_path / "model.pt").config
    assert cfg.crop_lab_target is not None and "cohort" in cfg.stain_norm
    printed = capsys.readouterr().out
    assert "truth_cells" in printed and "truth_blasts" in printed
    assert "purity of the clusters against the drawn cell types" in printed
    assert (tmp_path / "census" / "clusters.toml").is_file()
    assert (tmp_path / "census" / "gallery.png").is_file()


def test_demo_truth_matching_names_clusters_on_a_constructed_case():
    """Nuclei next to drawn cells take their types; far ones stay unmatched; each cluster
    is named after its majority type, and two clusters may share a name."""
    import numpy as np

    from slidecensus.demo import match_truth, name_clusters

    truth_xy = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    truth_ty = np.array(["myeloblast", "lymphocyte", "myeloblast"])
    cells_xy = np.array([[11.0, 9.0], [52.0, 49.0], [89.0, 12.0], [200.0, 200.0],
                         [49.0, 51.0]])
    types = match_truth(cells_xy, truth_xy, truth_ty, max_dist_px=5.0)
    assert types.tolist() == ["myeloblast", "lymphocyte", "myeloblast", "", "lymphocyte"]
    clusters = np.array([0, 1, 2, 1, 1])
    assert name_clusters(clusters, types, k=4) == {0: "myeloblast", 1: "lymphocyte",
                                                   2: "myeloblast"}


def test_segment_parameters_are_set_from_the_command_line(marrow_pngs, tmp_path, capsys):
    """`--set min_area_um2=30` reaches the segmentation: no nucleus under 30 µm² is left,
    and fewer nuclei are found than with the default 9.4 µm²."""
    base, small = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["segment", str(marrow_pngs[0]), "--out", str(base)]) == 0
    assert main(["segment", str(marrow_pngs[0]), "--out", str(small),
                 "--set", "min_area_um2=30", "--set", "hematoxylin-threshold=135"]) == 0
    a, b = pd.read_parquet(base), pd.read_parquet(small)
    assert a.area_um2.min() < 30 <= b.area_um2.min()
    assert len(b) < len(a)


@pytest.mark.parametrize(("item", "message"), [
    ("min_area=3", "NAME one of hematoxylin_threshold, smooth_um"),
    ("min_area_um2", "expected NAME=VALUE"),
    ("min_area_um2=big", "'big' is not a number"),
    ("hematoxylin_threshold=300", "hematoxylin_threshold must be in (0, 255)"),
    ("halo_um=inf", "halo_um must be a finite number"),
    ("smooth_um=nan", "smooth_um must be a finite number"),
    ("min_area_um2=500", "min_area_um2 (500.0) must be below max_area_um2 (400.0)"),
])
def test_bad_segment_parameter_stops_a_run_before_work(item, message, tmp_path, capsys):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("path\nnone.svs\n")
    assert main(["run", str(cohort), "--out", str(tmp_path / "out"), "--no-classify",
                 "--set", item]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["slidecensus.cli", "slidecensus"])
def test_the_module_forms_of_the_command_run(module):
    """`python -m slidecensus.cli` (what scripts/demo runs) and `python -m slidecensus` both
    reach the parser."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    assert "usage: slidecensus" in done.stdout and "demo" in done.stdout


def test_segmenter_train_then_segment_with_it(marrow_pngs, tmp_path, capsys):
    """`segmenter train` makes a U-Net file from an unlabelled image (weights-only loadable,
    its settings recorded, importance weights off and the stroma background and AdaBN on
    by default, each switchable); `segment --segmenter unet
    --segmenter-model` then writes the threshold segmenter's columns; a foreign file is
    refused in one line before any work."""
    from slidecensus.nuclei.unet import load_unet

    model = tmp_path / "unet.pt"
    assert main(["segmenter", "train", str(marrow_pngs[0]), "--out", str(model),
                 "--patches", "16", "--iterations", "3"]) == 0
    seg = load_unet(model)
    rec = seg.record
    assert rec["training"]["importance"] is False and rec["training"]["iterations"] == 3
    assert rec["training"]["background"] == "shaped" and rec["training"]["adapt_bn"] is True
    assert rec["seconds"]["adapt_bn"] > 0
    old_recipe = tmp_path / "unet-liberal.pt"
    assert main(["segmenter", "train", str(marrow_pngs[0]), "--out", str(old_recipe),
                 "--patches", "16", "--iterations", "3", "--background", "liberal",
                 "--no-adapt-bn", "--min-relative-iod", "0"]) == 0
    assert seg.config.min_relative_iod_um2 == 18.0
    assert load_unet(old_recipe).config.min_relative_iod_um2 == 0
    rec_old = load_unet(old_recipe).record
    assert rec_old["training"]["background"] == "liberal"
    assert rec_old["training"]["adapt_bn"] is False and rec_old["seconds"]["adapt_bn"] == 0
    out_u, out_t = tmp_path / "u.parquet", tmp_path / "t.parquet"
    assert main(["segment", str(marrow_pngs[0]), "--mpp", "0.25", "--out", str(out_u),
                 "--segmenter", "unet", "--segmenter-model", str(model)]) == 0
    assert main(["segment", str(marrow_pngs[0]), "--mpp", "0.25", "--out", str(out_t)]) == 0
    assert list(pd.read_parquet(out_u).columns) == list(pd.read_parquet(out_t).columns)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    capsys.readouterr()
    assert main(["segment", str(marrow_pngs[0]), "--out", str(tmp_path / "x.parquet"),
                 "--segmenter", "unet", "--segmenter-model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.pt" in err
    assert not (tmp_path / "x.parquet").exists()
