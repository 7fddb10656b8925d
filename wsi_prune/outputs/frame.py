"""The coordinate frame of the files written for viewers.

The store, the tile grid and the CAMELYON16 files (``candidates.csv``, ``OUT/froc/``) are in
OpenSlide's level-0 px: the frame ASAP and ``Evaluation_FROC.py`` read slides and masks in
(ASAP calls ``openslide_read_region`` with the full level-0 plane), so lesion XML and
candidates agree. On MIRAX and bounded Leica SCN slides, OpenSlide reports the non-empty
region as ``openslide.bounds-x/y/width/height``, and QuPath shows only that region, with its
own (0, 0) at ``(bounds-x, bounds-y)``. The files meant for QuPath (``regions.geojson``,
``tiles.geojson``, ``tissue.geojson``) and the slide-scale ``heatmap.tif`` are therefore
written in the *viewer frame*: OpenSlide's level-0 px minus ``(bounds-x, bounds-y)``, covering
``bounds-width`` x ``bounds-height``. On every other slide (Aperio, generic TIFF, CAMELYON16's
TIFFs) the two frames are the same. The convention and each slide's offset are recorded in
the store (``attrs["viewer_frame"]``) and in ``manifest.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: the convention, as recorded in the store and the manifest
CONVENTION = {
    "store, candidates.csv, froc/": "OpenSlide level-0 px (as ASAP and Evaluation_FROC.py)",
    "regions.geojson, tiles.geojson, tissue.geojson, heatmap.tif":
        "viewer frame: OpenSlide level-0 px minus (openslide.bounds-x, openslide.bounds-y), "
        "as QuPath shows bounded (MIRAX, Leica SCN) slides; the same as OpenSlide's "
        "elsewhere",
}


@dataclass(frozen=True)
class ViewerFrame:
    """Where a slide's viewer frame sits in OpenSlide's level-0 plane.

    Attributes:
        x / y: level-0 px of the viewer's (0, 0) (``openslide.bounds-x/y``, else 0).
        width / height: level-0 px the viewer shows.
    """

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def of(cls, slide_attrs: dict[str, Any]) -> ViewerFrame:
        """The frame of a store's ``attrs["slide"]`` (:class:`~wsi_prune.io.slide.SlideInfo`
        as a dict; stores written before bounds were recorded have none)."""
        bounds = slide_attrs.get("bounds")
        if bounds:
            bx, by, bw, bh = (int(v) for v in bounds)
            return cls(bx, by, bw, bh)
        return cls(0, 0, int(slide_attrs["width"]), int(slide_attrs["height"]))

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) level-0 px to subtract from OpenSlide coordinates."""
        return self.x, self.y

    def to_dict(self) -> dict[str, Any]:
        return {"offset_level0": [self.x, self.y], "size_level0": [self.width, self.height]}
