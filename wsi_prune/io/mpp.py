"""Where a slide's physical resolution (µm/px) comes from.

MPP resolution chain (first hit wins, the source is recorded in every output):

1. the user's value (``--mpp`` or a slide-list CSV ``mpp`` column) → ``"user"``, with a warning
   when it differs from the metadata MPP (links 2-3) by more than
   :data:`MPP_DISAGREEMENT` (5 %). An explicit value wins over any estimate: the objective
   power's 10 / power is only nominal (a GT450 at 40x is 0.263 µm/px, a Hamamatsu ~0.227, not
   0.25), and a user who passes a value has usually measured it;
2. ``openslide.mpp-x/y`` (vendor metadata) → source ``"openslide"``
3. TIFF resolution tags when the unit is cm or inch and the value is plausible for microscopy
   (0.05-20 µm/px) → ``"tiff-resolution"``; then an OME-TIFF's OME-XML ``PhysicalSizeX/Y``
   (plausible too) → ``"ome-xml"``
4. objective power (40x ≈ 0.25, 20x ≈ 0.5 µm/px, i.e. 10 / power), with a warning →
   ``"objective-power"``
5. otherwise :class:`~wsi_prune.errors.MissingMPP` telling the user to pass ``--mpp``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import openslide
import tifffile

from wsi_prune.errors import MissingMPP

_logger = logging.getLogger(__name__)

#: plausible microscopy resolutions, µm/px
MPP_RANGE = (0.05, 20.0)
#: relative difference between a user's MPP and the metadata's above which we warn
MPP_DISAGREEMENT = 0.05


def plausible(mpp: float | None) -> bool:
    """True for a finite µm/px inside :data:`MPP_RANGE`."""
    return mpp is not None and math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def float_property(props: Any, key: str) -> float | None:
    """``props[key]`` as a float; None when missing or not a number."""
    try:
        return float(props[key])
    except (KeyError, TypeError, ValueError):
        return None


def metadata_mpp(props: Any) -> tuple[float, float, str] | None:
    """The MPP the slide's own metadata states (links 2 and 3 of the chain), or None."""
    mx = float_property(props, openslide.PROPERTY_NAME_MPP_X)
    my = float_property(props, openslide.PROPERTY_NAME_MPP_Y)
    if plausible(mx):
        return mx, my if plausible(my) else mx, "openslide"  # type: ignore[return-value]

    tiff = _tiff_resolution(props)
    if tiff is not None and plausible(tiff[0]) and plausible(tiff[1]):
        return tiff[0], tiff[1], "tiff-resolution"
    ome = ome_physical_size(str(props.get("tiff.ImageDescription", "")))
    if ome is not None and plausible(ome[0]) and plausible(ome[1]):
        return ome[0], ome[1], "ome-xml"
    return None


#: µm per unit of the OME schema's length units that a pixel size may plausibly be given in
_OME_UNITS = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3,
              "cm": 1e4, "m": 1e6, "Å": 1e-4}


def ome_physical_size(description: str) -> tuple[float, float] | None:
    """The pixel size (x, y) in µm/px that an OME-TIFF's OME-XML description gives its first
    image (``Pixels`` ``PhysicalSizeX/Y`` with their units, µm by default), or None.

    Exporters (QuPath, bfconvert, tifffile) write an OME-TIFF's resolution there, often with
    no TIFF resolution tags at all; OpenSlide reads such a file as a generic TIFF and sets no
    ``openslide.mpp-x``.
    """
    if "<OME" not in description[:2048] or "PhysicalSizeX" not in description:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = float_property(el.attrib, f"PhysicalSize{axis}")
            unit = _OME_UNITS.get(el.attrib.get(f"PhysicalSize{axis}Unit", "µm"))
            sizes.append(value * unit if value and value > 0 and unit else None)
        if sizes[0] is None:
            return None
        return sizes[0], sizes[1] if sizes[1] is not None else sizes[0]
    return None


def _tiff_resolution(props: Any) -> tuple[float, float, str] | None:
    """The µm/px the TIFF resolution tags state, plausible or not: ``(x, y, what the tags
    say)``, or None without tags in cm or inch."""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_um = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0}.get(unit)
    rx, ry = float_property(props, "tiff.XResolution"), float_property(props, "tiff.YResolution")
    if not per_um or not rx or rx <= 0:
        return None
    tx = per_um / rx
    return tx, per_um / ry if ry and ry > 0 else tx, f"{rx:g} per {unit}"


