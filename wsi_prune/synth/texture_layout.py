"""The layout of a texture slide: lymph-node-like tissue islands, CAMELYON16-like tumour lesions
and tumour-like mimics inside them, and the slide's staining, all drawn from the spec's seed.

Drawing a layout renders nothing and reads no slide, so a whole dataset's lesions can be planned
and counted in a fraction of a second per slide
(:func:`wsi_prune.synth.texture_writer.plan_texture_dataset`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

import numpy as np

from wsi_prune.errors import ConfigError
from wsi_prune.synth.layout import _Blob, _random_blob
from wsi_prune.synth.lesions import (
    Region,
    countable,
    draw_effects,
    feret_px,
    mimic_diameters_um,
    place,
    size_class,
    tumour_diameters_um,
)
from wsi_prune.synth.stain import SlideStain, draw_slide_stain
from wsi_prune.synth.texture import TextureBank, cached_texture_bank
from wsi_prune.synth.texture_spec import TextureSpec

_logger = logging.getLogger(__name__)

BANK_PATCHES = 160  # patches in a bank
BANK_PATCH_PX = 256  # side of a bank patch, px at the slide's mpp
# Tissue area of a 12288² px slide at 0.5 µm/px with the default tissue fraction, µm²: the
# number of mimics scales with a slide's tissue area relative to it.
_REFERENCE_TISSUE_UM2 = 0.45 * (12288 * 0.5) ** 2


def _islands(rng: np.random.Generator, spec: TextureSpec) -> list[_Blob]:
    """1-2 (sometimes 3) lobulated ovals sharing the tissue fraction, not overlapping."""
    w, h = spec.width, spec.height
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    shares = rng.uniform(0.6, 1.4, n)
    shares /= shares.sum()
    out: list[_Blob] = []
    for share in sorted(shares, reverse=True):
        r = math.sqrt(spec.tissue_fraction * w * h * share / np.pi)
        proto = _random_blob(rng, 0.0, 0.0, r, float(rng.uniform(0.08, 0.18)))
        limit = min(w, h) / 2 * 0.96
        if proto.extent > limit:
            proto = dataclasses.replace(proto, a=proto.a * limit / proto.extent,
                                        b=proto.b * limit / proto.extent)  # fmt: skip
        m = proto.extent * 1.02
        cx, cy = w / 2, h / 2
        for _ in range(200):  # rejection sampling for islands that do not touch
            cx = float(rng.uniform(m, max(m, w - m)))
            cy = float(rng.uniform(m, max(m, h - m)))
            if all(math.hypot(cx - o.cx, cy - o.cy) > o.extent + proto.extent for o in out):
                break
        out.append(dataclasses.replace(proto, cx=cx, cy=cy))
    return out


class TextureLayout:
    """Islands, lesions, mimics and stain of one texture slide (level-0 px).

    Attributes:
        spec: the spec.
        islands: tissue islands.
        lesions: tumour regions, largest first (empty for a normal slide).
        mimics: hard-negative regions.
        stain: the slide's staining.
        glass: ``(3,) float32`` RGB of the slide's glass.
        salt: seed of the texture placement and fields.
    """

    def __init__(self, spec: TextureSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0x7E57])
        self.islands = _islands(rng, spec)
        taken: list[_Blob] = []
        lesions: list[Region] = []
        d = spec.difficulty
        # On a small slide regions shrink to fit (lesions.place); those that still find no
        # room are left out, never the largest lesion.
        if spec.tumour:
            n_les = spec.n_lesions or int(rng.integers(1, 5))
            n_itc = int(rng.integers(0, 4)) if spec.n_itc is None else spec.n_itc
            diam = tumour_diameters_um(rng, n_les, n_itc)
            for blob in place(rng, self.islands, diam, spec.mpp, taken):
                g = float(np.clip(rng.normal(1.0 - 0.75 * d, 0.25), 0.05, 2.0))
                if blob is not None:
                    lesions.append(self._region(rng, blob, "tumour", g, g))
            if not lesions:
                raise ConfigError(f"texture slide {spec.width}x{spec.height} px has no room "
                                  "for a lesion: use a larger slide")  # fmt: skip
            if len(lesions) < len(diam):
                _logger.warning("texture slide seed %d: %d of %d lesions found no room on "
                                "%dx%d px", spec.seed, len(diam) - len(lesions), len(diam),
                                spec.width, spec.height)  # fmt: skip
        area = sum(i.a * i.b for i in self.islands) * np.pi * spec.mpp**2
        n_mim = spec.n_mimics
        if n_mim is None:
            n_mim = max(1, round(int(rng.integers(2, 7)) * area / _REFERENCE_TISSUE_UM2))
        mimics = []
        for blob in place(rng, self.islands, mimic_diameters_um(rng, n_mim), spec.mpp, taken,
                          wave=(0.02, 0.08)):  # germinal centres are round
            g = float(np.clip(rng.normal(0.1 + 0.25 * d, 0.1), 0.0, 1.0))
            gd = float(np.clip(rng.normal(0.9, 0.25), 0.3, 1.6))
            if blob is not None:
                mimics.append(self._region(rng, blob, "mimic", g, gd))
        ok = countable(lesions, spec.mpp)
        lesions = [dataclasses.replace(r, countable=c) for r, c in zip(lesions, ok, strict=True)]
        self.lesions = tuple(sorted(lesions, key=lambda r: -r.diameter_um))
        self.mimics = tuple(mimics)
        self.stain: SlideStain = draw_slide_stain(rng)
        self.glass = np.clip(241.0 + rng.normal(0.0, 2.0, 3), 232, 250).astype(np.float32)
        self.salt = int(rng.integers(1, 2**31))
        self.noise = rng.uniform(-1.0, 1.0, (512, 512)).astype(np.float32)

    def _region(self, rng: np.random.Generator, blob: _Blob, what: str, grade: float,
                density_grade: float) -> Region:
        diameter = feret_px(blob.outline(128)) * self.spec.mpp
        kind = size_class(diameter) if what == "tumour" else "mimic"
        return Region(blob, kind, diameter, grade, draw_effects(rng, grade, density_grade),
                      salt=int(rng.integers(1, 2**31)))  # fmt: skip

    @property
    def bank(self) -> TextureBank:
        """The texture bank (cut on first use, then cached per process)."""
        s = self.spec
        seed = s.seed if s.bank_seed is None else s.bank_seed
        return cached_texture_bank(pathlib.Path(s.source), s.mpp, seed, BANK_PATCHES,
                                   BANK_PATCH_PX)  # fmt: skip
