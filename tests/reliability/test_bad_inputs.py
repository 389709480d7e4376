"""Bad inputs: each file of the corpus alone at open_slide, then all of them in one cohort
run beside good slides, then malformed cohort files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidecensus.cli import main
from slidecensus.engine.census import run_cohort
from slidecensus.errors import InvalidInputError, SlideReadError
from slidecensus.tiling import open_slide

from .corpus import PARAMS, PWNED, Case, Corpus


def _cases_with_open_errors() -> list[str]:
    # the ids are fixed by corpus.build; the parametrisation must not build the corpus
    return ["missing", "folder", "empty", "truncated", "corrupt_tile", "noise", "text",
            "cmyk", "huge", "shell_missing"]


def _case(corpus: Corpus, slide_id: str) -> Case:
    return next(c for c in corpus.cases if c.slide_id == slide_id)


# ------------------------------------------------------------------ one file at a time


@pytest.mark.parametrize("slide_id", _cases_with_open_errors())
def test_open_slide_raises_the_typed_error(corpus, slide_id):
    """Opening (and reading all of level 0) raises the case's typed error, whose one-line
    message names the file."""
    case = _case(corpus, slide_id)
    assert case.open_error is not None
    path = corpus.paths[slide_id]
    with pytest.raises(case.open_error, match=case.open_match) as info:
        with open_slide(path) as s:
            h, w = s.shape
            s.read_region(0, 0, 0, w, h)
    assert isinstance(info.value, SlideReadError)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


@pytest.mark.parametrize("slide_id, note", [("gray", "grayscale -> RGB"),
                                            ("rgba", "RGBA -> RGB over white"),
                                            ("deep", "16-bit -> 8-bit")])
def test_images_needing_conversion_open_with_a_warning(corpus, slide_id, note):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_slide(corpus.paths[slide_id]) as s:
            rgb = s.read_region(0, 0, 0, 64, 64)
            assert s.conversions == (f"converted {note}",)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert any(note in str(w.message) for w in caught)


def test_corpus_case_list_matches_the_parametrisation(corpus):
    with_errors = {c.slide_id for c in corpus.cases if c.open_error is not None}
    assert with_errors == set(_cases_with_open_errors())


# ------------------------------------------------------------------ one cohort run


@pytest.fixture(scope="module")
def census(corpus, client, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The whole corpus as one cohort, run once."""
    out = tmp_path_factory.mktemp("census") / "out dir"
    base = tmp_path_factory.getbasetemp()  # holds the corpus and every other temp folder
    files_before = set(base.rglob("*"))
    table = run_cohort(corpus.csv, out, client=client, params=PARAMS)
    outside = {p for p in base.rglob("*") if not p.is_relative_to(out)} - files_before
    assert not outside, f"the run wrote outside its output folder: {sorted(outside)[:5]}"
    return out, table


def test_every_row_ends_as_expected_with_a_specific_one_line_error(corpus, census):
    out, _ = census
    on_disk = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert on_disk.slide_id.tolist() == [c.slide_id for c in corpus.cases]
    rows = on_disk.set_index("slide_id")
    for case in corpus.cases:
        row = rows.loc[case.slide_id]
        assert row.status == case.status, (case.slide_id, row.error)
        if case.status == "failed":
            assert str(corpus.paths[case.slide_id]) in row.error, case.slide_id
            assert re.search(case.error, row.error), (case.slide_id, row.error)
            assert "\n" not in row.error and "Traceback" not in row.error
            assert int(row.n_cells) == 0
        else:
            assert row.error == "", (case.slide_id, row.error)
            assert int(row.tiles_done) == int(row.tiles_planned), case.slide_id
        if case.warning:
            assert re.search(case.warning, row.warning), (case.slide_id, row.warning)
        elif case.status == "ok":
            assert row.warning == "", (case.slide_id, row.warning)


def test_good_slides_complete_with_cells(corpus, census):
    out, table = census
    rows = table.set_index("slide_id")
    for sid in ("good", "wide"):
        n = int(rows.loc[sid, "n_cells"])
        assert rows.loc[sid, "status"] == "ok" and n > 50
        assert len(pd.read_parquet(out / "cells" / f"{sid}.parquet")) == n


def test_converted_and_renamed_copies_give_the_good_slides_cells(corpus, census):
    """RGBA, 16-bit and oddly named copies carry the good slide's pixels: converting them
    must give exactly the good slide's census (nothing mangled, nothing lost)."""
    out, _ = census
    good = pd.read_parquet(out / "cells" / "good.parquet")
    from slidecensus.engine.cohort import safe_name

    same = [c.slide_id for c in corpus.cases if c.same_cells_as_good]
    assert len(same) >= 4
    for sid in same:
        cells = pd.read_parquet(out / "cells" / f"{safe_name(sid)}.parquet")
        pd.testing.assert_frame_equal(cells.drop(columns="slide_id"),
                                      good.drop(columns="slide_id"), obj=sid)


