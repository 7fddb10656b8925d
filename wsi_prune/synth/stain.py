"""H&E colour deconvolution (Ruifrok & Johnston 2001) and the stain jitter of texture slides.

Texture slides are edited in stain space: optical density ``OD = -log((RGB + 1) / 256)`` is a
linear mix of the haematoxylin (nuclei), eosin (cytoplasm, stroma) and a residual stain vector,
so ``OD = C @ S`` with ``S`` the ``(3, 3)`` stain matrix (rows H, E, residual) and ``C`` the
per-pixel concentrations. Darkening nuclei, shifting the stain or blending two textures is then
arithmetic on ``C``, and a *different* ``S`` when converting back gives a slide its own hue, as
two labs' H&E differ. The ``+1`` keeps white (255) at OD 0 and black finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Ruifrok & Johnston's H and E optical-density vectors (RGB); the residual is their cross
# product, so the matrix is invertible and an edit of H and E alone leaves the rest untouched.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def stain_matrix(h: np.ndarray = _H, e: np.ndarray = _E) -> np.ndarray:
    """``(3, 3) float32`` stain matrix, rows: unit OD vectors of H, E and their residual."""
    h, e = _unit(np.asarray(h, np.float64)), _unit(np.asarray(e, np.float64))
    return np.stack([h, e, _unit(np.cross(h, e))]).astype(np.float32)


REFERENCE_STAINS = stain_matrix()
_UNMIX = np.linalg.inv(REFERENCE_STAINS.astype(np.float64)).astype(np.float32)
# OD of every uint8 value: a table lookup instead of a log per pixel.
_OD_LUT = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``(..., 3) float32`` of ``(..., 3) uint8`` RGB (a table lookup)."""
    return _OD_LUT[rgb]


def rgb_to_conc(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations of RGB pixels under :data:`REFERENCE_STAINS`.

    Args:
        rgb: ``(..., 3) uint8``.

    Returns:
        ``(..., 3) float32``: H, E, residual (OD units; glass is about 0).
    """
    return _OD_LUT[rgb] @ _UNMIX


def conc_to_rgb(conc: np.ndarray, stains: np.ndarray = REFERENCE_STAINS) -> np.ndarray:
    """RGB of stain concentrations under ``stains``, ``(..., 3) float32`` in [0, 255]."""
    od = np.maximum(conc @ stains, 0.0)
    return np.clip(256.0 * np.exp(-od) - 1.0, 0.0, 255.0)


def conc_to_od(conc: np.ndarray) -> np.ndarray:
    """Optical density ``(..., 3) float32`` of concentrations under the reference stains."""
    return conc @ REFERENCE_STAINS


def od_to_conc(od: np.ndarray) -> np.ndarray:
    """Concentrations ``(..., 3) float32`` of optical densities under the reference stains."""
    return od @ _UNMIX


@dataclass(frozen=True)
class SlideStain:
    """One slide's staining: its own stain vectors and overall H and E strength.

    Attributes:
        stains: ``(3, 3) float32`` stain matrix used to turn concentrations back into RGB.
        h_gain / e_gain: multipliers of H and E concentrations (1 = as in the source slide).
    """

    stains: np.ndarray
    h_gain: float
    e_gain: float


def draw_slide_stain(rng: np.random.Generator, strength: float = 1.0) -> SlideStain:
    """A random staining, as H&E varies between labs and batches.

    Each stain vector is tilted by about ``0.05 * strength`` (a few degrees of hue) and each
    stain's strength scaled log-normally with sigma ``0.12 * strength``.
    """
    h = _H + rng.normal(0.0, 0.05 * strength, 3)
    e = _E + rng.normal(0.0, 0.05 * strength, 3)
    # keep the vectors physical (positive OD in every channel)
    h, e = np.maximum(h, 0.02), np.maximum(e, 0.02)
    h_gain = math.exp(rng.normal(0.0, 0.12 * strength))
    e_gain = math.exp(rng.normal(0.0, 0.12 * strength))
    return SlideStain(stain_matrix(h, e), h_gain, e_gain)
