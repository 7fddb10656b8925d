"""Writing synthetic slides: tiled JPEG pyramids with tifffile, tile by tile in bounded memory
(:func:`write_slide`), and CAMELYON-like sets with labels and lesion XML (:func:`write_dataset`).
The flavours are described in :mod:`wsi_prune.synth`.
"""

from __future__ import annotations

import csv
import logging
import os
import pathlib
import time

import numpy as np
import tifffile

from wsi_prune.errors import ConfigError
from wsi_prune.synth.layout import _Layout
from wsi_prune.synth.pyramid import prefetch_map
from wsi_prune.synth.render import render_tile
from wsi_prune.synth.spec import SynthSlide, SynthSpec
from wsi_prune.synth.truth import write_asap_xml

_logger = logging.getLogger(__name__)


def _aperio_description(spec: SynthSpec, path: pathlib.Path) -> str:
    w, h, t = spec.width, spec.height, spec.tile
    app_mag = 40 if spec.mpp < 0.35 else 20
    mpp = "" if spec.flavour == "svs-nompp" else f"|MPP = {spec.mpp:.6g}"
    return (
        f"Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q={spec.quality}"
        f"|AppMag = {app_mag}|Filename = {path.stem}{mpp}"
    )


def write_slide(path: str | os.PathLike[str], spec: SynthSpec, workers: int = 2) -> SynthSlide:
    """Write a synthetic pyramidal slide, tile by tile, in bounded memory.

    The file is written next to ``path`` and renamed into place, so a crash leaves no half slide.

    Args:
        path: output file (``.svs`` or ``.tif``; the flavour decides the format, not the suffix).
        spec: what to draw.
        workers: threads rendering tiles ahead of the JPEG encoder.

    Returns:
        The slide with its label and tumour polygons (level-0 px).
    """
    path = pathlib.Path(path)
    layout = _Layout(spec)
    levels = spec.level_shapes
    t = spec.tile
    raw = spec.width * spec.height * 3
    tmp = path.with_name(f".{path.name}.partial")
    start = time.perf_counter()
    try:
        # Classic TIFF offsets are 32-bit: switch to BigTIFF well before compressed data nears 4 GB.
        with tifffile.TiffWriter(tmp, bigtiff=raw > 2**31) as tif:
            for li, (lw, lh, ds) in enumerate(levels):
                tiles = [(c, r) for r in range(0, lh, t) for c in range(0, lw, t)]
                _logger.info("%s: level %d/%d %dx%d px (%d tiles)", path.name, li + 1,
                             len(levels), lw, lh, len(tiles))  # fmt: skip
                kwargs: dict = {}
                if li == 0 and spec.flavour in ("svs", "svs-nompp"):
                    kwargs["description"] = _aperio_description(spec, path)
                if spec.flavour == "tiff":
                    px_per_cm = 10_000.0 / (spec.mpp * ds)
                    kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                else:
                    kwargs.update(resolution=(1.0, 1.0), resolutionunit="NONE")

                def render(cr: tuple[int, int], ds: int = ds) -> np.ndarray:
                    return render_tile(layout, ds, cr[0], cr[1], t, t)

                # maxworkers=1: tifffile would otherwise buffer up to 512 MB of tiles to
                # compress them in parallel; our look-ahead threads render instead.
                tif.write(
                    prefetch_map(render, tiles, workers),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(t, t),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": spec.quality},
                    subfiletype=1 if li else 0,
                    metadata=None,
                    software=False,
                    maxworkers=1,
                    **kwargs,
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _logger.info("%s: written in %.1f s", path, time.perf_counter() - start)
    label = int(spec.tumour and spec.n_tumours > 0)
    return SynthSlide(path, spec, label, [b.outline() for b in layout.tumours])


def write_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    size: int = 8192,
    tumour_fraction: float = 0.5,
    **spec_overrides,
) -> list[SynthSlide]:
    """Write ``n`` square slides and a CAMELYON16-style ``labels.csv`` (``slide,label``).

    Exactly ``round(n * tumour_fraction)`` slides get tumour, at positions drawn from ``seed``;
    each slide has its own seed derived from ``(seed, index)``. Labels are ``Tumor``/``Normal``.
    Each tumour slide ``synth_<i>.<ext>`` gets its lesion outlines in ``synth_<i>.xml`` (ASAP
    format, group ``Tumor``, level-0 px; see :func:`write_asap_xml`), as CAMELYON16 ships them.

    Args:
        out_dir: created if missing.
        n: number of slides (>= 1).
        seed: dataset seed.
        size: side of each slide, level-0 px.
        tumour_fraction: fraction of tumour slides, in [0, 1].
        **spec_overrides: any other :class:`SynthSpec` field (``mpp``, ``flavour``, ``pen``...).
    """
    if n < 1 or not 0.0 <= tumour_fraction <= 1.0:
        raise ConfigError(f"write_dataset needs n >= 1 and tumour_fraction in [0, 1], got "
                          f"n={n}, tumour_fraction={tumour_fraction}")  # fmt: skip
    bad = {"width", "height", "seed", "tumour"} & spec_overrides.keys()
    if bad:
        raise ConfigError(f"write_dataset sets {sorted(bad)} itself")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xDA7A])
    positive = set(rng.permutation(n)[: round(n * tumour_fraction)].tolist())
    slides = []
    for i in range(n):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        spec = SynthSpec(width=size, height=size, seed=slide_seed, tumour=i in positive,
                         **spec_overrides)  # fmt: skip
        ext = ".svs" if spec.flavour.startswith("svs") else ".tif"
        slide = write_slide(out / f"synth_{i:03d}{ext}", spec)
        xml = slide.path.with_suffix(".xml")
        if slide.label:
            write_asap_xml(xml, slide.tumour_polygons)
        else:
            xml.unlink(missing_ok=True)  # a stale annotation from an earlier set in this folder
        slides.append(slide)
    tmp = out / ".labels.csv.partial"
    with tmp.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide", "label"])
        for s in slides:
            wr.writerow([s.path.stem, "Tumor" if s.label else "Normal"])
    os.replace(tmp, out / "labels.csv")
    return slides
