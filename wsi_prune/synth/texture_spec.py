"""Parameters of a texture slide (:class:`TextureSpec`) and what writing one returns
(:class:`TextureSlide`)."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_prune.errors import ConfigError
from wsi_prune.synth.lesions import Region
from wsi_prune.synth.spec import SynthSlide, pyramid_shapes
from wsi_prune.synth.texture import DEFAULT_SOURCE

TEXTURE_FLAVOURS = ("svs", "tiff")


@dataclass(frozen=True)
class TextureSpec:
    """Everything that defines a texture slide (the same spec always gives the same pixels).

    Attributes:
        width / height: level-0 size, px.
        mpp: level-0 resolution, µm/px.
        seed: seed of the layout, lesions, stain and texture placement (>= 0).
        tumour: plant tumour lesions (the slide label is then 1).
        difficulty: 0 (tumour obvious) to 1 (tumour barely differs from normal tissue and
            its mimics); moves the tumour and mimic grade distributions towards each other
            (see :mod:`wsi_prune.synth.lesions`).
        n_lesions: micro/macro lesions of a tumour slide, 1-4; ``None`` draws 1-4.
        n_itc: ITCs added to a tumour slide; ``None`` draws 0-3.
        n_mimics: tumour-like dense regions of normal tissue (hard negatives, both labels);
            ``None`` draws 2-6 (scaled with the tissue area of a 12288² px slide).
        tissue_fraction: approximate fraction of the slide covered by tissue.
        bank_seed: seed of the texture bank (which patches are cut from ``source``);
            ``None`` uses ``seed``. Slides of one dataset share one bank.
        source: the real H&E slide the texture is cut from.
        flavour: ``svs`` (Aperio description with MPP) or ``tiff`` (resolution tags).
        tile: TIFF tile side, px (multiple of 16).
        quality: JPEG quality, 1-100.
        level_step: downsample factor between pyramid levels (2 or 4).
    """

    width: int = 12288
    height: int = 12288
    mpp: float = 0.5
    seed: int = 0
    tumour: bool = True
    difficulty: float = 0.5
    n_lesions: int | None = None
    n_itc: int | None = None
    n_mimics: int | None = None
    tissue_fraction: float = 0.45
    bank_seed: int | None = None
    source: str = str(DEFAULT_SOURCE)
    flavour: str = "svs"
    tile: int = 256
    quality: int = 80
    level_step: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))
        checks = [
            (1024 <= self.width <= 1_000_000, f"width={self.width} outside 1024-1e6 px"),
            (1024 <= self.height <= 1_000_000, f"height={self.height} outside 1024-1e6 px"),
            (0.1 <= self.mpp <= 2.0, f"mpp={self.mpp} outside 0.1-2 µm/px"),
            (self.seed >= 0, "seed must be >= 0"),
            (0.0 <= self.difficulty <= 1.0, f"difficulty={self.difficulty} outside [0, 1]"),
            (self.n_lesions is None or 1 <= self.n_lesions <= 8, "n_lesions must be 1-8"),
            (self.n_itc is None or 0 <= self.n_itc <= 20, "n_itc must be 0-20"),
            (self.n_mimics is None or 0 <= self.n_mimics <= 50, "n_mimics must be 0-50"),
            (0.05 <= self.tissue_fraction <= 0.6, "tissue_fraction must be in [0.05, 0.6]"),
            (self.bank_seed is None or self.bank_seed >= 0, "bank_seed must be >= 0"),
            (self.flavour in TEXTURE_FLAVOURS, f"flavour={self.flavour!r} not one of "
                                               f"{TEXTURE_FLAVOURS}"),
            (self.tile >= 64 and self.tile % 16 == 0, "tile must be a multiple of 16, >= 64"),
            (1 <= self.quality <= 100, "quality must be 1-100"),
            (self.level_step in (2, 4), "level_step must be 2 or 4"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"texture slide: {msg}")

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Pyramid levels as ``(width px, height px, downsample)``; level 0 first."""
        return pyramid_shapes(self.width, self.height, self.level_step)


@dataclass(frozen=True, eq=False)
class TextureSlide(SynthSlide):
    """A written texture slide and its ground truth.

    Attributes:
        spec: the spec it was written from.
        lesions: planted tumour lesions (ITC, micro, macro), largest first.
        mimics: planted hard negatives (not tumour; not in the XML).
        tumour_polygons: the lesions' outlines, ``(K, 2) float64`` level-0 px (x, y).
    """

    spec: TextureSpec
    lesions: tuple[Region, ...] = ()
    mimics: tuple[Region, ...] = ()
