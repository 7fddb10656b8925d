"""Typed, frozen configuration of every stage, gathered in one :class:`RunConfig`.

Each stage has its own ``@dataclass(frozen=True)`` validated in ``__post_init__``. A
:class:`RunConfig` round-trips through YAML/JSON; the SHA-256 of its canonical JSON names the
config, and :meth:`RunConfig.run_hash` adds the SHA-256 of the weight files it names: that is
the run's identity (resume, manifests). :meth:`RunConfig.section_hash` hashes only some
sections, so that a tile store is reused when only model settings change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from wsi_prune._files import file_sha256
from wsi_prune.errors import ConfigError

#: autocast precisions of the ViT and the scorer (``fp32``: no autocast)
PRECISIONS = ("fp32", "bf16", "fp16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TissueConfig:
    """Tissue / background / pen-ink masking, in physical units.

    Attributes:
        mask_mpp: resolution of the mask read, µm/px (about 8-16).
        min_region_um2: connected tissue regions smaller than this are dropped, µm².
        min_hole_um2: holes inside tissue smaller than this are filled, µm².
        closing_um: radius of the morphological closing, µm.
        white_threshold: pixels whose min(R,G,B) is above this are background (0-255).
        black_threshold: pixels whose max(R,G,B) is below this are slide-edge/marker black.
        saturation_min: lower bound on HSV saturation (0-255) applied after Otsu, measured
            on the image white-balanced to its glass.
        reject_pen: reject marker ink (by colour, and smooth stain of any colour).
        ink_min_um2: smallest smooth stained region taken for ink, µm² (a nucleus is ~50).
        max_mask_mpx: largest slide thumbnail masked, megapixels; bigger slides are masked
            coarser than ``mask_mpp`` (bounds the mask stage's memory).
    """

    mask_mpp: float = 8.0
    min_region_um2: float = 20_000.0
    min_hole_um2: float = 10_000.0
    closing_um: float = 16.0
    white_threshold: int = 215
    black_threshold: int = 50
    saturation_min: int = 15
    reject_pen: bool = True
    ink_min_um2: float = 2_000.0
    max_mask_mpx: float = 24.0

    def __post_init__(self) -> None:
        _check(0.5 <= self.mask_mpp <= 64, f"tissue.mask_mpp={self.mask_mpp} outside 0.5-64 µm/px")
        _check(self.min_region_um2 >= 0 and self.min_hole_um2 >= 0, "tissue areas must be >= 0")
        _check(0 <= self.white_threshold <= 255, "tissue.white_threshold must be 0-255")
        _check(0 <= self.black_threshold <= 255, "tissue.black_threshold must be 0-255")
        _check(self.black_threshold < self.white_threshold,
               "tissue.black_threshold must be below tissue.white_threshold")
        _check(0 <= self.saturation_min <= 255, "tissue.saturation_min must be 0-255")
        _check(self.closing_um >= 0, "tissue.closing_um must be >= 0")
        _check(self.ink_min_um2 >= 0, "tissue.ink_min_um2 must be >= 0")
        _check(self.max_mask_mpx >= 0.01, "tissue.max_mask_mpx must be >= 0.01")


@dataclass(frozen=True)
class TilingConfig:
    """The tile grid and the Zarr layout.

    Attributes:
        mpp: working resolution of full-resolution tiles, µm/px.
        tile_px: full-resolution tile side, px at ``mpp``.
        coarse_factor: the triage grid is this many times coarser (same footprint, fewer px).
        tissue_threshold: keep a tile whose tissue fraction is >= this.
        tiles_per_shard: tiles per Zarr shard and per Dask task (tasks write whole shards).
        compressor: ``zstd`` or ``none`` for tile arrays (see docs/benchmarks.md).
        store_tiles: also store full-resolution tiles (large; off by default).
        on_corrupt_tile: what a tile that fails to decode inside an otherwise readable slide
            does: ``skip`` (recorded as unreadable in the store and ``predictions.csv``, left
            out of triage and the ViT; the slide completes) or ``fail`` (the slide fails).
        max_unreadable_fraction: with ``skip``, a slide whose unreadable tiles are more than
            this share of its tissue tiles fails all the same (in [0, 1]).
    """

    mpp: float = 0.5
    tile_px: int = 224
    coarse_factor: int = 4
    tissue_threshold: float = 0.25
    tiles_per_shard: int = 64
    compressor: str = "zstd"
    store_tiles: bool = False
    on_corrupt_tile: str = "skip"
    max_unreadable_fraction: float = 0.05

    def __post_init__(self) -> None:
        _check(0.05 <= self.mpp <= 20, f"tiling.mpp={self.mpp} outside 0.05-20 µm/px")
        _check(self.on_corrupt_tile in ("skip", "fail"),
               f"tiling.on_corrupt_tile={self.on_corrupt_tile!r} must be skip or fail")
        _check(0.0 <= self.max_unreadable_fraction <= 1.0,
               "tiling.max_unreadable_fraction must be in [0, 1]")
        _check(self.tile_px >= 16, "tiling.tile_px must be >= 16")
        _check(self.coarse_factor >= 1, "tiling.coarse_factor must be >= 1")
        _check(self.tile_px % self.coarse_factor == 0, "tile_px must be divisible by coarse_factor")
        _check(0.0 <= self.tissue_threshold <= 1.0, "tiling.tissue_threshold must be in [0, 1]")
        _check(self.tiles_per_shard >= 1, "tiling.tiles_per_shard must be >= 1")
        _check(self.compressor in ("zstd", "none"), "tiling.compressor must be zstd or none")

    @property
    def coarse_mpp(self) -> float:
        """Resolution of triage tiles, µm/px."""
        return self.mpp * self.coarse_factor

    @property
    def coarse_px(self) -> int:
        """Side of a triage tile, px at :attr:`coarse_mpp`."""
        return self.tile_px // self.coarse_factor

    @property
    def tile_um(self) -> float:
        """Side of a tile, µm."""
        return self.mpp * self.tile_px


@dataclass(frozen=True)
class ScorerConfig:
    """The cheap CNN triage model.

    Attributes:
        model: timm CNN name (built with ``features_only``).
        weights: local safetensors/.pth file for the whole scorer, or None (untrained head).
        pooling: tile score from the patch map: ``max``, ``mean`` or ``topk``.
        topk: patches averaged by ``topk`` pooling.
        batch_size: coarse tiles per inference batch.
        threads: torch intra-op threads (None: torch's default).
        feature_levels: one or two increasing timm ``out_indices`` fused by the head; the last
            one also gives the tile embedding.
        head_channels: width of the head's 1x1 convs.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast of the scorer's forward
            (:data:`PRECISIONS`). Tile selection reads its scores, so a reduced precision can
            move a tile across a selection boundary; on CPU ``fp16`` runs in fp32.
    """

    model: str = "mobilenetv3_small_100"
    weights: str | None = None
    pooling: str = "max"
    topk: int = 8
    batch_size: int = 128
    threads: int | None = None
    feature_levels: tuple[int, ...] = (2, 4)
    head_channels: int = 64
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check(self.pooling in ("max", "mean", "topk"), "scorer.pooling must be max|mean|topk")
        _check(self.precision in PRECISIONS,
               f"scorer.precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.topk >= 1 and self.batch_size >= 1, "scorer.topk and batch_size must be >= 1")
        _check(self.threads is None or self.threads >= 1, "scorer.threads must be >= 1 or None")
        try:
            levels = tuple(int(i) for i in self.feature_levels)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"scorer.feature_levels must be a list of ints: {exc}") from exc
        _check(1 <= len(levels) <= 2, "scorer.feature_levels must hold one or two indices")
        _check(all(i >= 0 for i in levels), "scorer.feature_levels must be >= 0")
        _check(list(levels) == sorted(set(levels)), "scorer.feature_levels must be increasing")
        _check(self.head_channels >= 1, "scorer.head_channels must be >= 1")
        object.__setattr__(self, "feature_levels", levels)


@dataclass(frozen=True)
class TileSelectConfig:
    """Which tiles reach the ViT.

    Attributes:
        policy: ``nucleus`` (smallest set reaching score mass ``p``), ``topk``, ``fraction``
            (the top ``fraction`` of the slide's tissue tiles: a budget that scales with the
            slide), ``threshold`` or ``all``.
        p: nucleus mass in (0, 1].
        k: tiles kept by ``topk``.
        fraction: share of tissue tiles kept by ``fraction``, in (0, 1].
        threshold: tile score threshold for ``threshold``.
        min_tiles / max_tiles: per-slide budget (max None: no cap).
        redundancy_eps: drop a tile within this cosine distance of a kept 8-neighbour (None: off).
        neighbour_mix: share of a tile's selection score taken from the mean score of its
            tissue 8-neighbours, in [0, 1) (0: off). Lesions are contiguous, so a tile at a
            lesion's edge, which the CNN sees only in part, gains from its neighbours; an
            isolated false positive loses. Only the ranking changes: ``triage/tile_score``
            stays the CNN's.
    """

    policy: str = "nucleus"
    p: float = 0.5
    k: int = 64
    threshold: float = 0.5
    min_tiles: int = 8
    max_tiles: int | None = 2048
    redundancy_eps: float | None = None
    fraction: float = 0.1
    neighbour_mix: float = 0.0

    def __post_init__(self) -> None:
        # the name is resolved where policies are built (wsi_prune.selection), as timm resolves
        # model names in create_model: a config stays a leaf and new policies stay configurable
        _check(bool(self.policy), "tile_select.policy must be a policy name")
        _check(0.0 < self.p <= 1.0, "tile_select.p must be in (0, 1]")
        _check(self.min_tiles >= 0, "tile_select.min_tiles must be >= 0")
        _check(self.max_tiles is None or self.max_tiles >= max(1, self.min_tiles),
               "tile_select.max_tiles must be >= min_tiles")
        _check(self.k >= 1, "tile_select.k must be >= 1")
        _check(0.0 < self.fraction <= 1.0, "tile_select.fraction must be in (0, 1]")
        _check(0.0 <= self.threshold <= 1.0, "tile_select.threshold must be in [0, 1]")
        _check(self.redundancy_eps is None or 0.0 <= self.redundancy_eps <= 2.0,
               "tile_select.redundancy_eps is a cosine distance in [0, 2]")
        _check(0.0 <= self.neighbour_mix < 1.0, "tile_select.neighbour_mix must be in [0, 1)")


#: what ``token_select.keep_ratio`` counts over
TOKEN_SCOPES = ("tile", "slide")


@dataclass(frozen=True)
class TokenSelectConfig:
    """Which patches of a kept tile enter the ViT (CNN prior, before block 0).

    Attributes:
        policy: ``nucleus`` (by CNN patch-importance mass ``p``), ``ratio`` or ``all``.
        p: nucleus mass.
        keep_ratio: fraction of patches kept by ``ratio``.
        min_tokens: never keep fewer patch tokens than this per tile.
        scope: what ``ratio`` counts over: ``tile`` (``keep_ratio`` of each kept tile's
            patches) or ``slide`` (the same number of tokens in all, ``keep_ratio`` of the
            kept tiles' patches, given to the patches the CNN rates highest across the
            slide's kept tiles: a tile it sees lesion in gets more, a doubtful one
            ``min_tokens``). Only ``ratio`` reads it.
    """

    policy: str = "ratio"
    p: float = 0.9
    keep_ratio: float = 0.5
    min_tokens: int = 4
    scope: str = "tile"

    def __post_init__(self) -> None:
        _check(bool(self.policy), "token_select.policy must be a policy name")
        _check(0.0 < self.p <= 1.0 and 0.0 < self.keep_ratio <= 1.0, "token p/keep_ratio in (0,1]")
        _check(self.min_tokens >= 1, "token_select.min_tokens must be >= 1")
        _check(self.scope in TOKEN_SCOPES,
               f"token_select.scope={self.scope!r}: one of {', '.join(TOKEN_SCOPES)}")
        _check(self.scope == "tile" or self.policy in ("ratio", "all"),
               f"token_select.scope=slide counts a ratio; policy {self.policy!r} decides per tile")


@dataclass(frozen=True)
class ViTConfig:
    """The pruned ViT.

    Attributes:
        model: timm ViT name, or ``hf-hub:org/name``: with a local ``weights`` file a known
            foundation model (:data:`wsi_prune.models.hub.KNOWN_HUB_MODELS`: UNI, UNI2-h,
            Virchow, Virchow2, H-optimus-0/1, Prov-GigaPath) or one in the Hugging Face cache
            builds offline; without one it needs network and access.
        weights: local safetensors/.pth file, or None.
        pretrained: ask timm for pretrained weights (network) when no local file is given.
        model_kwargs: extra ``timm.create_model`` overrides (tiny test configs, a foundation
            model's arguments). Classes YAML cannot hold are named by strings resolved where
            the model is built (:mod:`wsi_prune.models.timm_args`): ``mlp_layer: swiglu_packed``
            (``mlp``, ``swiglu``), ``act_layer: silu`` (``gelu``, ``gelu_tanh``,
            ``quick_gelu``, ``relu``).
        mean / std: per-channel normalisation of the ViT's input (RGB in [0, 1]), e.g.
            H-optimus' ``[0.707223, 0.578729, 0.703617]`` / ``[0.211883, 0.230117, 0.177517]``;
            None: the model's own (timm's pretrained config, or the known model's).
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast of the ViT's forward.
            On CPU ``bf16`` is honoured and ``fp16`` runs in fp32 (CPU half matmuls are slow
            and partly unsupported).
        prune_blocks: block indices where tokens are pruned by CLS attention.
        prune_policy: ``nucleus`` (adaptive, attention mass ``prune_p``) or ``ratio``.
        prune_p: nucleus mass at each pruning block.
        keep_ratio: fraction kept at each pruning block by ``ratio``.
        fuse_pruned: fuse dropped tokens into one attention-weighted token (EViT).
        prune_min_tokens: never keep fewer patch tokens than this at a pruning block.
        pooling: ``model`` (as the timm model pools: its ``global_pool``) or ``cls+mean``
            (Virchow-style: CLS concatenated with the mean of patch tokens, (B, 2D)).
        batch_size: tiles per ViT batch.
    """

    model: str = "vit_small_patch16_224"
    weights: str | None = None
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    prune_blocks: tuple[int, ...] = (3, 6, 9)
    prune_policy: str = "ratio"
    prune_p: float = 0.9
    keep_ratio: float = 0.7
    fuse_pruned: bool = False
    prune_min_tokens: int = 1
    pooling: str = "model"
    batch_size: int = 32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check(self.prune_policy in ("nucleus", "ratio"), "vit.prune_policy must be nucleus|ratio")
        _check(self.precision in PRECISIONS,
               f"vit.precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                vals = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"vit.{name} must be 3 numbers (R, G, B): {exc}") from exc
            _check(len(vals) == 3, f"vit.{name} must be 3 numbers (R, G, B), got {len(vals)}")
            _check(name == "mean" or min(vals) > 0, "vit.std must be > 0")
            object.__setattr__(self, name, vals)
        _check(0.0 < self.keep_ratio <= 1.0 and 0.0 < self.prune_p <= 1.0, "vit keep in (0, 1]")
        object.__setattr__(self, "prune_blocks", tuple(int(b) for b in self.prune_blocks))
        _check(all(b >= 0 for b in self.prune_blocks), "vit.prune_blocks must be >= 0")
        _check(len(set(self.prune_blocks)) == len(self.prune_blocks),
               "vit.prune_blocks must not repeat a block")
        _check(self.prune_min_tokens >= 1, "vit.prune_min_tokens must be >= 1")
        _check(self.pooling in ("model", "cls+mean"), "vit.pooling must be model|cls+mean")
        _check(self.batch_size >= 1, "vit.batch_size must be >= 1")


@dataclass(frozen=True)
class MILConfig:
    """The slide head: gated attention-MIL (default) or top-k of per-tile lesion logits.

    Attributes:
        hidden: attention hidden size (``gated-abmil``).
        weights: local safetensors file or None (untrained).
        threshold: probability at or above which a slide is called positive.
        dropout: dropout after the first layer (used in training only).
        model: registered slide head (``wsi-prune models`` lists them; resolved where the head
            is built, :func:`wsi_prune.models.mil.build_mil`).
        allow_vit_mismatch: use trained weights whose sidecar says they were trained on another
            ViT's embeddings (another model, model arguments, pooling or weight file) instead of
            refusing them. Their probabilities then mean nothing; for experiments only.
        top_k: tiles whose lesion logits the ``tile-topk`` head averages into the slide score
            (:class:`wsi_prune.models.mil.TileTopK`; ``train-mil`` chooses it by
            cross-validation and the sidecar sets it).
        heat_vit_weight: the MIL attention's share of a kept tile's heat; the rest is the CNN
            tile score's (a weighted geometric mean of the attention and the CNN's odds,
            :func:`wsi_prune.outputs.heat.tile_heat`).
            1 (default): the attention alone. Changes the heat, the pictures, the regions and
            the FROC candidates, never the slide probability.
    """

    hidden: int = 128
    weights: str | None = None
    threshold: float = 0.5
    dropout: float = 0.0
    model: str = "gated-abmil"
    allow_vit_mismatch: bool = False
    top_k: int = 4
    heat_vit_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(bool(self.model), "mil.model must be a registered slide head name")
        _check(self.hidden >= 1, "mil.hidden must be >= 1")
        _check(self.top_k >= 1, "mil.top_k must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "mil.dropout must be in [0, 1)")
        _check(0.0 <= self.threshold <= 1.0, "mil.threshold must be in [0, 1]")
        _check(0.0 <= self.heat_vit_weight <= 1.0, "mil.heat_vit_weight must be in [0, 1]")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Its :meth:`hash` names the run's outputs."""

    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    tile_select: TileSelectConfig = field(default_factory=TileSelectConfig)
    token_select: TokenSelectConfig = field(default_factory=TokenSelectConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    mil: MILConfig = field(default_factory=MILConfig)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunConfig:
        """Build from a nested dict; unknown sections or keys raise :class:`ConfigError`."""
        data = dict(data or {})
        kwargs = {}
        for f in fields(cls):
            section = data.pop(f.name, None)
            if section is None:
                continue
            sub_cls = f.default_factory  # type: ignore[misc]
            kwargs[f.name] = _build(sub_cls, section, f.name)
        if data:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(data))}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", path) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", path) from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError("a config file must hold a mapping of sections", path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(exc.reason, path) from exc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def replace(self, **sections: Any) -> RunConfig:
        """Copy with sections replaced; a section may be given as a dict of field overrides."""
        out = {}
        for name, value in sections.items():
            current = getattr(self, name)
            out[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **out)

    def is_dense(self) -> bool:
        """Nothing is pruned: every tissue tile and every token reaches the ViT (:meth:`dense`)."""
        ts = self.tile_select
        return (ts.policy == "all" and ts.max_tiles is None and ts.redundancy_eps is None
                and self.token_select.policy == "all" and not self.vit.prune_blocks)

    def dense(self) -> RunConfig:
        """The same models with nothing pruned: every tissue tile and every token reaches the
        ViT (the reference a pruned run is compared with, and what MIL heads train on). Its
        heat is the MIL attention alone (``mil.heat_vit_weight`` 1): the ViT's own heat is the
        reference a blended pruned heat is measured against."""
        return self.replace(
            tile_select={"policy": "all", "min_tiles": 0, "max_tiles": None,
                         "redundancy_eps": None},
            token_select={"policy": "all", "scope": "tile"},
            vit={"prune_blocks": ()},
            mil={"heat_vit_weight": 1.0},
        )

    # -- identity ------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without the keys added after the first release that are still at
        their default (:data:`ADDED_KEYS`): adding a key to the config must not change the
        hash, and so the outputs' identity, of every run made before it existed."""
        d = self.to_dict()
        for section, key in ADDED_KEYS:
            default = getattr(type(getattr(self, section))(), key) if section in d else None
            if section in d and key in d[section] and d[section][key] == _jsonable(default):
                del d[section][key]
        return d

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the whole config (:meth:`identity`)."""
        return _sha256(self.identity())

    def weight_paths(self) -> dict[str, str | None]:
        """The weight file each model is loaded from (None: no file named)."""
        return {"scorer": self.scorer.weights, "vit": self.vit.weights, "mil": self.mil.weights}

    def weight_digests(self) -> dict[str, str | None]:
        """SHA-256 of each weight file the config names; None where no file is named or the
        named file does not exist (loading it fails later, with its own reason)."""
        return {name: file_sha256(p) if p and os.path.isfile(p) else None
                for name, p in self.weight_paths().items()}

    def run_hash(self, digests: dict[str, str | None] | None = None) -> str:
        """The identity of a run's outputs (the resume key): :meth:`hash` plus the content of
        the weight files. The config names weights by path only, and retraining a model
        rewrites the same path: outputs made with the old weights must not look current.

        Args:
            digests: :meth:`weight_digests`, when already computed (hashing a large ViT
                checkpoint takes seconds, so a batch does it once).
        """
        return _sha256({"config": self.hash(),
                        "weights": self.weight_digests() if digests is None else digests})

    def section_hash(self, *names: str) -> str:
        """SHA-256 of only the named sections (e.g. ``"tissue", "tiling"`` for the tile store)."""
        d = self.identity()
        return _sha256({n: d[n] for n in names})


#: ``(section, key)`` of config keys added after the first release: at their default they are
#: left out of :meth:`RunConfig.identity`, so older runs keep their hash (and resume).
ADDED_KEYS: tuple[tuple[str, str], ...] = (
    ("mil", "model"),
    ("mil", "allow_vit_mismatch"),
    ("tile_select", "fraction"),
    ("tiling", "on_corrupt_tile"),
    ("tiling", "max_unreadable_fraction"),
    ("tissue", "ink_min_um2"),
    ("tissue", "max_mask_mpx"),
    ("scorer", "precision"),
    ("vit", "mean"),
    ("vit", "std"),
    ("vit", "precision"),
    ("mil", "top_k"),
    ("token_select", "scope"),
    ("tile_select", "neighbour_mix"),
    ("mil", "heat_vit_weight"),
)


def load_config(path: str | os.PathLike[str] | None = None) -> RunConfig:
    """The run config in a YAML file, or the defaults when ``path`` is None.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown sections or keys, bad values; the
            message names the file.
    """
    return RunConfig() if path is None else RunConfig.from_yaml(path)


def _build(cls: type, section: Any, name: str) -> Any:
    if not isinstance(section, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in section {name!r}: {', '.join(sorted(unknown))}")
    try:
        return cls(**section)
    except TypeError as exc:
        raise ConfigError(f"section {name!r}: {exc}") from exc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _sha256(obj: Any) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
