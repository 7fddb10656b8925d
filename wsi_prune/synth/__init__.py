"""Synthetic CAMELYON-like pyramidal slides that real OpenSlide reads, for tests and the demo.

Two kinds. *Procedural* slides (below; ``spec``, ``layout``, ``render``, ``truth``, ``writer``)
draw everything from formulas: fast, any size, easy to separate. *Texture* slides
(``texture``, ``stain``, ``lesions``, ``texture_spec``, ``texture_layout``, ``texture_render``,
``pyramid``, ``texture_writer``) are made of real H&E texture with a subtle tumour class,
CAMELYON16-sized lesions and tumour-like mimics: the benchmark set
(:func:`write_texture_dataset`). ``vendor`` writes given pixels as a scanner's pyramid
(each level resampled from the one before and re-compressed), for the tissue-mask tests.

The content is a procedural function of level-0 coordinates: a handful of analytic shapes (tissue
islands, tumour regions inside them, pen strokes, a black slide-edge strip) plus hash-placed
nuclei and lattice noise. Any tile of any level is therefore rendered on its own, directly at the
level's resolution, and a slide is written tile by tile: memory does not grow with slide size
(a 100k x 100k px slide needs the same few tens of MB as a 2k one).

Four flavours are written with tifffile, each pyramid level as its own tiled JPEG page
(no SubIFDs, ``subfiletype=1`` on reduced levels), which is what OpenSlide's aperio and
generic-tiff drivers expect:

* ``svs``: Aperio ImageDescription carrying ``MPP`` and ``AppMag`` (vendor ``aperio``).
* ``svs-nompp``: Aperio ImageDescription with ``AppMag`` but no ``MPP``, like some TCGA files:
  only the objective power tells the resolution.
* ``tiff``: generic TIFF with ``ResolutionUnit`` centimeter and X/YResolution in px/cm.
* ``tiff-nompp``: generic TIFF with no physical resolution (unit NONE), like some TCGA files.
"""

from wsi_prune.synth.lesions import Effects, Region, size_class
from wsi_prune.synth.render import render_tile
from wsi_prune.synth.spec import FLAVOURS, SynthSlide, SynthSpec
from wsi_prune.synth.texture import DEFAULT_SOURCE, TextureBank, build_texture_bank
from wsi_prune.synth.texture_layout import TextureLayout
from wsi_prune.synth.texture_render import nuclear_darkness, render_region
from wsi_prune.synth.texture_spec import TextureSlide, TextureSpec
from wsi_prune.synth.texture_writer import (
    lesion_rows,
    plan_texture_dataset,
    summarise,
    texture_tumour_mask,
    write_texture_dataset,
    write_texture_slide,
)
from wsi_prune.synth.truth import border_mask, pen_mask, tissue_truth, tumour_mask, write_asap_xml
from wsi_prune.synth.writer import write_dataset, write_slide

__all__ = [
    "DEFAULT_SOURCE", "FLAVOURS", "Effects", "Region", "SynthSlide", "SynthSpec", "TextureBank",
    "TextureLayout", "TextureSlide", "TextureSpec", "border_mask", "build_texture_bank",
    "lesion_rows", "nuclear_darkness", "pen_mask", "plan_texture_dataset", "render_region",
    "render_tile", "size_class", "summarise", "texture_tumour_mask", "tissue_truth",
    "tumour_mask", "write_asap_xml", "write_dataset", "write_slide", "write_texture_dataset",
    "write_texture_slide",
]
