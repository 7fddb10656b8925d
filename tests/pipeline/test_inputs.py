"""Slide discovery on awkward folders (symlink loops, broken links, symlinked sub-folders)
and slide ids end to end: slides that share a name never overwrite each other's outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_prune.pipeline.batch import run_batch
from wsi_prune.pipeline.demo import demo_config
from wsi_prune.pipeline.inputs import discover


def test_folder_without_slides_is_an_error_naming_it(tmp_path: Path) -> None:
    """An empty folder (or one holding only plain images without --mpp) is a usage error, not a
    run that writes an empty predictions.csv and exits 0."""
    from click.testing import CliRunner

    from wsi_prune.cli import main
    from wsi_prune.errors import ConfigError

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "notes.txt").write_text("x")
    (d / "sub" / "photo.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"no slide files found.*need --mpp") as err:
        discover([d])
    assert str(d) in str(err.value)
    assert [e.path.name for e in discover([d], mpp=0.5)] == ["photo.png"]  # with --mpp it is one
    res = CliRunner().invoke(main, ["run", str(d), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "no slide files found" in res.output, res.output
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_plain_images_beside_slides_are_named_as_left_out(tmp_path: Path, caplog) -> None:
    """Without --mpp a .png or .jpg beside slides is not a slide; the run says so instead of
    looking complete."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.svs").write_bytes(b"x")
    (d / "sub" / "photo.png").write_bytes(b"x")
    (d / "sub" / "scan.JPG").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    with caplog.at_level("WARNING", logger="wsi_prune.pipeline.inputs"):
        assert [e.path.name for e in discover([d])] == ["a.svs"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "2 plain image(s) left out" in msg and "sub/photo.png" in msg and "--mpp" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_prune.pipeline.inputs"):
        got = sorted(e.path.name for e in discover([d], mpp=0.5))
    assert got == ["a.svs", "photo.png", "scan.JPG"] and not caplog.records


def test_symlink_loops_broken_links_and_linked_folders(tmp_path: Path, caplog) -> None:
    d = tmp_path / "in"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "a.svs").write_bytes(b"x")
    (d / "sub" / "deeper" / "b.svs").write_bytes(b"x")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "h.svs").write_bytes(b"x")
    (d / "sub" / "deeper" / "up").symlink_to("../..")  # a loop back to the top
    (d / "self").symlink_to("self")  # a link to itself
    (d / "loop.svs").symlink_to("loop.svs")  # a "slide" that is a link to itself
    (d / "gone.svs").symlink_to("nowhere.svs")
    outside = tmp_path / "archive"
    outside.mkdir()
    (outside / "c.svs").write_bytes(b"x")
    (d / "linked").symlink_to(outside)  # a linked slide folder is searched
    entries = discover([d])
    assert [e.path.relative_to(d).as_posix() for e in entries] == [
        "gone.svs", "linked/c.svs", "loop.svs", "sub/a.svs", "sub/deeper/b.svs"]
    assert "already searched" in caplog.text  # the loop was seen and not followed

    from wsi_prune.errors import UnsupportedSlide
    from wsi_prune.io.slide import Slide

    with pytest.raises(UnsupportedSlide, match="symlink loop"):
        Slide(d / "loop.svs")
    with pytest.raises(UnsupportedSlide, match="broken symlink .*nowhere.svs"):
        Slide(d / "gone.svs")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_named_like_a_slide_is_a_failed_slide_and_the_run_goes_on(svs_slide, tmp_path):
    """A FIFO named .svs (or .vms) beside a slide: listed (it was left out without a word),
    never opened (opening it waits for a writer: a .vms one, read as a VMS index, hung the
    run), recorded as failed with what it is (a .svs one was called an empty file); the
    slide completes."""
    d = tmp_path / "in"
    d.mkdir()
    os.symlink(svs_slide, d / "good.svs")
    os.mkfifo(d / "pipe.svs")
    os.mkfifo(d / "index.vms")
    entries = discover([d])
    assert [e.path.name for e in entries] == ["good.svs", "index.vms", "pipe.svs"]
    rows = {r["id"]: r for r in run_batch(entries, tmp_path / "out", demo_config(),
                                          progress=False)}
    assert rows["good"]["status"] == "ok", rows["good"]["error"]
    for sid in ("pipe", "index"):
        assert rows[sid]["status"] == "failed"
        assert "is a FIFO (named pipe), not a slide file" in rows[sid]["error"]


@pytest.fixture(scope="module")
def look_alikes(tmp_path_factory) -> Path:
    """Five different slides named alike: an emoji, a.svs in two folders, A.svs and a.svs."""
    from wsi_prune.synth import write_dataset

    src = tmp_path_factory.mktemp("src")
    slides = [s.path for s in write_dataset(src, n=5, seed=11, size=1024)]
    d = tmp_path_factory.mktemp("alike")
    for rel, s in zip(("😐.svs", "sub1/a.svs", "sub2/a.svs", "cases/A.svs", "cases/a.svs"),
                      slides, strict=True):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s, d / rel)
    return d


