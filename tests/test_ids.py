"""Slide ids: readable for every script and for emoji, filesystem-safe, unique per run by a
rule that does not depend on the order of the inputs."""

from __future__ import annotations

import random
import unicodedata

import pytest

from wsi_prune._ids import MAX_ID_BYTES, safe_id, unique_ids


@pytest.mark.parametrize(("name", "sid"), [
    ("😐", "neutral-face"),
    ("😐 case 3", "neutral-face_case_3"),
    ("👨‍👩‍👧", "man_woman_girl"),  # joiners dropped, each person named
    ("👍🏽 ok", "thumbs-up-sign_ok"),  # the skin-tone modifier is dropped
    ("tumor 001 (ä)", "tumor_001_ä"),
    ("Präparat_µ_淋巴结", "Präparat_µ_淋巴结"),
    ("切片 3", "切片_3"),
    ("../../etc/passwd", "etc_passwd"),
    ("..", "slide"),
    (".hidden", "hidden"),
    ("", "slide"),
    ("a/b\\c:d", "a_b_c_d"),
])
def test_safe_id(name: str, sid: str) -> None:
    assert safe_id(name) == sid


def test_safe_id_normalises_and_bounds() -> None:
    # macOS hands over decomposed names: é as e + combining accent
    assert safe_id(unicodedata.normalize("NFD", "café")) == safe_id("café") == "café"
    for long in ("x" * 300, "😐" * 100, "淋" * 200):
        sid = safe_id(long)
        assert 0 < len(sid.encode()) <= MAX_ID_BYTES
        sid.encode().decode()  # never cut inside a character


def test_unique_ids_rule() -> None:
    paths = ["/d/sub1/a.svs", "/d/sub2/a.svs", "/d/sub3/A.svs", "/d/b.svs", "/d/x/s/c.svs",
             "/d/y/s/c.svs", "/e/A.svs", "/e/a.svs"]
    bases = ["a", "a", "A", "b", "c", "c", "A", "a"]
    ids = dict(zip(paths, unique_ids(bases, paths), strict=True))
    assert ids == {
        "/d/sub1/a.svs": "sub1_a", "/d/sub2/a.svs": "sub2_a", "/d/sub3/A.svs": "sub3_A",
        "/d/b.svs": "b",
        "/d/x/s/c.svs": "x_s_c", "/d/y/s/c.svs": "y_s_c",  # as many folders as it takes
        # the same folder: folders cannot tell them apart; in path order, then -2
        "/e/A.svs": "e_A", "/e/a.svs": "e_a-2",
    }
    assert len({i.casefold() for i in ids.values()}) == len(ids)


def test_unique_ids_do_not_depend_on_input_order() -> None:
    paths = [f"/d/{f}/{n}.svs" for f in ("p", "q", "r") for n in ("a", "A", "b", "😐")]
    bases = [safe_id(p.rsplit("/", 1)[1][:-4]) for p in paths]
    want = dict(zip(paths, unique_ids(bases, paths), strict=True))
    rng = random.Random(0)
    for _ in range(20):
        order = list(range(len(paths)))
        rng.shuffle(order)
        got = unique_ids([bases[i] for i in order], [paths[i] for i in order])
        assert {paths[i]: got[k] for k, i in enumerate(order)} == want


def test_natural_id_wins_over_a_qualified_one_and_given_ids_are_kept() -> None:
    # sub1/a.svs would become sub1_a, which a slide is really called: that one keeps it
    assert unique_ids(["a", "a", "sub1_a"], ["/d/sub1/a.svs", "/d/sub2/a.svs",
                                             "/d/sub1_a.svs"]) == ["sub1_a-2", "sub2_a", "sub1_a"]
    # ids given in a slide list are the user's: never qualified, only numbered
    assert unique_ids(["x", "x"], ["/d/p/a.svs", "/d/q/b.svs"], [False, False]) == ["x", "x-2"]