def test_all_white_slide_is_ok_with_zero_cells(census):
    _, table = census
    row = table.set_index("slide_id").loc["white"]
    assert (row.status, int(row.n_cells), int(row.tiles_planned)) == ("ok", 0, 0)


def test_corrupt_tile_fails_its_slide_naming_the_tile(corpus, census):
    """A tile whose JPEG bytes are garbage fails the slide (default): the error names the
    census tile, its position in px and µm, and the damaged native tile; tiles_done says
    nothing was committed."""
    out, table = census
    row = table.set_index("slide_id").loc["corrupt_tile"]
    m = re.search(r"tile (\d+) of (\d+) at \((\d+), (\d+)\) µm \(level-0 px (\d+), (\d+)\)",
                  row.error)
    assert m, row.error
    _, n, x_um, y_um, x, y = (int(v) for v in m.groups())
    assert n == int(row.tiles_planned) == int(table.set_index("slide_id").loc["wide",
                                                                              "tiles_planned"])
    assert (x_um, y_um) == (round(x * 0.25), round(y * 0.25))
    assert int(row.tiles_done) == 0
    assert not (out / "cells" / "corrupt_tile.parquet").exists()


def test_hostile_slide_id_lands_inside_the_output_folder(census):
    out, _ = census
    assert (out / "cells" / "escape.parquet").is_file()
    assert (out / "slides" / "escape.json").is_file()
    import zarr

    assert "escape" in zarr.open_group(out / "census.zarr", mode="r")
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


def test_no_shell_ever_saw_a_cohort_path(corpus, census):
    """Paths full of shell syntax are used as given: the good copy is read, the missing one
    fails as missing, and no `touch PWNED` ran anywhere."""
    rows = census[1].set_index("slide_id")
    assert rows.loc["shell_path", "status"] == "ok"
    assert "no such file" in rows.loc["shell_missing", "error"]
    for where in (corpus.root, corpus.root / "inputs", Path.cwd()):
        assert not (where / PWNED).exists()


def test_partial_mode_counts_the_readable_tiles_and_says_which_are_missing(corpus, census,
                                                                           client, tmp_path):
    """With ``max_bad_tiles`` the same slide is ``partial``: tiles_done < tiles_planned,
    the error lists every unreadable tile, and its cells are exactly the undamaged slide's
    cells outside the unreadable tiles' cores."""
    out, _ = census
    one = pd.DataFrame([{"slide_id": "corrupt_tile", "path": str(corpus.paths["corrupt_tile"]),
                         "label": ""}])
    res = run_cohort(one, tmp_path, client=client, params=PARAMS, max_bad_tiles=8).iloc[0]
    assert res.status == "partial"
    bad = json.loads((tmp_path / "slides" / "corrupt_tile.json").read_text())["bad_tiles"]
    cores = [(b["x_px"], b["y_px"]) for b in bad]
    assert 1 <= len(cores) and res.tiles_done == res.tiles_planned - len(cores)
    assert res.error.startswith(f"{len(cores)} of {res.tiles_planned} tiles unreadable")
    listed = re.findall(r"tile \d+ at \((\d+), (\d+)\) µm", res.error)
    assert [(round(x * 0.25), round(y * 0.25)) for x, y in cores] == [
        (int(a), int(b)) for a, b in listed]
    assert "first reason: corrupt tile" in res.error and "\n" not in res.error
    cells = pd.read_parquet(tmp_path / "cells" / "corrupt_tile.parquet")
    whole = pd.read_parquet(out / "cells" / "wide.parquet")
    edge = PARAMS.tile_size
    lost = np.zeros(len(whole), bool)
    for x, y in cores:
        lost |= whole.x_px.between(x, x + edge, inclusive="left").to_numpy() & \
            whole.y_px.between(y, y + edge, inclusive="left").to_numpy()
    assert lost.any()  # the damaged tile held cells
    kept = whole[~lost]
    assert len(cells) == res.n_cells == len(kept)
    np.testing.assert_allclose(np.sort(cells.x_px.to_numpy()), np.sort(kept.x_px.to_numpy()))
    np.testing.assert_allclose(np.sort(cells.y_px.to_numpy()), np.sort(kept.y_px.to_numpy()))


# ------------------------------------------------------------------ malformed cohorts


@pytest.mark.parametrize("text, line, what", [
    ("slide_id,label\na,normal\n", 1, "no 'path' column"),
    ("path,slide_id\n{good},a\n{good},b\n{good},a\n", 4, "duplicate slide_id 'a'"),
    ("path,slide_id\n{good},a\n{good},\n", 3, "missing slide_id"),
])
def test_malformed_cohort_stops_before_any_work_naming_the_line(corpus, tmp_path, capsys,
                                                                text, line, what):
    csv = tmp_path / "cohort.csv"
    csv.write_text(text.format(good=corpus.good))
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=rf"line {line}: {re.escape(what)}"):
        run_cohort(csv, out, cluster="local:1")
    assert not out.exists()  # nothing written, no cluster started
    # the command: exit status 2, one line naming the file and the line
    assert main(["run", str(csv), "--out", str(out), "--no-classify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"line {line}" in err and str(csv) in err
    assert not out.exists()
