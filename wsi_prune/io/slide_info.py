"""What an opened slide is: its size, pyramid, resolution and vendor (:class:`SlideInfo`), as
:class:`~wsi_prune.io.slide.Slide` reads them from OpenSlide or the plain-image reader."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import openslide

from wsi_prune.io.mpp import float_property


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide.

    Attributes:
        path: the file.
        reader: ``openslide`` or ``image`` (the plain-image fallback).
        vendor: OpenSlide's vendor string (``aperio``, ``generic-tiff``...) or ``image``.
        width / height: level-0 size, px.
        level_dimensions: (w, h) per pyramid level, px.
        level_downsamples: downsample of each level relative to level 0.
        mpp_x / mpp_y: level-0 resolution, µm/px.
        mpp_source: where the MPP came from (see the module docstring).
        objective_power: nominal objective magnification, or None.
        bounds: (x, y, width, height) level-0 px of the non-empty region when OpenSlide
            reports one (``openslide.bounds-*``: MIRAX, Leica SCN...), else None.
    """

    path: str
    reader: str
    vendor: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float
    mpp_y: float
    mpp_source: str
    objective_power: float | None
    bounds: tuple[int, int, int, int] | None = None

    @property
    def mpp(self) -> float:
        """Level-0 resolution, µm/px (mean of x and y)."""
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["bounds"] = list(self.bounds) if self.bounds is not None else None
        d["mpp"] = self.mpp
        return d


def slide_bounds(props: Any) -> tuple[int, int, int, int] | None:
    """OpenSlide's ``openslide.bounds-x/y/width/height`` (level-0 px), when all are given."""
    keys = (openslide.PROPERTY_NAME_BOUNDS_X, openslide.PROPERTY_NAME_BOUNDS_Y,
            openslide.PROPERTY_NAME_BOUNDS_WIDTH, openslide.PROPERTY_NAME_BOUNDS_HEIGHT)
    vals = [float_property(props, k) for k in keys]
    if any(v is None for v in vals):
        return None
    return tuple(int(v) for v in vals)  # type: ignore[return-value]
