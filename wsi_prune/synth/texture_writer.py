"""Writing texture slides (:func:`write_texture_slide`) and benchmark sets of them with labels,
lesion XML and a lesion table (:func:`write_texture_dataset`); planning a set without writing it
(:func:`plan_texture_dataset`).

A set is deterministic from its seed: train and test sets are two seeds, e.g.::

    write_texture_dataset("train/", n_tumour=16, n_normal=16, seed=1, difficulty=0.5)
    write_texture_dataset("test/", n_tumour=16, n_normal=16, seed=2, difficulty=0.5)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pathlib
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from wsi_prune._files import write_text_atomic
from wsi_prune.errors import ConfigError
from wsi_prune.io.annotations import Annotation, lesion_mask
from wsi_prune.synth.lesions import SIZE_CLASSES
from wsi_prune.synth.pyramid import write_pyramid
from wsi_prune.synth.texture_layout import TextureLayout
from wsi_prune.synth.texture_render import render_region
from wsi_prune.synth.texture_spec import TextureSlide, TextureSpec
from wsi_prune.synth.truth import write_asap_xml
from wsi_prune.synth.writer import _aperio_description

_logger = logging.getLogger(__name__)

# Micro/macro lesions per tumour slide, dealt in shuffled blocks of 8 so that any 16 consecutive
# tumour slides hold exactly 46 (mean 2.875): a 16-slide test set has >= 40 countable lesions
# even after the few 0.2 mm micro-metastases the FROC rule calls ITC.
_LESION_COUNTS = (1, 2, 2, 3, 3, 4, 4, 4)


def _tags(spec: TextureSpec, path: pathlib.Path):
    def tags(level: int, ds: int) -> dict:
        if spec.flavour == "tiff":
            px_per_cm = 10_000.0 / (spec.mpp * ds)
            return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
        out: dict = {"resolution": (1.0, 1.0), "resolutionunit": "NONE"}
        if level == 0:
            out["description"] = _aperio_description(spec, path)  # type: ignore[arg-type]
        return out

    return tags


def write_texture_slide(path: str | os.PathLike[str], spec: TextureSpec,
                        workers: int = 1) -> TextureSlide:
    """Write one texture slide, tile by tile in bounded memory.

    Args:
        path: output file (``.svs`` for the ``svs`` flavour, ``.tif`` for ``tiff``).
        spec: what to draw.
        workers: threads rendering tiles ahead of the JPEG encoder (numpy releases the GIL
            for most of the work).

    Returns:
        The slide, its label, lesions (with size class and FROC countability) and mimics.

    Raises:
        SlideError: the real H&E slide the texture comes from (``spec.source``) is missing.
    """
    path = pathlib.Path(path)
    layout = TextureLayout(spec)
    _ = layout.bank  # cut the bank (or fail on a missing source) before opening the output
    start = time.perf_counter()
    write_pyramid(path, spec.width, spec.height,
                  lambda x, y, w, h: render_region(layout, x, y, w, h),
                  level_shapes=spec.level_shapes, tile=spec.tile, quality=spec.quality,
                  tags=_tags(spec, path), workers=workers)  # fmt: skip
    _logger.info("%s: written in %.1f s", path, time.perf_counter() - start)
    return TextureSlide(path, spec, int(bool(layout.lesions)),
                        [r.polygon() for r in layout.lesions], layout.lesions,
                        layout.mimics)  # fmt: skip


def texture_tumour_mask(spec: TextureSpec, mpp: float) -> np.ndarray:
    """Ground-truth lesion mask, ``(H, W) bool`` at ``mpp`` µm/px (H = ceil(height px / f),
    f = mpp / spec.mpp), rasterised from the lesion outlines as the XML holds them."""
    anns = [Annotation(r.polygon(), "Tumor") for r in TextureLayout(spec).lesions]
    return lesion_mask(anns, (spec.width, spec.height), mpp, spec.mpp)


def plan_texture_dataset(n_tumour: int, n_normal: int, size: int = 12288, seed: int = 0,
                         difficulty: float = 0.5,
                         **spec_overrides) -> list[tuple[str, TextureSpec]]:
    """The slide names and specs of a set, without drawing a pixel.

    Slides are ``texture_<i>``, tumour and normal interleaved by a permutation drawn from
    ``seed``; each has its own seed derived from ``(seed, i)`` and all share one texture bank
    derived from ``seed``. Tumour slides get 1-4 micro/macro lesions dealt from shuffled
    blocks of ``(1, 2, 2, 3, 3, 4, 4, 4)`` and 0-3 ITCs.

    Args:
        n_tumour / n_normal: slides of each label (>= 0, together >= 1).
        size: side of each slide, level-0 px.
        seed: set seed.
        difficulty: see :class:`TextureSpec`.
        **spec_overrides: any other :class:`TextureSpec` field (``mpp``, ``flavour``,
            ``n_itc``, ``tissue_fraction``...).
    """
    n = n_tumour + n_normal
    if n_tumour < 0 or n_normal < 0 or n < 1:
        raise ConfigError(f"a texture set needs n_tumour, n_normal >= 0 and at least one "
                          f"slide, got {n_tumour} and {n_normal}")  # fmt: skip
    bad = {"width", "height", "seed", "tumour", "difficulty"} & spec_overrides.keys()
    if bad:
        raise ConfigError(f"plan_texture_dataset sets {sorted(bad)} itself")
    rng = np.random.default_rng([seed, 0x7E47DA7A])
    positive = set(rng.permutation(n)[:n_tumour].tolist())
    counts = [c for _ in range(-(-n_tumour // 8)) for c in rng.permutation(_LESION_COUNTS)]
    bank_seed = spec_overrides.pop("bank_seed", None)
    if bank_seed is None:
        bank_seed = int(np.random.SeedSequence([seed, 0xBA4C]).generate_state(1)[0] >> 1)
    plan, k = [], 0
    for i in range(n):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        extra = dict(spec_overrides)
        if i in positive:
            extra.setdefault("n_lesions", int(counts[k]))
            k += 1
        spec = TextureSpec(width=size, height=size, seed=slide_seed, tumour=i in positive,
                           difficulty=difficulty, bank_seed=bank_seed, **extra)  # fmt: skip
        plan.append((f"texture_{i:03d}", spec))
    return plan


def lesion_rows(slides: Sequence[tuple[str, TextureLayout | TextureSlide]]) -> list[dict]:
    """One row per planted region: ``slide, region, kind (ITC/micro/macro/mimic),
    diameter_um, countable (yes/no), x, y (centre, level-0 px), grade``."""
    rows = []
    for name, s in slides:
        for j, r in enumerate((*s.lesions, *s.mimics)):
            rows.append({"slide": name, "region": j, "kind": r.kind,
                         "diameter_um": round(r.diameter_um, 1),
                         "countable": "yes" if r.countable else "no",
                         "x": round(r.centre_xy[0], 1), "y": round(r.centre_xy[1], 1),
                         "grade": round(r.grade, 3)})  # fmt: skip
    return rows


def summarise(rows: Sequence[dict], labels: Sequence[int]) -> dict:
    """Counts of a set: slides per label, lesions per size class, FROC-countable lesions,
    lesions the FROC rule calls ITC, mimics."""
    kinds = Counter(r["kind"] for r in rows)
    tumour = [r for r in rows if r["kind"] != "mimic"]
    return {
        "slides": len(labels), "tumour_slides": int(sum(labels)),
        "normal_slides": len(labels) - int(sum(labels)),
        "lesions": len(tumour), **{k: kinds.get(k, 0) for k in SIZE_CLASSES},
        "countable": sum(r["countable"] == "yes" for r in tumour),
        "itc_by_froc_rule": sum(r["countable"] == "no" for r in tumour),
        "mimics": kinds.get("mimic", 0),
    }


def write_texture_dataset(out_dir: str | os.PathLike[str], n_tumour: int, n_normal: int,
                          size: int = 12288, seed: int = 0, difficulty: float = 0.5,
                          workers: int = 1, **spec_overrides) -> list[TextureSlide]:
    """Write a texture benchmark set (see :func:`plan_texture_dataset` for what it holds).

    Writes into ``out_dir``: the slides, ``labels.csv`` (``slide,label`` Tumor/Normal),
    ``<slide>.xml`` lesion outlines for tumour slides (ASAP, group ``Tumor``, level-0 px),
    ``lesions.csv`` (:func:`lesion_rows`, mimics included) and ``dataset.json`` (the
    parameters, :func:`summarise` counts, and per-slide spec and counts).

    Returns:
        The slides in name order.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for name, spec in plan_texture_dataset(n_tumour, n_normal, size, seed, difficulty,
                                           **spec_overrides):  # fmt: skip
        ext = ".svs" if spec.flavour == "svs" else ".tif"
        slide = write_texture_slide(out / f"{name}{ext}", spec, workers=workers)
        xml = out / f"{name}.xml"
        if slide.label:
            write_asap_xml(xml, slide.tumour_polygons)
        else:
            xml.unlink(missing_ok=True)  # a stale annotation from an earlier set in this folder
        slides.append(slide)
    named = [(s.path.stem, s) for s in slides]
    rows = lesion_rows(named)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide", "label"])
    wr.writerows([s.path.stem, "Tumor" if s.label else "Normal"] for s in slides)
    write_text_atomic(out / "labels.csv", buf.getvalue())
    buf = io.StringIO()
    fields = ["slide", "region", "kind", "diameter_um", "countable", "x", "y", "grade"]
    dw = csv.DictWriter(buf, fields, lineterminator="\n")
    dw.writeheader()
    dw.writerows(rows)
    write_text_atomic(out / "lesions.csv", buf.getvalue())
    meta = {
        "generator": "wsi_prune.synth.write_texture_dataset", "seed": seed,
        "difficulty": difficulty, "size_px": size, "overrides": spec_overrides,
        "counts": summarise(rows, [s.label for s in slides]),
        "slides": {name: {"label": s.label, "seed": s.spec.seed, "mpp": s.spec.mpp,
                          "bank_seed": s.spec.bank_seed,
                          "counts": summarise(lesion_rows([(name, s)]), [s.label])}
                   for name, s in named},
    }  # fmt: skip
    write_text_atomic(out / "dataset.json", json.dumps(meta, indent=2, default=str) + "\n")
    return slides
