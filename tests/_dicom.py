"""DICOM whole-slide images for tests, written with pydicom: one file per pyramid level, as
scanners and the Imaging Data Commons ship them (VL Whole Slide Microscopy Image, tiled full,
JPEG baseline frames), so that OpenSlide's DICOM reader opens the series from any one file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _frames(img: np.ndarray, tile: int) -> list[bytes]:
    h, w = img.shape[:2]
    out = []
    for r in range(-(-h // tile)):
        for c in range(-(-w // tile)):
            t = np.full((tile, tile, 3), 255, np.uint8)
            blk = img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            t[:blk.shape[0], :blk.shape[1]] = blk
            buf = io.BytesIO()
            Image.fromarray(t).save(buf, "JPEG", quality=90, subsampling=0)
            out.append(buf.getvalue())
    return out


def write_dicom_slide(folder: str | Path, img: np.ndarray, mpp: float = 0.5, tile: int = 256,
                      levels: int = 2, series_uid: str | None = None,
                      names: tuple[str, ...] | None = None) -> list[Path]:
    """Write ``img`` as a DICOM WSI series into ``folder``: level ``i`` at ``mpp * 4**i``
    µm/px, one file each (default names ``level<i>.dcm``).

    Args:
        img: (H, W, 3) uint8 RGB, level 0; H and W divisible by ``4 ** (levels - 1)``.
        mpp: level-0 resolution, µm/px (written as PixelSpacing in mm).
        series_uid: the SeriesInstanceUID (default: a new one).

    Returns:
        The files written, level 0 first.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, frame_ref = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    names = names or tuple(f"level{i}.dcm" for i in range(levels))
    written = []
    level = img
    for i in range(levels):
        if i:
            h, w = level.shape[:2]
            level = level.reshape(h // 4, 4, w // 4, 4, 3).mean((1, 3)).round().astype(np.uint8)
        h, w = level.shape[:2]
        spacing = mpp * 4 ** i / 1000.0
        frames = _frames(level, tile)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = WSI_SOP_CLASS
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.FrameOfReferenceUID = frame_ref
        ds.Modality, ds.PatientID, ds.ContainerIdentifier = "SM", "TEST", "SLIDE"
        ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else
                        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfFrames = len(frames)
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * spacing, h * spacing
        measures = Dataset()
        measures.PixelSpacing = [spacing, spacing]
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([path])
        ds.NumberOfOpticalPaths = 1
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        out = folder / names[i]
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written