def resolve_mpp(
    props: Any, path: str, override: float | None = None
) -> tuple[float, float, str]:
    """Apply the MPP chain to a slide's properties.

    Args:
        props: OpenSlide properties mapping (or any mapping with the same keys).
        path: the slide, for messages.
        override: the user's µm/px (``--mpp`` or a slide list's ``mpp`` column). It wins over
            the metadata and over the objective-power estimate; a warning names both values
            when it differs from the metadata MPP by more than :data:`MPP_DISAGREEMENT`.

    Returns:
        ``(mpp_x, mpp_y, source)`` in µm/px.

    Raises:
        MissingMPP: nothing in the chain gave a plausible value, or ``override`` is not
            plausible (outside :data:`MPP_RANGE`).
    """
    meta = metadata_mpp(props)
    if override is not None:
        if not plausible(override):
            lo, hi = MPP_RANGE
            raise MissingMPP(f"--mpp {override} is outside {lo}-{hi} µm/px", path)
        if meta is not None:
            stated = (meta[0] + meta[1]) / 2.0
            rel = abs(float(override) - stated) / stated
            if rel > MPP_DISAGREEMENT:
                _logger.warning(
                    "%s: the given MPP %.4g µm/px (--mpp or the slide list) differs from the "
                    "slide's metadata %.4g µm/px (%s) by %.0f %%; using the given value",
                    path, float(override), stated, meta[2], 100 * rel,
                )
        return float(override), float(override), "user"
    if meta is not None:
        return meta

    power = float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power and power > 0 and plausible(10.0 / power):
        _logger.warning(
            "%s: no MPP in the metadata; estimating %.3f µm/px from objective power %gx "
            "(nominal: scanners differ by up to 10 %%; pass --mpp to set it)",
            path, 10.0 / power, power,
        )
        return 10.0 / power, 10.0 / power, "objective-power"
    found = implausible_mpp(props)
    if found:
        lo, hi = MPP_RANGE
        raise MissingMPP(
            f"the slide's metadata gives no usable resolution ({found}: outside {lo:g}-{hi:g} "
            f"µm/px, not a microscope scan's); pass --mpp (µm/px) or an mpp column in the "
            f"slide list", path)
    raise MissingMPP(
        "no resolution in the slide's metadata (no openslide.mpp-x, TIFF resolution or "
        "objective power); pass --mpp (µm/px) or an mpp column in the slide list", path
    )


def implausible_mpp(props: Any) -> str:
    """The resolutions the metadata states that :func:`resolve_mpp` refused, for its message
    (e.g. ``TIFF resolution 72 per inch = 352.8 µm/px``, a photo editor's default), or ''."""
    parts = []
    mx = float_property(props, openslide.PROPERTY_NAME_MPP_X)
    if mx is not None:
        parts.append(f"openslide.mpp-x {mx:g} µm/px")
    tiff = _tiff_resolution(props)
    if tiff is not None:
        parts.append(f"TIFF resolution {tiff[2]} = {tiff[0]:.4g} µm/px")
    ome = ome_physical_size(str(props.get("tiff.ImageDescription", "")))
    if ome is not None:
        parts.append(f"OME-XML PhysicalSizeX {ome[0]:.4g} µm/px")
    power = float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power is not None:
        parts.append(f"objective power {power:g}x")
    return "; ".join(parts)


def plain_tiff_properties(path: Path) -> dict[str, str]:
    """A plain TIFF's resolution tags and description under the names OpenSlide gives them
    (``tiff.XResolution``, ``tiff.YResolution``, ``tiff.ResolutionUnit``,
    ``tiff.ImageDescription``), so that
    :func:`resolve_mpp` treats a TIFF OpenSlide does not read (one in strips, without a
    pyramid) as it treats one it reads. Empty when the file has none or cannot be parsed."""
    try:
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages.first.tags
            props: dict[str, str] = {}
            description = tags.get("ImageDescription")
            if description is not None and isinstance(description.value, str):
                props["tiff.ImageDescription"] = description.value
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None:
                return props
            names = {2: "inch", 3: "centimeter"}
            props["tiff.ResolutionUnit"] = names.get(int(unit.value), "none")
            props["tiff.XResolution"] = str(_rational(xres.value))
            if yres is not None:
                props["tiff.YResolution"] = str(_rational(yres.value))
            return props
    except (OSError, ValueError, TypeError, ZeroDivisionError, tifffile.TiffFileError):
        return {}


def _rational(value: Any) -> float:
    """A TIFF RATIONAL as tifffile gives it ((num, den) or a number), as a float."""
    if isinstance(value, tuple):
        return value[0] / value[1]
    return float(value)
