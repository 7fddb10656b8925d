"""Analytic multiply-accumulate (MAC) counts for token-pruned ViTs and a hook-based CNN counter.

Papers write "GFLOPs" for what are really GMACs (one multiply plus one add counted once, as
fvcore does); we count MACs and say so: every function here returns MACs for ONE image.

Convention (it reproduces every published number in ``tests/test_flops.py`` within 3 %):

* Tokens are counted *including* the prefix tokens (CLS, registers). ``tokens_per_block[i]``
  is the number of tokens entering block ``i``.
* A block with ``n_attn`` tokens seen by attention and ``n_mlp`` tokens seen by the MLP costs
  ``qkv 3·n_attn·D² + scores n_attn²·D + attn·V n_attn²·D + proj n_attn·D²`` plus the MLP:
  plain GELU MLP (fc1 D→H, fc2 H→D) ``2·n_mlp·D·H``; gated MLP ``3·n_mlp·D·H`` where ``H`` is
  the gated width (the input width of fc2). timm's ``SwiGLUPacked`` (= ``GluMlp``) has one fc1
  D→2H whose output is split into gate and value, then fc2 H→D; timm's ``SwiGLU`` has two
  D→H layers (``fc1_g``, ``fc1_x``) and fc2 H→D. Both cost ``3·n·D·H``. So ``mlp_hidden_dim``
  of a gated spec is H, e.g. 4096 for H-optimus-0 whose packed fc1 is 1536→8192.
* The patch embedding (a conv with kernel = stride = p: ``n_patches·3·p²·D``) is included.
* Biases, LayerNorms, softmax, GELU, residual adds, position embeddings, the final norm and the
  classifier head are left out: together under 0.3 % of DeiT-S (head 384·1000 = 0.4 M MACs;
  LayerNorms ≈ 10 M element ops against 4.6 G MACs).
* Token pruning methods, as their reference code does it:
  - DynamicViT (Rao et al. 2021): pruning before blocks 3, 6, 9 (0-based); after stage s the
    patch tokens are ``round(ρ^s · n_patches)`` (their code: ``int(196 · ρ^s)``, the same for
    ρ = 0.7), the CLS token is kept. Its PredictorLG (LN, D→D, D→D/2, D/2→D/4, D/4→2 on the
    patch tokens entering a pruning block) is counted by :func:`dynamicvit_predictor_macs`
    because their fvcore count covers the whole model. With the predictor we get DeiT-S 2.98
    and DeiT-B 11.48 GMACs; the repository README prints 2.9 and 11.4 (values truncated, not
    rounded: DeiT-256 gives 1.37 against a printed 1.3). Without the predictor: 2.88 / 11.06,
    closer to the NeurIPS paper's 11.2 for DeiT-B. We test against 11.4 with the predictor.
  - EViT (Liang et al. 2022): pruning inside blocks 4, 7, 10 (1-based; index 3, 6, 9) after
    attention, so that block's attention sees the old count and its MLP the new one; the
    inattentive tokens are fused into ONE extra token: ``n_patch ← ceil(keep · n_patch) + 1``
    where ``n_patch`` counts the previous fused token too. The CLS attention used to rank tokens
    is a by-product of the attention already counted.
  - ToMe (Bolya et al. 2023): ``r`` tokens merged in every block, between attention and MLP
    (block i's attention sees ``N − i·r``, its MLP ``N − (i+1)·r``), r capped at half of the
    non-CLS tokens as ToMe does. Counting the whole block at ``N − i·r`` overshoots the
    published DeiT-S numbers by 4–9 %; the between-attention-and-MLP convention is within 1 %.
    The bipartite matching (≈ (N/2)²·head_dim, 0.6 M MACs per block for DeiT-S) is left out.
* :func:`cls_attention_macs` is the cost of recomputing the CLS row of attention
  (``heads · N · head_dim``) when a wrapper cannot read it out of a fused attention kernel.
* Runs of :class:`wsi_prune.models.pruned_vit.PrunedViT`: :func:`vit_batch_macs` turns its
  per-image token counts into MACs for a batch and the dense equivalent; :func:`slide_macs`
  adds the scorer and the tiles triage dropped (a :class:`MacTally`, "GMACs spent vs dense").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from wsi_prune.errors import ConfigError

_logger = logging.getLogger(__name__)

# Tokens entering a block: one int (attention and MLP see the same tokens), or a pair
# (n_attn, n_mlp) when tokens are dropped between attention and MLP inside the block.
BlockTokens = int | tuple[int, int]


@dataclass(frozen=True)
class ViTSpec:
    """Shape of a plain ViT (timm ``VisionTransformer``) needed to count its MACs.

    Attributes:
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads; ``embed_dim`` must be divisible by it.
        mlp_ratio: MLP hidden width / D; for a gated MLP the gated width (fc2 input) / D.
        patch_size: patch side p, px.
        img_size: square input side, px; ``img_size // patch_size`` patches per side.
        num_prefix_tokens: CLS + register tokens prepended to the patch tokens.
        swiglu: the MLP is gated (SwiGLU, ``SwiGLUPacked``/``GluMlp``, GeGLU): 3 matmuls.
        mlp_hidden_dim: exact MLP hidden width H, overriding ``round(D · mlp_ratio)``.
        in_chans: input channels of the patch embedding.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224
    num_prefix_tokens: int = 1
    swiglu: bool = False
    mlp_hidden_dim: int | None = None
    in_chans: int = 3

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ViTSpec.{name}={getattr(self, name)} must be >= 1")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"ViTSpec.embed_dim={self.embed_dim} not divisible by num_heads={self.num_heads}"
            )
        if self.img_size < self.patch_size:
            raise ConfigError(f"ViTSpec.img_size={self.img_size} < patch_size={self.patch_size}")
        if self.num_prefix_tokens < 0:
            raise ConfigError(f"ViTSpec.num_prefix_tokens={self.num_prefix_tokens} must be >= 0")
        if self.mlp_ratio <= 0 or (self.mlp_hidden_dim is not None and self.mlp_hidden_dim < 1):
            raise ConfigError("ViTSpec MLP width must be positive")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, D / heads."""
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width H (the gated width for a gated MLP)."""
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def n_patches(self) -> int:
        """Patch tokens at ``img_size``: ``(img_size // patch_size)²``."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Tokens entering block 0: patches plus prefix tokens."""
        return self.n_patches + self.num_prefix_tokens

    @classmethod
    def from_timm(cls, model: nn.Module) -> ViTSpec:
        """Read the spec of a timm ``VisionTransformer`` (built on any device, ``meta`` too).

        Args:
            model: a timm ``VisionTransformer`` (``blocks``, ``patch_embed``, ``embed_dim``,
                ``num_prefix_tokens``) with identical blocks and a square input.

        Raises:
            ConfigError: the model is not shaped like a timm ViT, its input is not square or
                its attention width differs from ``embed_dim``.
        """
        try:
            blocks = model.blocks
            block = blocks[0]
            embed_dim = int(model.embed_dim)
            num_heads = int(block.attn.num_heads)
            qkv_out = int(block.attn.qkv.out_features)
            mlp = block.mlp
            patch = tuple(model.patch_embed.patch_size)
            grid = model.patch_embed.grid_size
            num_prefix = int(model.num_prefix_tokens)
        except (AttributeError, IndexError, TypeError) as exc:
            raise ConfigError(
                f"{type(model).__name__} is not a timm VisionTransformer: {exc}"
            ) from exc
        if qkv_out != 3 * embed_dim:
            raise ConfigError(f"attention width {qkv_out // 3} != embed_dim {embed_dim}")
        if grid is None or grid[0] != grid[1] or patch[0] != patch[1]:
            raise ConfigError(f"only square inputs and patches: grid {grid}, patch {patch}")
        mlp_kind = type(mlp).__name__
        # SwiGLUPacked is functools.partial(GluMlp, ...): its class name is GluMlp.
        swiglu = mlp_kind in ("SwiGLU", "GluMlp")
        if mlp_kind not in ("Mlp", "SwiGLU", "GluMlp"):
            _logger.warning("unknown MLP class %s counted as a plain 2-matmul MLP", mlp_kind)
        # fc2's input is the (gated) hidden width H for Mlp, GluMlp and SwiGLU alike.
        hidden = int(mlp.fc2.in_features)
        return cls(
            embed_dim=embed_dim,
            depth=len(blocks),
            num_heads=num_heads,
            mlp_ratio=hidden / embed_dim,
            patch_size=int(patch[0]),
            img_size=int(grid[0]) * int(patch[0]),
            num_prefix_tokens=num_prefix,
            swiglu=swiglu,
            mlp_hidden_dim=hidden,
            in_chans=int(model.patch_embed.proj.in_channels),
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ViTSpec:
        """A named preset from :data:`PRESETS`, optionally with fields replaced.

        Raises:
            ConfigError: unknown name (the known ones are listed).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown ViT preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ViTSpec] = {
    "deit_tiny": ViTSpec(embed_dim=192, depth=12, num_heads=3),
    "deit_small": ViTSpec(embed_dim=384, depth=12, num_heads=6),
    "deit_base": ViTSpec(embed_dim=768, depth=12, num_heads=12),
    # UNI (Chen et al. 2024): timm vit_large_patch16_224, CLS only.
    "vit_large_patch16": ViTSpec(embed_dim=1024, depth=24, num_heads=16),
    # UNI2-h: timm vit_giant_patch14_224 with its model-card kwargs (depth 24, 24 heads,
    # mlp_ratio 2.66667*2 with SwiGLUPacked, 8 registers, patch 14): packed fc1 1536→8192.
    "uni2_h": ViTSpec(
        embed_dim=1536,
        depth=24,
        num_heads=24,
        mlp_ratio=4096 / 1536,
        patch_size=14,
        num_prefix_tokens=9,
        swiglu=True,
        mlp_hidden_dim=4096,
    ),
    # H-optimus-0: timm vit_giant_patch14_reg4_dinov2 at 224 px (depth 40, 4 registers).
    "h_optimus_0": ViTSpec(
        embed_dim=1536,
        depth=40,
        num_heads=24,
        mlp_ratio=4096 / 1536,
        patch_size=14,
        num_prefix_tokens=5,
        swiglu=True,
        mlp_hidden_dim=4096,
    ),
}


class BlockMacs(NamedTuple):
    """MACs of one transformer block, by matmul."""

    qkv: int
    attn_scores: int
    attn_v: int
    proj: int
    mlp: int

    @property
    def total(self) -> int:
        return self.qkv + self.attn_scores + self.attn_v + self.proj + self.mlp


def block_macs(spec: ViTSpec, n_attn: int, n_mlp: int | None = None) -> BlockMacs:
    """MACs of one block whose attention sees ``n_attn`` tokens and MLP ``n_mlp`` tokens.

    Args:
        spec: the model.
        n_attn: tokens entering the block (prefix included).
        n_mlp: tokens reaching the MLP; defaults to ``n_attn``. Smaller when tokens are pruned
            or merged after attention inside the block (EViT, ToMe).

    Raises:
        ConfigError: negative counts or ``n_mlp > n_attn``.
    """
    n_mlp = n_attn if n_mlp is None else n_mlp
    if n_attn < 0 or n_mlp < 0 or n_mlp > n_attn:
        raise ConfigError(f"bad block token counts n_attn={n_attn}, n_mlp={n_mlp}")
    d, h = spec.embed_dim, spec.hidden_dim
    mlp_matmuls = 3 if spec.swiglu else 2
    return BlockMacs(
        qkv=3 * n_attn * d * d,
        attn_scores=n_attn * n_attn * d,
        attn_v=n_attn * n_attn * d,
        proj=n_attn * d * d,
        mlp=mlp_matmuls * n_mlp * d * h,
    )


def patch_embed_macs(spec: ViTSpec) -> int:
    """MACs of the patch-embedding conv: ``n_patches · in_chans · p² · D``."""
    return spec.n_patches * spec.in_chans * spec.patch_size**2 * spec.embed_dim


def cls_attention_macs(spec: ViTSpec, n_tokens: int) -> int:
    """MACs of the CLS row of attention over ``n_tokens`` keys: ``heads · N · head_dim``."""
    return spec.num_heads * n_tokens * spec.head_dim


def _pairs(spec: ViTSpec, tokens_per_block: Sequence[BlockTokens] | None) -> list[tuple[int, int]]:
    if tokens_per_block is None:
        return [(spec.n_tokens, spec.n_tokens)] * spec.depth
    if len(tokens_per_block) != spec.depth:
        raise ConfigError(
            f"token schedule has {len(tokens_per_block)} entries for {spec.depth} blocks"
        )
    pairs = []
    for t in tokens_per_block:
        n_attn, n_mlp = (t, t) if isinstance(t, int) else t
        pairs.append((int(n_attn), int(n_mlp)))
    for (_, prev_mlp), (n_attn, _) in zip(pairs, pairs[1:], strict=False):
        if n_attn > prev_mlp:
            raise ConfigError(f"token schedule grows between blocks: {pairs}")
    return pairs


def vit_macs(
    spec: ViTSpec,
    tokens_per_block: Sequence[BlockTokens] | None = None,
    *,
    include_patch_embed: bool = True,
    cls_attn_blocks: Sequence[int] = (),
) -> int:
    """Total MACs of one image through the ViT under a token schedule.

    Args:
        spec: the model.
        tokens_per_block: ``depth`` entries, tokens entering each block (prefix included),
            each an int or ``(n_attn, n_mlp)``; ``None`` is the dense model.
        include_patch_embed: add :func:`patch_embed_macs` (the published tables do).
        cls_attn_blocks: 0-based blocks where the CLS attention row is recomputed separately
            (:func:`cls_attention_macs` over that block's ``n_attn`` tokens).

    Returns:
        MACs (divide by 1e9 for the "GFLOPs" of papers).

    Raises:
        ConfigError: schedule of the wrong length, growing, or with ``n_mlp > n_attn``.
    """
    pairs = _pairs(spec, tokens_per_block)
    total = sum(block_macs(spec, a, m).total for a, m in pairs)
    for b in cls_attn_blocks:
        if not 0 <= b < spec.depth:
            raise ConfigError(f"cls_attn_blocks entry {b} outside 0..{spec.depth - 1}")
        total += cls_attention_macs(spec, pairs[b][0])
    if include_patch_embed:
        total += patch_embed_macs(spec)
    return total


@dataclass(frozen=True)
class MacTally:
    """MACs spent by a run and what the dense ViT would have spent, summed over tiles.

    Tallies add with ``+``, so a pipeline sums one per ViT batch plus one for the scorer.

    Attributes:
        vit: MACs of the pruned ViT (patch embedding, blocks, CLS rows).
        scorer: MACs of the CNN scorer.
        dense: MACs of the dense ViT over the same tiles (every scored tile, unpruned).
    """

    vit: int = 0
    scorer: int = 0
    dense: int = 0

    def __add__(self, other: MacTally) -> MacTally:
        if not isinstance(other, MacTally):
            return NotImplemented
        return MacTally(self.vit + other.vit, self.scorer + other.scorer, self.dense + other.dense)

    @property
    def spent(self) -> int:
        """MACs actually spent: ViT plus scorer."""
        return self.vit + self.scorer

    @property
    def gmacs(self) -> float:
        """:attr:`spent` in GMACs (the "GFLOPs" of papers)."""
        return self.spent / 1e9

    @property
    def gmacs_dense(self) -> float:
        """:attr:`dense` in GMACs."""
        return self.dense / 1e9


def _per_image_pairs(spec: ViTSpec, tokens_per_image: Any) -> torch.Tensor:
    """(B, depth, 2) int64 from (B, depth, 2) or (B, depth) counts, validated."""
    t = torch.as_tensor(tokens_per_image).detach().to("cpu", torch.int64)
    if t.ndim == 2:
        t = torch.stack([t, t], -1)
    if t.ndim != 3 or t.shape[1:] != (spec.depth, 2):
        raise ConfigError(
            f"tokens_per_image must be (B, {spec.depth}, 2) or (B, {spec.depth}), "
            f"got {tuple(t.shape)}"
        )
    n_attn, n_mlp = t[..., 0], t[..., 1]
    if bool((t < 0).any()) or bool((n_mlp > n_attn).any()):
        raise ConfigError("tokens_per_image: negative counts or n_mlp > n_attn")
    if bool((n_attn[:, 1:] > n_mlp[:, :-1]).any()):
        raise ConfigError("tokens_per_image: a token schedule grows between blocks")
    return t


def vit_batch_macs(
    spec: ViTSpec,
    tokens_per_image: Any,
    *,
    cls_attn_blocks: Sequence[int] = (),
    include_patch_embed: bool = True,
    patches_embedded: Any = None,
) -> MacTally:
    """MACs of a batch through a token-pruned ViT, and of the same batch through the dense one.

    The same convention as :func:`vit_macs`, applied to each image's own schedule (padding is
    not counted: it is what the tokens cost, whatever the batching), summed over the batch.

    Args:
        spec: the model (:meth:`ViTSpec.from_timm`).
        tokens_per_image: (B, depth, 2) ints (tensor or array), per image and block the tokens
            seen by attention and by the MLP, prefix and fused tokens included, e.g.
            ``PrunedOutput.tokens_per_image``; or (B, depth) when both are equal.
        cls_attn_blocks: blocks where a CLS attention row was computed separately, e.g.
            ``PrunedOutput.cls_attn_blocks`` (:func:`cls_attention_macs` each).
        include_patch_embed: add the patch embedding's MACs per image.
        patches_embedded: (B,) patches the embedding projected per image
            (``PrunedOutput.patches_embedded``: the kept ones where the wrapper embeds only
            those); None: every patch (:func:`patch_embed_macs`).

    Returns:
        :class:`MacTally` with ``vit`` (pruned, summed over B) and ``dense`` (B dense images).

    Raises:
        ConfigError: wrong shape, negative or growing counts, a CLS block outside the model.
    """
    t = _per_image_pairs(spec, tokens_per_image)
    b = int(t.shape[0])
    d, h = spec.embed_dim, spec.hidden_dim
    n_attn, n_mlp = t[..., 0], t[..., 1]
    mlp_matmuls = 3 if spec.swiglu else 2
    total = int((4 * n_attn * d * d + 2 * n_attn * n_attn * d + mlp_matmuls * n_mlp * d * h).sum())
    for blk in cls_attn_blocks:
        if not 0 <= blk < spec.depth:
            raise ConfigError(f"cls_attn_blocks entry {blk} outside 0..{spec.depth - 1}")
        total += spec.num_heads * spec.head_dim * int(n_attn[:, blk].sum())
    if include_patch_embed:
        n_embedded = (b * spec.n_patches if patches_embedded is None
                      else int(torch.as_tensor(patches_embedded).sum()))
        total += n_embedded * (patch_embed_macs(spec) // spec.n_patches)
    dense = b * vit_macs(spec, include_patch_embed=include_patch_embed)
    return MacTally(vit=total, dense=dense)


def slide_macs(
    spec: ViTSpec,
    vit_batches: Sequence[Any],
    *,
    n_tiles: int,
    scorer_macs_per_tile: int = 0,
    cls_attn_blocks: Sequence[int] = (),
) -> MacTally:
    """MACs spent on one slide (scorer on every tile, pruned ViT on the kept ones) vs dense.

    Args:
        spec: the ViT.
        vit_batches: the ``tokens_per_image`` of every ViT batch of the slide.
        n_tiles: tissue tiles scored by the CNN (the dense baseline runs the ViT on all).
        scorer_macs_per_tile: :func:`cnn_macs` of the scorer on one coarse tile.
        cls_attn_blocks: as in :func:`vit_batch_macs`.

    Returns:
        :class:`MacTally`: ``vit`` + ``scorer`` spent; ``dense`` = ``n_tiles`` dense ViT passes.

    Raises:
        ConfigError: more ViT images than ``n_tiles``, or bad counts.
    """
    vit = sum(
        (vit_batch_macs(spec, t, cls_attn_blocks=cls_attn_blocks) for t in vit_batches),
        MacTally(),
    )
    n_vit = sum(int(torch.as_tensor(t).shape[0]) for t in vit_batches)
    if n_vit > n_tiles or scorer_macs_per_tile < 0:
        raise ConfigError(f"{n_vit} ViT tiles of {n_tiles} scored, scorer {scorer_macs_per_tile}")
    return MacTally(
        vit=vit.vit, scorer=n_tiles * scorer_macs_per_tile, dense=n_tiles * vit_macs(spec)
    )


def cnn_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass, counted by forward hooks on every Conv2d and Linear.

    Conv2d: ``out_h · out_w · out_c · (in_c / groups) · k_h · k_w`` per image; Linear:
    ``in_features · out_features`` per output row. Biases, norms, activations and pooling are
    left out, as in timm's published GMACs. Works on the ``meta`` device too.

    Args:
        model: any module; run in eval mode under ``torch.no_grad`` (its mode is restored).
        input_shape: ``(C, H, W)`` or ``(1, C, H, W)``; MACs are per image.

    Raises:
        ConfigError: the input shape is not one image.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1:
        raise ConfigError(f"cnn_macs input_shape {input_shape} must be (C, H, W) or (1, C, H, W)")
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k_h, k_w = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * k_h * k_w

    def linear_hook(mod: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
