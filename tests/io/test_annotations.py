"""ASAP XML annotations, lesion masks, CAMELYON16 evaluation masks and slide labels."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from wsi_prune._ids import lookup_slide
from wsi_prune.errors import WsiPruneError
from wsi_prune.io.annotations import (
    Annotation,
    AnnotationError,
    evaluation_mask,
    lesion_mask,
    read_asap_xml,
)
from wsi_prune.io.labels import parse_label, read_labels


def write_xml(path: Path, polygons: list[tuple[str, np.ndarray]], shuffle: bool = False,
              fmt: str = "{:.4f}") -> Path:
    """Write polygons ``(group, (K, 2) level-0 px)`` as CAMELYON16 ASAP XML."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, (group, xy) in enumerate(polygons):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                          PartOfGroup=group, Color="#F4FA58")
        coords = ET.SubElement(a, "Coordinates")
        order = np.random.default_rng(i).permutation(len(xy)) if shuffle else range(len(xy))
        for k in order:
            ET.SubElement(coords, "Coordinate", Order=str(k), X=fmt.format(xy[k, 0]),
                          Y=fmt.format(xy[k, 1]))
    groups = ET.SubElement(root, "AnnotationGroups")
    for name in ("_0", "_1", "_2"):
        ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color="#64FE2E")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def circle(cx: float, cy: float, r: float, k: int = 256) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


def shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# -- XML -----------------------------------------------------------------------------------------


def test_xml_round_trip_keeps_coordinates_order_and_groups(tmp_path):
    polys = [("Tumor", circle(5000.25, 6000.5, 800.0, 64)), ("_0", square(100, 200, 300)),
             ("_1", square(1000, 1000, 50)), ("_2", square(5000, 6000, 100)),
             ("None", square(0, 0, 10))]
    path = write_xml(tmp_path / "tumor_001.xml", polys, shuffle=True)
    anns = read_asap_xml(path)
    assert [a.group for a in anns] == ["Tumor", "_0", "_1", "_2", "None"]
    assert [a.role for a in anns] == ["positive", "positive", "positive", "exclusion", "other"]
    for a, (_, xy) in zip(anns, polys, strict=True):
        assert a.coords.dtype == np.float64 and a.coords.shape == xy.shape
        np.testing.assert_allclose(a.coords, xy, atol=1e-4)  # Order, not file order
        assert a.type == "Polygon" and a.is_area


def test_xml_decimal_comma_and_dots(tmp_path):
    path = write_xml(tmp_path / "c.xml", [("_0", square(10.5, 20.25, 3))], fmt="{:.2f}")
    path.write_text(path.read_text().replace('X="10.50"', 'X="10,50"'))
    assert read_asap_xml(path)[0].coords[0].tolist() == [10.5, 20.25]
    root = ET.Element("ASAP_Annotations")
    a = ET.SubElement(ET.SubElement(root, "Annotations"), "Annotation", Name="d", Type="Dot",
                      PartOfGroup="_0")
    ET.SubElement(ET.SubElement(a, "Coordinates"), "Coordinate", Order="0", X="1", Y="2")
    ET.ElementTree(root).write(tmp_path / "dot.xml")
    (dot,) = read_asap_xml(tmp_path / "dot.xml")
    assert dot.role == "positive" and not dot.is_area
    assert not lesion_mask([dot], (100, 100), 1.0, 1.0).any()


@pytest.mark.parametrize("content, message", [
    (None, "no such annotation file"),
    ("<ASAP_Annotations><Annotations>", "not valid XML"),
    ("<Annotations/>", "not <ASAP_Annotations>"),
    ('<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="_0"><Coordinates>'
     '<Coordinate Order="0" X="12" Y="abc"/></Coordinates></Annotation></Annotations>'
     '</ASAP_Annotations>', "annotation 'a' coordinate 0 Y: 'abc' is not a number"),
    ('<ASAP_Annotations><Annotations><Annotation Name="b" PartOfGroup="_0"><Coordinates>'
     '<Coordinate Order="0" Y="1"/></Coordinates></Annotation></Annotations>'
     '</ASAP_Annotations>', "coordinate 0 X has no value"),
])  # fmt: skip
def test_xml_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as err:
        read_asap_xml(path)
    assert err.value.path == str(path) and str(path) in str(err.value)
    assert isinstance(err.value, WsiPruneError)


# -- masks ---------------------------------------------------------------------------------------


