"""Parameters of a synthetic slide (:class:`SynthSpec`) and what writing one returns
(:class:`SynthSlide`)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np

from wsi_prune.errors import ConfigError

FLAVOURS = ("svs", "svs-nompp", "tiff", "tiff-nompp")


_MIN_TOP_LEVEL_PX = 1024  # stop the pyramid once the smallest side is at most this


def pyramid_shapes(width: int, height: int, step: int) -> list[tuple[int, int, int]]:
    """Pyramid levels of a ``width`` × ``height`` px slide as ``(width px, height px,
    downsample)``, level 0 first, each ``step`` times smaller, until the smaller side is at
    most :data:`_MIN_TOP_LEVEL_PX`."""
    shapes, ds = [(width, height, 1)], 1
    while min(shapes[-1][:2]) > _MIN_TOP_LEVEL_PX:
        ds *= step
        shapes.append((-(-width // ds), -(-height // ds), ds))
    return shapes


@dataclass(frozen=True)
class SynthSpec:
    """Everything that defines a synthetic slide (the same spec always gives the same pixels).

    Attributes:
        width / height: level-0 size, px.
        mpp: level-0 resolution, µm/px.
        flavour: ``svs`` | ``svs-nompp`` | ``tiff`` | ``tiff-nompp``.
        seed: seed of the layout and the texture (>= 0).
        tumour: plant tumour regions (the slide label is then 1).
        n_tumours: number of tumour regions when ``tumour`` is set.
        tumour_radius_um: (min, max) radius of a tumour region, µm. Each lesion's radius is
            drawn log-uniformly in this range, capped at what its island can hold, so one
            slide mixes sizes like CAMELYON's classes: with the default (50, 2500) about a
            third are ITC/small-micro-like (50-200 µm), 40 % micro (200-1000 µm) and a
            quarter macro (> 1000 µm, i.e. > 2 mm across) where the island can hold one:
            the first appear at a slide side of about 10 mm (20k px at 0.5 µm/px), the full
            quarter from about 30 mm. On smaller slides the range shrinks to what the island
            holds (a 2 mm slide gets 50-120 µm lesions), still log-uniform within it.
        pen: draw 1-2 thick pen-ink strokes (blue or green first, maybe black) around tissue.
        border: draw a black slide-edge strip along one side.
        tissue_fraction: approximate fraction of the slide area covered by tissue.
        tile: TIFF tile side, px (multiple of 16).
        quality: JPEG quality, 1-100.
        level_step: downsample factor between pyramid levels (2 or 4).
    """

    width: int = 8192
    height: int = 8192
    mpp: float = 0.5
    flavour: str = "svs"
    seed: int = 0
    tumour: bool = True
    n_tumours: int = 2
    tumour_radius_um: tuple[float, float] = (50.0, 2500.0)
    pen: bool = False
    border: bool = False
    tissue_fraction: float = 0.35
    tile: int = 256
    quality: int = 80
    level_step: int = 2

    def __post_init__(self) -> None:
        # YAML/JSON give lists; the spec must stay hashable and immutable.
        object.__setattr__(self, "tumour_radius_um", tuple(float(r) for r in self.tumour_radius_um))
        checks = [
            (256 <= self.width <= 1_000_000, f"synth.width={self.width} outside 256-1e6 px"),
            (256 <= self.height <= 1_000_000, f"synth.height={self.height} outside 256-1e6 px"),
            (0.05 <= self.mpp <= 20, f"synth.mpp={self.mpp} outside 0.05-20 µm/px"),
            (self.flavour in FLAVOURS, f"synth.flavour={self.flavour!r} not one of {FLAVOURS}"),
            (self.seed >= 0, "synth.seed must be >= 0"),
            (self.n_tumours >= (1 if self.tumour else 0), "synth.n_tumours must be >= 1"),
            (len(self.tumour_radius_um) == 2, "synth.tumour_radius_um must be (min, max) µm"),
            (0.0 < self.tissue_fraction <= 0.6, "synth.tissue_fraction must be in (0, 0.6]"),
            (self.tile >= 16 and self.tile % 16 == 0, "synth.tile must be a multiple of 16"),
            (1 <= self.quality <= 100, "synth.quality must be 1-100"),
            (self.level_step in (2, 4), "synth.level_step must be 2 or 4"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        lo, hi = self.tumour_radius_um
        if not 0 < lo <= hi:
            raise ConfigError(
                f"synth.tumour_radius_um={self.tumour_radius_um} needs 0 < min <= max"
            )

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Pyramid levels as ``(width px, height px, downsample)``; level 0 first."""
        return pyramid_shapes(self.width, self.height, self.level_step)


@dataclass(frozen=True, eq=False)
class SynthSlide:
    """A written synthetic slide and its ground truth.

    Attributes:
        path: the slide file.
        spec: the spec it was written from.
        label: 1 if tumour was planted, else 0.
        tumour_polygons: outlines of tumour regions, each ``(K, 2) float64`` level-0 px (x, y).
    """

    path: pathlib.Path
    spec: SynthSpec
    label: int
    tumour_polygons: list[np.ndarray] = field(default_factory=list)