def test_look_alike_names_get_their_own_outputs(look_alikes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = run_batch([look_alikes], out, demo_config(), progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 5, rows
    ids = {Path(r["path"]).relative_to(look_alikes).as_posix(): r["id"] for r in rows}
    assert ids == {"😐.svs": "neutral-face", "sub1/a.svs": "sub1_a", "sub2/a.svs": "sub2_a",
                   "cases/A.svs": "cases_A", "cases/a.svs": "cases_a-2"}
    for rel, sid in ids.items():  # every store was made from its own slide
        g = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
        assert g.attrs["slide_file"]["path"] == os.path.abspath(look_alikes / rel)
        assert (out / sid / "heatmap.png").is_file()
    assert len({r["probability"] for r in rows}) == 5


def test_another_slide_never_takes_over_an_id_across_runs(look_alikes: Path,
                                                          tmp_path: Path) -> None:
    """Run 1 sees only sub1/a.svs (id ``a``); run 2 on the same OUT sees only sub2/a.svs, also
    ``a``: it is refused for that slide instead of overwriting run 1's outputs; the same slide
    moved elsewhere is still recognised as itself."""
    out = tmp_path / "out"
    cfg = demo_config()
    first = run_batch([look_alikes / "sub1" / "a.svs"], out, cfg, progress=False)
    assert first[0]["id"] == "a" and first[0]["status"] == "ok"
    before = json.loads((out / "a.zarr" / "zarr.json").read_text())["attributes"]
    second = run_batch([look_alikes / "sub2" / "a.svs"], out, cfg, progress=False)
    assert second[0]["status"] == "failed"
    assert second[0]["error"].startswith("output-conflict: ")
    assert "another slide" in second[0]["error"] and "sub1" in second[0]["error"]
    after = json.loads((out / "a.zarr" / "zarr.json").read_text())["attributes"]
    assert after["result"] == before["result"]  # run 1's outputs untouched
    # the same slide, moved (same name and size): its own outputs, skipped
    moved = tmp_path / "moved" / "a.svs"
    moved.parent.mkdir()
    shutil.move(look_alikes / "sub1" / "a.svs", moved)
    try:
        third = run_batch([moved], out, cfg, progress=False)
        assert third[0]["status"] == "skipped", third
    finally:
        shutil.move(moved, look_alikes / "sub1" / "a.svs")


def _tissue_image(seed: int, side: int = 1024) -> np.ndarray:
    """Glass with a pink-purple textured block (about 30 % of the image): the mask finds it."""
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), 238, np.uint8)
    block = np.array([196, 112, 176]) + rng.integers(-40, 40, (side // 2, side // 2 + 64, 3))
    img[side // 4:side // 4 + side // 2, side // 5:side // 5 + side // 2 + 64] = block.clip(0, 255)
    return img


def test_a_dicom_series_is_one_slide(tmp_path: Path) -> None:
    """A DICOM slide is a folder of files, one per level, any of which OpenSlide opens as the
    whole slide: discovery keeps one file per series (named after its folder when the folder
    holds it alone, qualified like any id), two series in one folder stay two slides, a
    ``.dcm`` that is no slide stays a slide that fails, and a run gives one row per series."""
    from tests._dicom import write_dicom_slide

    d = tmp_path / "in"
    write_dicom_slide(d / "caseA" / "slide", _tissue_image(0))
    write_dicom_slide(d / "caseB" / "slide", _tissue_image(1), levels=3)
    write_dicom_slide(d / "mixed", _tissue_image(2), names=("a0.dcm", "a1.dcm"))
    write_dicom_slide(d / "mixed", _tissue_image(3), names=("b0.dcm", "b1.dcm"))
    (d / "junk").mkdir()
    (d / "junk" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    write_dicom_slide(d / "withsvs", _tissue_image(6))
    (d / "withsvs" / "other.svs").write_bytes(b"")  # another slide beside the series
    entries = discover([d])
    assert [(e.id, e.path.relative_to(d).as_posix()) for e in entries] == [
        ("caseA_slide", "caseA/slide/level0.dcm"), ("caseB_slide", "caseB/slide/level0.dcm"),
        ("bad", "junk/bad.dcm"), ("a0", "mixed/a0.dcm"), ("b0", "mixed/b0.dcm"),
        ("level0", "withsvs/level0.dcm"), ("other", "withsvs/other.svs")]
    # files given one by one (a shell glob) are one slide too
    assert [e.id for e in discover(sorted((d / "caseB" / "slide").iterdir()))] == ["slide"]
    # a slide list may name a series by its folder; a folder of two series stays a folder
    (d / "list.csv").write_text("path,label\ncaseA/slide,1\nmixed,0\n")
    listed = discover([d / "list.csv"])
    assert [(e.id, e.path.relative_to(d).as_posix(), e.label) for e in listed] == [
        ("slide", "caseA/slide/level0.dcm", 1), ("mixed", "mixed", 0)]

    rows = {r["id"]: r for r in run_batch([d / "caseA", d / "junk"], tmp_path / "out",
                                          demo_config(), progress=False)}
    assert set(rows) == {"slide", "bad"}
    assert rows["slide"]["status"] == "ok", rows["slide"]
    assert rows["slide"]["mpp"] == pytest.approx(0.5) and rows["slide"]["tissue_tiles"] > 0
    assert rows["bad"]["status"] == "failed" and "bad.dcm" in rows["bad"]["error"]
    g = zarr.open_group(str(tmp_path / "out" / "slide.zarr"), mode="r")
    assert g.attrs["slide"]["width"] == 1024


def test_single_slide_commands_take_a_dicom_folder(tmp_path: Path) -> None:
    """``info`` and ``tile`` take a folder holding one slide (a DICOM series) as that slide,
    and refuse a folder of several, naming them."""
    from click.testing import CliRunner

    from tests._dicom import write_dicom_slide
    from wsi_prune.cli import main

    write_dicom_slide(tmp_path / "case" / "slide", _tissue_image(4), levels=3)
    write_dicom_slide(tmp_path / "case" / "other", _tissue_image(5))
    res = CliRunner().invoke(main, ["info", str(tmp_path / "case" / "slide"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout[res.stdout.index("{"):])
    assert rep["vendor"] == "dicom" and rep["levels"] == 3 and rep["mpp"] == pytest.approx(0.5)
    assert rep["tissue_tiles"] > 0
    res = CliRunner().invoke(main, ["tile", str(tmp_path / "case" / "slide"),
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    g = zarr.open_group(str(tmp_path / "out" / "slide.zarr"), mode="r")
    assert g["tiles/coords"].shape[0] == rep["tissue_tiles"]
    res = CliRunner().invoke(main, ["info", str(tmp_path / "case")])
    assert res.exit_code != 0
    assert "folder holds 2 slides (other/level0.dcm, slide/level0.dcm)" in res.output


@pytest.mark.parametrize("inside", ["sub", "same"])
def test_an_out_inside_the_slide_folder_is_not_searched_for_slides(svs_slide, tmp_path, inside):
    """OUT inside the slide folder (or the slide folder itself): the next run finds the same
    one slide, not its own ``heatmap.tif`` files; another run's OUT and Zarr stores in the
    folder are not searched either."""
    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(svs_slide, d / "a.svs")
    out = d / "out" if inside == "sub" else d
    first = run_batch([d], out, demo_config(), progress=False)
    assert [(r["id"], r["status"]) for r in first] == [("a", "ok")]
    assert (out / "a" / "heatmap.tif").is_file()
    # a second run's OUT beside it, and a stray store holding a slide-named file
    other = run_batch([d / "a.svs"], d / "other", demo_config(), progress=False)
    assert other[0]["status"] == "ok"
    (d / "x.zarr").mkdir()
    (d / "x.zarr" / "c.tif").write_bytes(b"")
    again = run_batch([d], out, demo_config(), progress=False)
    assert [(r["id"], r["status"]) for r in again] == [("a", "skipped")]
    assert [e.path for e in discover([d], out=out)] == [d / "a.svs"]
    # with --mpp, PNGs are slides too, but not a run's pictures (heat map, token QC, top tiles)
    assert (out / "a" / "heatmap.png").is_file() and any((out / "a" / "top_tiles").iterdir())
    (d / "photo.png").write_bytes(b"")
    assert sorted(e.path.name for e in discover([d], mpp=0.5, out=out)) == ["a.svs", "photo.png"]


def test_no_tissue_says_why_when_the_picture_shows_it(tmp_path):
    """A slide without tissue fails as ``no-tissue``; when its picture shows why (empty glass,
    no colour at all, dark throughout), the error says so. A colour slide whose tissue is
    too small for a tile gets no guess."""
    import tifffile

    rng = np.random.default_rng(0)

    def write(name, img):
        with tifffile.TiffWriter(tmp_path / name) as tw:
            tw.write(img, tile=(256, 256), photometric="rgb" if img.ndim == 3 else "minisblack",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")

    side = 1024
    write("glass.tif", np.full((side, side, 3), 242, np.uint8))
    grey = np.full((side, side), 235, np.uint8)
    grey[300:700, 300:700] = rng.integers(40, 180, (400, 400))
    write("grey.tif", grey)
    dark = np.full((side, side, 3), 8, np.uint8)
    dark[300:700, 300:700, 1] = rng.integers(60, 200, (400, 400))
    write("fluo.tif", dark)
    speck = np.full((side, side, 3), 238, np.uint8)
    # 100 µm of stain across a tile corner: below min_region_um2, and 20 % of each tile
    speck[348:548, 348:548] = (150, 60, 140)
    write("speck.tif", speck)
    # tissue throughout, but 150 x 120 px at 0.5 µm/px: smaller than one 112 µm tile
    write("tiny.tif", rng.integers(60, 200, (120, 150, 3)).astype(np.uint8))
    rows = {r["id"]: r for r in run_batch([tmp_path], tmp_path / "out", demo_config(),
                                          progress=False)}
    assert all(r["error"].startswith("no-tissue: ") for r in rows.values()), rows
    assert rows["tiny"]["error"].endswith(
        "the slide (150×120 px at 0.5 µm/px: 75×60 µm) is smaller than one tile (224 px at "
        "0.5 µm/px: 112 µm); check its --mpp or use a smaller tiling.tile_px")
    assert "looks like empty glass" in rows["glass"]["error"]
    assert "has no colour (greyscale or one channel)" in rows["grey"]["error"]
    assert "dark throughout" in rows["fluo"]["error"]
    assert rows["speck"]["error"].endswith("no tissue tile at the configured threshold")


def test_the_pieces_of_a_vms_slide_are_not_slides(tmp_path: Path) -> None:
    """A Hamamatsu VMS index names its JPEG pieces, map and optimisation files: with --mpp
    (plain images are slides then) they are still parts of that one slide, found in a folder
    or given one by one; an image the index does not name stays a slide, and a slide list row
    that gives a piece its own id is the user's choice."""
    d = tmp_path / "case"
    d.mkdir()
    (d / "s.vms").write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=s.jpg\nImageFile(1,0)=s_1.jpg\n"
        "MapFile=s_map.jpg\nOptimisationFile=s.opt\nMacroImage=s_macro.jpg\n; comment=x.jpg\n")
    for name in ("s.jpg", "s_1.jpg", "s_map.jpg", "s_macro.jpg", "s.opt", "x.jpg", "other.png"):
        (d / name).write_bytes(b"")
    names = sorted(e.path.name for e in discover([d], mpp=0.5))
    assert names == ["other.png", "s.vms", "x.jpg"]
    assert [e.id for e in discover([d])] == ["s"]  # without --mpp no image is a slide anyway
    given = sorted(d.glob("*.jpg")) + [d / "s.vms"]
    assert sorted(e.path.name for e in discover(given, mpp=0.5)) == ["s.vms", "x.jpg"]
    # the pieces alone (no index among the inputs) are plain images, as given
    assert len(discover([d / "s.jpg", d / "s_1.jpg"], mpp=0.5)) == 2
    lst = tmp_path / "slides.csv"
    lst.write_text("path,id\ncase/s.vms,\ncase/s_map.jpg,themap\n")
    assert sorted(e.id for e in discover([lst], mpp=0.5)) == ["s", "themap"]


def test_slide_lists_as_spreadsheets_export_them(tmp_path: Path) -> None:
    """A slide list with Excel's byte-order mark, capitalised headers, ';' between columns and
    a decimal comma, or tabs, reads as the plain CSV does; without a path column the error
    shows what the first line held."""
    from wsi_prune.errors import ConfigError

    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"x")
    variants = {
        "plain.csv": "path,id,mpp,label\na.svs,A,0.25,1\nb.svs,,0.5,0\n",
        "excel-utf8.csv": "\ufeffPath,ID,MPP,Label\r\na.svs,A,0.25,1\r\nb.svs,,0.5,0\r\n",
        "excel-semicolon.csv": "\ufeffpath;id;mpp;label\r\na.svs;A;0,25;1\r\nb.svs;;0,5;0\r\n",
        "tabs.csv": "path\tid\tmpp\tlabel\na.svs\tA\t0.25\t1\nb.svs\t\t0.5\t0\n",
    }
    got = {}
    for name, text in variants.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        got[name] = [(e.id, e.path.name, e.mpp, e.label) for e in discover([tmp_path / name])]
    assert got["plain.csv"] == [("A", "a.svs", 0.25, 1), ("b", "b.svs", 0.5, 0)]
    assert all(v == got["plain.csv"] for v in got.values()), got
    (tmp_path / "wrong.csv").write_text("file,mpp\na.svs,0.25\n")
    with pytest.raises(ConfigError, match=r"needs a 'path' column; its first line has "
                                          r"\['file', 'mpp'\]"):
        discover([tmp_path / "wrong.csv"])
