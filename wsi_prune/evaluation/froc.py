"""Lesion-level evaluation: the FROC of the CAMELYON16 evaluation script
(``Evaluation_FROC.py``), from each slide's ``candidates.csv`` (confidence, X, Y level-0 px):

1. the lesion mask (positive groups minus exclusion groups) is drawn at ``mask_mpp``
   (7.776 µm/px, level 5 of the 0.243 µm/px CAMELYON16 scans), every pixel closer than
   ``margin_um / 2`` = 37.5 µm to a lesion joins it (the script's "75 µm, the size of five
   tumour cells", applied as a distance threshold of half that), holes are filled and
   8-connected components are the lesions (so lesions closer than 75 µm merge);
2. a lesion is an isolated tumour cell cluster (ITC) when the major axis of that dilated
   component is shorter than ``itc_um + margin_um`` = 275 µm (200 µm before dilation);
3. a candidate inside a lesion is a hit on it; a lesion counts once, with its highest
   candidate confidence; hits on ITCs are neither true nor false positives and ITCs are not
   counted among the lesions to find; a candidate in no lesion is a false positive;
4. sensitivity is read off the curve at 1/4, 1/2, 1, 2, 4, 8 mean false positives per slide
   by linear interpolation, as ``np.interp`` does in the script, and averaged.

Deviations from the script, on purpose: (a) candidates in an exclusion region (``_2``) that
lies outside every dilated lesion are ignored instead of counted as false positives;
(b) every distinct confidence is an operating point: the script drops its lowest threshold
(``all_probs[1:]``) to hide undetected lesions stored as confidence 0, which also drops a
real operating point whenever every lesion is hit; (c) lesions come from ASAP XML at the
slide's own level-0 µm/px rather than from mask TIFFs at a fixed 0.243 µm/px, and masks are
built only over the annotations' bounding box (plus the margin), so memory does not grow
with slide size; (d) normal slides are those without an annotation file, not those whose
name starts with ``Normal``.

Two protocols (``protocol``, ``wsi-prune evaluate --protocol``):

* ``physical`` (default): the rules above with deviations (a)-(c), on every slide's own
  level-0 µm/px, so that 75 µm and 275 µm mean what they say on any scanner.
* ``official``: what ``Evaluation_FROC.py`` computes, for numbers comparable with the
  CAMELYON16 leaderboard. Level 0 is taken to be 0.243 µm/px on every slide whatever its real
  resolution (the script reads the level-5 mask and divides candidate coordinates by 2**5 = 32),
  so on a 0.5 µm/px slide a lesion's 75 µm margin and 275 µm ITC limit shrink to about half
  their physical size; candidates in exclusion regions are false positives; each slide
  contributes one true-positive entry per mask component, 0 for ITCs and missed lesions, and
  the lowest distinct confidence is dropped (``all_probs[1:]``); sensitivities are
  ``np.interp`` over the script's curve. Only (c) and (d) remain: lesions are drawn from the
  XML rather than read from the mask TIFFs (drawn at level 5 by pixel centre, where the
  challenge's masks were drawn at level 0 and downsampled; a lesion edge can move by one
  level-5 px, 7.8 µm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_prune.io.annotations import (
    CAMELYON16_MASK_MPP,
    ITC_UM,
    MARGIN_UM,
    Annotation,
    evaluation_mask,
)

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
PROTOCOLS = ("physical", "official")
#: the level-0 µm/px ``Evaluation_FROC.py`` assumes for every slide (``L0_RESOLUTION``); the
#: division keeps mask px = exactly 32 level-0 px, as the script's ``/ pow(2, 5)``
OFFICIAL_LEVEL0_MPP = CAMELYON16_MASK_MPP / 2**5


@dataclass(frozen=True)
class FrocResult:
    """FROC of a set of slides.

    ``sensitivities`` (one per ``fp_rates``) and ``average`` are ``None`` when no slide has a
    lesion to find. ``curve_fp``/``curve_sensitivity`` are the operating points by falling
    threshold, starting at (0, 0). ``per_slide[id]`` = lesions, itc, detected, fp, ignored.
    """

    n_slides: int
    n_lesions: int
    n_itc: int
    n_candidates: int
    n_fp: int
    n_ignored: int
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...] | None
    average: float | None
    curve_fp: tuple[float, ...] = field(repr=False)
    curve_sensitivity: tuple[float, ...] = field(repr=False)
    per_slide: dict[str, dict[str, int]] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the curve and the per-slide table."""
        d = dataclasses.asdict(self)
        for k in ("curve_fp", "curve_sensitivity", "per_slide"):
            del d[k]
        return d


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Piecewise-linear FROC at ``rate``: the best point at exactly that rate, linear between.

    ``fps`` and ``sens`` are non-decreasing. This is ``np.interp`` on the script's curve, written
    out because several points can share a false-positive rate.
    """
    j = int(np.searchsorted(fps, rate, side="right")) - 1
    if j >= len(fps) - 1 or fps[j] == rate:
        return float(sens[j])
    t = (rate - fps[j]) / (fps[j + 1] - fps[j])
    return float(sens[j] + t * (sens[j + 1] - sens[j]))


def froc(candidates: Mapping[str, np.ndarray], annotations: Mapping[str, Sequence[Annotation]],
         level0_mpp: Mapping[str, float], *, mask_mpp: float = CAMELYON16_MASK_MPP,
         margin_um: float = MARGIN_UM, itc_um: float = ITC_UM,
         fp_rates: Sequence[float] = FP_RATES, protocol: str = "physical") -> FrocResult:
    """CAMELYON16 FROC over the slides in ``candidates``.

    Args:
        candidates: slide id -> (M, 3) float (confidence, X, Y), X/Y in level-0 px.
        annotations: slide id -> annotations; a slide absent or without lesions is normal.
        level0_mpp: slide id -> level-0 µm/px (needed for annotated slides; unused by the
            official protocol).
        mask_mpp, margin_um, itc_um: evaluation mask resolution (µm/px), lesion margin and ITC
            size (µm); the defaults are the challenge's.
        fp_rates: mean false positives per slide at which sensitivity is read.
        protocol: ``physical`` or ``official`` (see the module docstring); official needs the
            challenge's mask_mpp, margin_um and itc_um.
    """
    if not candidates:
        raise ValueError("froc needs at least one slide")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    official = protocol == "official"
    if official and (mask_mpp, margin_um, itc_um) != (CAMELYON16_MASK_MPP, MARGIN_UM, ITC_UM):
        raise ValueError("the official protocol fixes the mask at 7.776 µm/px, the margin at "
                         "75 µm and the ITC size at 200 µm")
    fp_conf, tp_conf = [], []
    per_slide: dict[str, dict[str, int]] = {}
    n_lesions = n_itc = n_cand = n_ign = 0
    for sid in sorted(candidates):
        cand = np.asarray(candidates[sid], np.float64).reshape(-1, 3)
        anns = annotations.get(sid, ())
        if anns and not official and sid not in level0_mpp:
            raise ValueError(f"slide {sid!r} has annotations but no level-0 mpp")
        l0 = OFFICIAL_LEVEL0_MPP if official else level0_mpp.get(sid, 1.0)
        les = evaluation_mask(anns, l0, mask_mpp, margin_um, itc_um)
        ids, excl = les.lookup(cand[:, 1:3])
        is_itc = np.isin(ids, np.fromiter(les.itc, np.int32, len(les.itc)))
        hit = (ids > 0) & ~is_itc
        false = (ids == 0) & (True if official else ~excl)
        hit_ids = np.unique(ids[hit])
        best = [cand[hit & (ids == i), 0].max() for i in hit_ids]
        fp_conf.append(cand[false, 0])
        if official:  # the script's TP_probs: one entry per component, 0 when not hit
            tp_slide = np.zeros(int(les.labels.max(initial=0)))
            tp_slide[hit_ids - 1] = best
            tp_conf.extend(tp_slide)
        else:
            tp_conf.extend(best)
        per_slide[sid] = {"lesions": les.n_lesions, "itc": len(les.itc), "detected": len(best),
                          "fp": int(false.sum()), "ignored": int((~hit & ~false).sum())}
        n_lesions += les.n_lesions
        n_itc += len(les.itc)
        n_cand += len(cand)
        n_ign += per_slide[sid]["ignored"]
    fps_c = np.sort(np.concatenate(fp_conf))
    tps_c = np.sort(np.asarray(tp_conf, np.float64))
    n_slides = len(candidates)
    if official:
        # computeFROC: thresholds all_probs[1:], counts of confidences >= each, then (0, 0)
        thresholds = np.unique(np.concatenate([fps_c, tps_c]))[1:][::-1]
    else:
        thresholds = np.unique(np.concatenate([fps_c, tps_c]))[::-1]
    fps = np.concatenate([[0.0], (len(fps_c) - np.searchsorted(fps_c, thresholds)) / n_slides])
    hits = np.concatenate([[0], len(tps_c) - np.searchsorted(tps_c, thresholds)])
    sens = hits / n_lesions if n_lesions else np.zeros_like(fps)
    if not n_lesions:
        at = None
    elif official:
        at = tuple(float(v) for v in np.interp(fp_rates, fps, sens))
    else:
        at = tuple(_sensitivity_at(fps, sens, r) for r in fp_rates)
    return FrocResult(
        n_slides=n_slides, n_lesions=n_lesions, n_itc=n_itc, n_candidates=n_cand,
        n_fp=len(fps_c), n_ignored=n_ign, fp_rates=tuple(map(float, fp_rates)),
        sensitivities=at, average=float(np.mean(at)) if at else None,
        curve_fp=tuple(map(float, fps)), curve_sensitivity=tuple(map(float, sens)),
        per_slide=per_slide)
