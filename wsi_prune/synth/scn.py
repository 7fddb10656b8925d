"""A bounded Leica SCN slide: the synthetic slide as the one brightfield image of a larger
Leica "collection", at an offset inside it, so OpenSlide reports ``openslide.bounds-x/y`` (as
it does for real SCN and MIRAX slides, which QuPath crops to those bounds).

The file is a tiled BigTIFF whose first directory is the collection's macro image carrying
the Leica XML ImageDescription (namespace ``http://www.leica-microsystems.com/scn/2010/10/01``),
then the main image's pyramid, one directory per level, with resolution tags in px/cm (which
OpenSlide's leica driver turns into ``openslide.mpp-x/y``). Sizes in the XML are nanometres.
OpenSlide's level-0 plane is the whole collection; everything outside the main image is
transparent (white to our reader). Small slides only: each level is rendered in memory.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tifffile

from wsi_prune.synth.layout import _Layout
from wsi_prune.synth.render import render_tile
from wsi_prune.synth.spec import SynthSlide, SynthSpec

LEICA_XMLNS = "http://www.leica-microsystems.com/scn/2010/10/01"
_SETTINGS = (
    "<scanSettings><objectiveSettings><objective>{obj}</objective></objectiveSettings>"
    "<illuminationSettings><numericalAperture>0.4</numericalAperture>"
    "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>"
)


def _image_xml(name: str, dims: list[tuple[int, int, int]], view_nm: tuple[int, ...],
               objective: int) -> str:
    w, h = dims[0][:2]
    dim_xml = "".join(f'<dimension sizeX="{dw}" sizeY="{dh}" r="{r}" ifd="{ifd}"/>'
                      for r, (dw, dh, ifd) in enumerate(dims))
    vx, vy, vw, vh = view_nm
    return (f'<image name="{name}"><creationDate>2024-01-01T00:00:00Z</creationDate>'
            f'<device model="Leica SCN400" version="1.5"/>'
            f'<pixels sizeX="{w}" sizeY="{h}">{dim_xml}</pixels>'
            f'<view sizeX="{vw}" sizeY="{vh}" offsetX="{vx}" offsetY="{vy}" spacingZ="0"/>'
            f'{_SETTINGS.format(obj=objective)}</image>')


def write_leica_scn(path: str | os.PathLike[str], spec: SynthSpec,
                    offset_px: tuple[int, int], collection_px: tuple[int, int],
                    macro_px: int = 256) -> SynthSlide:
    """Write ``spec``'s slide as the main image of a Leica SCN collection.

    Args:
        path: output ``.scn`` file.
        spec: the slide to draw (its width, height, mpp, seed...; the flavour is ignored).
        offset_px: (x, y) level-0 px of the main image inside the collection: OpenSlide's
            ``openslide.bounds-x/y``.
        collection_px: (width, height) level-0 px of the collection: OpenSlide's level-0 size.
        macro_px: width of the macro image.

    Returns:
        The slide, with tumour polygons in OpenSlide's level-0 px (shifted by ``offset_px``).
    """
    path = pathlib.Path(path)
    ox, oy = (int(v) for v in offset_px)
    cw, ch = (int(v) for v in collection_px)
    if ox < 0 or oy < 0 or ox + spec.width > cw or oy + spec.height > ch:
        raise ValueError(f"main image {spec.width}x{spec.height} at ({ox}, {oy}) does not fit "
                         f"the collection {cw}x{ch}")
    nm = spec.mpp * 1000.0
    layout = _Layout(spec)
    levels = [render_tile(layout, ds, 0, 0, lw, lh) for lw, lh, ds in spec.level_shapes]
    mh = max(1, round(macro_px * ch / cw))
    macro = np.full((mh, macro_px, 3), 235, np.uint8)
    objective = 40 if spec.mpp < 0.35 else 20
    coll_nm = (round(cw * nm), round(ch * nm))
    xml = (f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{LEICA_XMLNS}">'
           f'<collection name="{path.stem}" sizeX="{coll_nm[0]}" sizeY="{coll_nm[1]}">'
           + _image_xml("macro", [(macro_px, mh, 0)], (0, 0, *coll_nm), objective)
           + _image_xml("main", [(a.shape[1], a.shape[0], i + 1) for i, a in enumerate(levels)],
                        (round(ox * nm), round(oy * nm), round(spec.width * nm),
                         round(spec.height * nm)), objective)
           + "</collection></scn>")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            tif.write(macro, tile=(16, 16), photometric="rgb", compression="jpeg",
                      description=xml, metadata=None, software=False)
            for a in levels:
                ppcm = 1e4 / (spec.mpp * spec.width / a.shape[1])
                tif.write(a, tile=(spec.tile, spec.tile), photometric="rgb", compression="jpeg",
                          compressionargs={"level": spec.quality}, resolution=(ppcm, ppcm),
                          resolutionunit="CENTIMETER", metadata=None, software=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    label = int(spec.tumour and spec.n_tumours > 0)
    polys = [b.outline() + np.array([ox, oy], np.float64) for b in layout.tumours]
    return SynthSlide(path, spec, label, polys)