def test_lesion_mask_area_matches_polygon_area_minus_exclusion(tmp_path):
    level0_mpp, mpp = 0.25, 2.0
    disk = circle(4000, 4000, 1600)  # 400 µm radius, level-0 px
    hole = square(3600, 3600, 800)  # 200 x 200 µm exclusion inside the disk
    anns = read_asap_xml(write_xml(tmp_path / "m.xml", [("Tumor", disk), ("_2", hole)]))
    mask = lesion_mask(anns, (10000, 9000), mpp, level0_mpp)
    assert mask.dtype == bool and mask.shape == (1125, 1250)  # ceil(9000/8), ceil(10000/8)
    px_um2 = mpp * mpp
    expect_um2 = (shoelace(disk) - shoelace(hole)) * level0_mpp**2
    assert np.count_nonzero(mask) * px_um2 == pytest.approx(expect_um2, rel=0.01)
    # centre (500, 500) mask px, radius 200 px; the hole spans 450..550 px
    assert not mask[460:540, 460:540].any() and mask[560:640, 480:520].all()
    assert mask[500, 310] and not mask[500, 290] and not mask[0, 0]
    # same polygon at another resolution: same physical area
    fine = lesion_mask(anns, (10000, 9000), 1.0, level0_mpp)
    assert np.count_nonzero(fine) * 1.0 == pytest.approx(expect_um2, rel=0.005)


def test_lesion_mask_region_is_a_crop_of_the_whole():
    ann = [Annotation(circle(900, 700, 300), "_1")]
    whole = lesion_mask(ann, (2000, 1600), 4.0, 0.5)  # 8 level-0 px per mask px
    crop = lesion_mask(ann, (800, 640), 4.0, 0.5, level0_xy=(480, 320))
    assert crop.shape == (80, 100)
    np.testing.assert_array_equal(crop, whole[40:120, 60:160])


def test_evaluation_mask_dilation_merge_and_itc():
    # 1 µm/px level 0, evaluation at 4 µm/px: margin 75 µm -> joins pixels within 37.5 µm.
    big = square(1000, 1000, 1000)  # 1000 µm: a lesion
    near = square(2060, 1000, 300)  # 60 µm from `big`: merges with it (< 75 µm)
    far = square(5000, 5000, 400)  # another lesion
    itc = square(8000, 1000, 100)  # 100 µm, dilated major axis ~ 1.15 * 175 µm < 275 µm
    anns = [Annotation(p, "_0") for p in (big, near, far, itc)]
    les = evaluation_mask(anns, level0_mpp=1.0, mask_mpp=4.0)
    assert les.labels.max() == 3 and len(les.itc) == 1 and les.n_lesions == 2
    ids, _ = les.lookup(np.array([[1500, 1500], [2200, 1100], [2030, 1500], [5200, 5200],
                                  [8050, 1050], [5000 - 30, 5200], [5000 - 45, 5200],
                                  [100, 100], [20000, 20000]]))  # fmt: skip
    assert ids[0] == ids[1] == ids[2] > 0  # merged across the 60 µm gap
    assert ids[3] > 0 and ids[3] != ids[0]
    assert ids[4] in les.itc
    assert ids[5] == ids[3]  # 30 µm outside: inside the margin
    assert ids[6] == 0 and ids[7] == 0 and ids[8] == 0  # 45 µm outside, far away, off-mask
    assert les.origin[0] >= 0 and les.labels.shape[1] < 5000  # only the annotations' box


def test_evaluation_mask_fills_exclusion_holes_and_flags_exclusion_outside():
    ring = [Annotation(square(1000, 1000, 2000), "Tumor"),
            Annotation(square(1500, 1500, 1000), "_2"),  # hole inside the lesion
            Annotation(square(6000, 6000, 500), "_2")]  # exclusion far from any lesion
    les = evaluation_mask(ring, level0_mpp=0.5, mask_mpp=4.0)
    ids, exc = les.lookup(np.array([[2000, 2000], [6250, 6250], [9000, 9000]]))
    assert ids[0] > 0 and exc[0]  # holes are filled, as the challenge script does
    assert ids[1] == 0 and exc[1]
    assert ids[2] == 0 and not exc[2]
    empty = evaluation_mask([], level0_mpp=0.5)
    assert empty.n_lesions == 0
    assert empty.lookup(np.array([[5.0, 5.0]]))[0].tolist() == [0]


# -- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("Tumor", 1), ("tumor", 1), ("TUMOUR", 1), ("1", 1), ("positive", 1), ("Normal", 0),
    ("normal", 0), ("0", 0), ("negative", 0), (" Negative ", 0),
    ("pN0", 0), ("pN0(i+)", 0), ("pn0 (i+)", 0), ("pN1mi", 1), ("pN1", 1), ("pN2", 1),
    ("pN3", 1), ("itc", 0), ("micro", 1), ("macro", 1),
])  # fmt: skip
def test_parse_label(value, expected):
    assert parse_label(value) == expected


@pytest.mark.parametrize("value", ["", "maybe", "pN4", "2", "Tumor?"])
def test_parse_label_rejects(value):
    with pytest.raises(ValueError, match="unknown label"):
        parse_label(value)


