"""DICOM whole-slide images: which series a ``.dcm`` file belongs to.

A DICOM slide is a series of files in one folder (one per pyramid level, plus label and
overview); OpenSlide opens the whole series from any one of them, so slide discovery
(:mod:`wsi_prune.pipeline.inputs`) keeps one file per series.
"""

from __future__ import annotations

import os

import openslide

__all__ = ["dicom_series_uid"]


def dicom_series_uid(path: str | os.PathLike[str]) -> str | None:
    """The SeriesInstanceUID of the DICOM whole-slide series ``path`` belongs to, or None when
    OpenSlide does not read it as a DICOM slide (another format, a damaged or non-image file).

    A DICOM slide is a series of files (one per pyramid level, plus label and overview) in one
    folder; OpenSlide opens the whole series from any one of them.
    """
    try:
        if openslide.OpenSlide.detect_format(str(path)) != "dicom":
            return None
        with openslide.OpenSlide(str(path)) as osr:
            uid = osr.properties.get("dicom.SeriesInstanceUID")
    except (openslide.OpenSlideError, OSError, ValueError):
        return None
    return str(uid) if uid else None
