"""Cohort files: CSV, folder and glob forms; malformed cohorts stop with the line named."""

from __future__ import annotations

import pytest

from slidecensus.engine.cohort import read_cohort, safe_name
from slidecensus.errors import InvalidInputError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_csv_with_ids_labels_and_relative_paths(tmp_path):
    _touch(tmp_path / "a.svs")
    (tmp_path / "c.csv").write_text("path,slide_id,label\na.svs,A,normal\n/abs/b.tiff,B,abn\n")
    t = read_cohort(tmp_path / "c.csv")
    assert t["slide_id"].tolist() == ["A", "B"]
    assert t["path"].tolist() == [str(tmp_path / "a.svs"), "/abs/b.tiff"]
    assert t["label"].tolist() == ["normal", "abn"]


def test_slide_id_defaults_to_file_stem(tmp_path):
    (tmp_path / "c.csv").write_text("path\nx/one.svs\ny/two.tif\n")
    assert read_cohort(tmp_path / "c.csv")["slide_id"].tolist() == ["one", "two"]


def test_missing_path_column_names_line_1(tmp_path):
    (tmp_path / "c.csv").write_text("file,slide_id\na.svs,A\n")
    with pytest.raises(InvalidInputError, match=r"line 1: no 'path' column"):
        read_cohort(tmp_path / "c.csv")


def test_duplicate_slide_id_names_both_lines(tmp_path):
    (tmp_path / "c.csv").write_text("path,slide_id\na.svs,A\nb.svs,B\nc.svs,A\n")
    with pytest.raises(InvalidInputError, match=r"line 4: duplicate slide_id 'A' \(first on "
                                                r"line 2\)"):
        read_cohort(tmp_path / "c.csv")


def test_missing_slide_id_names_the_line(tmp_path):
    (tmp_path / "c.csv").write_text("path,slide_id\na.svs,A\nb.svs,\n")
    with pytest.raises(InvalidInputError, match="line 3: missing slide_id"):
        read_cohort(tmp_path / "c.csv")


def test_empty_path_names_the_line(tmp_path):
    (tmp_path / "c.csv").write_text("path,slide_id\n,A\n")
    with pytest.raises(InvalidInputError, match="line 2: empty path"):
        read_cohort(tmp_path / "c.csv")


def test_folder_and_glob(tmp_path):
    for n in ("b.svs", "a.png", "notes.txt", "sub/c.tiff"):
        _touch(tmp_path / n)
    assert read_cohort(tmp_path)["slide_id"].tolist() == ["a", "b"]
    assert read_cohort(str(tmp_path / "**" / "*.tiff"))["slide_id"].tolist() == ["c"]
    with pytest.raises(InvalidInputError, match="matches no files"):
        read_cohort(str(tmp_path / "*.ndpi"))


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/abs/path", "a/b\\c", "..", "",
                                     "x\x00y"])
def test_hostile_slide_ids_cannot_escape(hostile, tmp_path):
    name = safe_name(hostile)
    assert name and "/" not in name and "\\" not in name and ".." not in name
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_ids_that_collide_after_sanitising_are_refused(tmp_path):
    (tmp_path / "c.csv").write_text("path,slide_id\na.svs,a/b\nb.svs,a_b\n")
    with pytest.raises(InvalidInputError, match="same output name"):
        read_cohort(tmp_path / "c.csv")


def test_an_mpp_column_gives_each_image_its_scale(tmp_path):
    """A cohort's optional ``mpp`` column reaches the table (empty = the file's own), and a
    value that is not a positive number is refused with its line."""
    import math

    from slidecensus.engine.cohort import read_cohort
    from slidecensus.errors import InvalidInputError

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    good = tmp_path / "good.csv"
    good.write_text("path,mpp\na.png,0.1\nb.png,\n")
    table = read_cohort(good)
    assert table["mpp"].iloc[0] == 0.1 and math.isnan(table["mpp"].iloc[1])
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mpp\na.png,0.1\nb.png,-2\n")
    with pytest.raises(InvalidInputError, match="line 3: mpp must be a positive number"):
        read_cohort(bad)