def test_read_labels_camelyon16_reference_without_header(tmp_path):
    p = tmp_path / "reference.csv"
    p.write_text("test_001,Tumor,Macro,Primary\ntest_002,Normal,,\n\ntest_003.tif,Tumor,Micro,\n")
    assert read_labels(p) == {"test_001": 1, "test_002": 0, "test_003": 1}


def test_read_labels_with_header_and_camelyon17_stages(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("slide,label\nsynth_000,Normal\nsynth_001,Tumor\n")
    assert read_labels(p) == {"synth_000": 0, "synth_001": 1}
    p17 = tmp_path / "stage_labels.csv"
    p17.write_text("patient,stage\npatient_000.zip,pN0(i+)\npatient_000_node_0.tif,itc\n"
                   "patient_000_node_1.tif,negative\npatient_004.zip,pN1mi\n"
                   "patient_004_node_4.tif,micro\npatient_010_node_2.tif,macro\n")
    assert read_labels(p17) == {"patient_000": 0, "patient_000_node_0": 0,
                                "patient_000_node_1": 0, "patient_004": 1,
                                "patient_004_node_4": 1, "patient_010_node_2": 1}
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("label,image\nTumor,a.svs\nNormal,b\n")
    assert read_labels(swapped) == {"a": 1, "b": 0}


@pytest.mark.parametrize("content, message", [
    ("slide,label\na,Tumor\nb,Tumr\n", r"row 3 \(b\): unknown label 'Tumr'"),
    ("a,Tumr\nb,Normal\n", "row 1: unknown label 'Tumr'"),
    ("slide,label\na,Tumor\na,Normal\n", "row 3: slide 'a' listed again"),
    ("slide,label\na\n", "row 2 has 1 columns"),
    ("", "label file is empty"),
    ("slide,label\n", "header but no rows"),
])  # fmt: skip
def test_read_labels_errors_name_file_and_row(tmp_path, content, message):
    p = tmp_path / "labels.csv"
    p.write_text(content)
    with pytest.raises(AnnotationError, match=message) as err:
        read_labels(p)
    assert err.value.path == str(p)


def test_lookup_slide_matches_ids_ignoring_case(tmp_path):
    # CAMELYON16: reference.csv names Test_001 and Tumor_110, the files are test_001.tif and
    # tumor_110.tif (so the run ids are lower case)
    p = tmp_path / "reference.csv"
    p.write_text("Test_001,Tumor,Macro\nTest_002,Normal\nTUMOR_110.tif,Tumor\n")
    labels = read_labels(p)
    assert [lookup_slide(labels, i) for i in ("test_001", "test_002", "tumor_110")] == [1, 0, 1]
    assert lookup_slide(labels, "Test_001") == 1 and lookup_slide(labels, "test_003") is None
    # an exact key wins over one that differs only in case
    assert lookup_slide({"a": 0, "A": 1}, "A") == 1 and lookup_slide({"a": 0, "A": 1}, "a") == 0
    assert lookup_slide({}, "a") is None


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="no such label file"):
        read_labels(tmp_path / "nope.csv")


def test_synth_xml_writer_round_trip(tmp_path):
    """The synthetic set's XML (synth.write_asap_xml) reads back into the same lesions."""
    from wsi_prune import synth

    if not hasattr(synth, "write_asap_xml"):
        pytest.skip("synth.write_asap_xml not written yet")
    spec = synth.SynthSpec(width=4096, height=4096, mpp=0.5, seed=1, tumour=True)
    path = tmp_path / "s.xml"
    synth.write_asap_xml(path, spec)
    anns = read_asap_xml(path)
    assert anns and all(a.role == "positive" for a in anns)
    mask = lesion_mask(anns, (spec.width, spec.height), 8.0, spec.mpp)
    truth = synth.tumour_mask(spec, 8.0)
    inter = np.count_nonzero(mask & truth[: mask.shape[0], : mask.shape[1]])
    union = np.count_nonzero(mask | truth[: mask.shape[0], : mask.shape[1]])
    assert inter / union > 0.9
    assert math.isclose(mask.sum(), truth.sum(), rel_tol=0.1)


def test_read_labels_saved_by_a_spreadsheet(tmp_path):
    """';' or tab between columns and a byte-order mark read as the comma file does."""
    want = {"synth_000": 0, "synth_001": 1}
    for name, text in {"semi.csv": "\ufeffslide;label\r\nsynth_000;Normal\r\nsynth_001;Tumor\r\n",
                       "tab.csv": "slide\tlabel\nsynth_000\tNormal\nsynth_001\tTumor\n",
                       "plain.csv": "\ufeffslide,label\nsynth_000,Normal\nsynth_001,Tumor\n"
                       }.items():
        p = tmp_path / name
        p.write_text(text, encoding="utf-8", newline="")
        assert read_labels(p) == want, name
