"""Token-pruned inference over any timm ``VisionTransformer``, without forking timm.

:class:`PrunedViT` runs the wrapped model's own modules (patch embedding, position embedding
with CLS/register tokens, each block's norms, attention, LayerScale and MLP, final norms) and adds
two things:

* a CNN prior before block 0: only the patch tokens of a ``(B, P)`` keep mask
  (:func:`wsi_prune.selection.tokens.select_patches`) enter the blocks, after the position
  embeddings were added; prefix tokens (CLS, registers) always do. This replaces timm's
  ``patch_drop``.
* pruning inside the network, EViT-style: in each block of ``ViTConfig.prune_blocks`` the
  attention runs on all present tokens, and its CLS row (one q·Kᵀ row per head, from the same
  q/k, no second projection) ranks the patch tokens;
  :func:`wsi_prune.selection.tokens.keep_by_attention` keeps a nucleus (adaptive count per
  image) or a fixed ratio, optionally fusing the dropped ones into one attention-weighted
  token. The block's MLP and every later block then run on the kept tokens only, which is where
  the time goes.

Only the kept patches are projected by the patch embedding where its layout allows
(:mod:`wsi_prune.models.kept_embed`). Attention is always ``F.scaled_dot_product_attention``:
timm's own ``Attention.forward`` (fused) in ordinary blocks; at pruning blocks and at the last
block the module's own qkv, q/k norms, scale norm, gate and proj around one SDPA call plus the
CLS row.

The CLS row is ``softmax(q_cls · Kᵀ · scale)`` per head over *all* present keys, prefix tokens
(CLS, registers) and the fused token included, averaged over heads; only its patch entries are
then used, renormalised over the present patches (ranking, nucleus mass, heatmap share). Masking
the prefix keys out instead would change no head's ranking but reweight the heads: a head
whose CLS query mostly attends to the prefix (registers act as attention sinks) contributes
little patch mass here, while masking would blow its small, noisy remainder up to a full unit.
It is also the stock attention's row, what EViT ranks by and what weights the fused token.

Heatmap importance (``PrunedOutput.token_importance``) comes from these rows too: each patch
keeps its share of the last row computed while it was present. The row is therefore also
computed at the last block, whether or not it prunes, so that every patch that reaches the end
gets its share from the deepest attention, and a patch pruned earlier keeps the share it had at
the block that dropped it.

Images in one batch keep different numbers of tokens. Two ways to batch them (``batching``):

* ``"pad"`` (default): pad to the batch's largest count and mask padded keys out of attention;
  the MLP, which is per token, runs on the packed valid tokens only (no padding waste there).
* ``"bucket"``: regroup the images by exact token count after each pruning stage, unpadded.

Both give each image the same output whatever its batch (up to float rounding). Padding is the
default: ``benchmarks/bench_pruning.py`` measured it 1.1-1.5x faster than bucketing on CPU with
nucleus selection (32 tiles, 27 different token counts: buckets of one or two images make small,
inefficient matmuls, while padding only costs in attention since the MLP runs packed); see the
pruning section of ``docs/benchmarks.md``.

Token layout inside the wrapper, per image: ``[prefix tokens][fused token?][patch slots]``, with
``pos`` (B, T) long giving each slot's original patch index (row-major in the patch grid), or one
of the negative codes below.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from wsi_prune.config import ViTConfig
from wsi_prune.errors import ConfigError
from wsi_prune.models.accel import autocast
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.hub import create_architecture, resolve_model_source, vit_mismatch_hint
from wsi_prune.models.kept_embed import embed_kept_patches
from wsi_prune.selection.tokens import keep_by_attention

_logger = logging.getLogger(__name__)

#: block classes whose forward is exactly ``x + dp1(ls1(attn(norm1(x))))``,
#: ``x + dp2(ls2(mlp(norm2(x))))``; ResPostBlock has the same attribute names but norms after,
#: so classes are matched exactly, never by ``isinstance``.
SUPPORTED_BLOCKS: tuple[type[nn.Module], ...] = (Block,)
SUPPORTED_ATTENTION: tuple[type[nn.Module], ...] = (Attention,)
SUPPORTED_POOLING = ("token", "avg", "max", "avgmax")
BATCHING = ("pad", "bucket")
_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_ATTRS = ("qkv", "q_norm", "k_norm", "norm", "proj", "num_heads", "head_dim", "scale")

PAD, PREFIX, FUSED = -1, -2, -3  # codes in ``pos`` for slots that are not patch tokens


@dataclass
class PrunedOutput:
    """What :meth:`PrunedViT.forward` returns for a batch of B tiles.

    Attributes:
        embedding: (B, D) float, pooled as the model pools; (B, 2D) for ``cls+mean`` pooling.
        kept: one (B, P) bool mask per stage, in the original patch grid (row-major): stage 0 is
            the CNN prior, then one per pruning block (tokens reaching that block's MLP). Each
            stage is a subset of the one before.
        token_importance: (B, P) float32 per-patch importance for heatmaps: each patch's share
            of CLS attention (among patch tokens) at the last stage it was present in (pruning
            blocks and the last block); 0 for patches that never entered or without a CLS token.
        tokens_per_image: (B, depth, 2) int64, per image and block the tokens seen by the
            attention (``[..., 0]``) and by the MLP (``[..., 1]``), prefix and fused tokens
            included, padding excluded: the input of
            :func:`wsi_prune.selection.macs.vit_batch_macs`.
        patches_embedded: (B,) int64 patches the patch embedding projected per image: the kept
            ones (:func:`~wsi_prune.models.kept_embed.embed_kept_patches`), or all of them.
        cls_attn_blocks: blocks where the CLS attention row was computed (sorted).
        grid_size: (rows, cols) of the patch grid, P = rows * cols.
    """

    embedding: torch.Tensor
    kept: list[torch.Tensor]
    token_importance: torch.Tensor
    tokens_per_image: torch.Tensor
    cls_attn_blocks: tuple[int, ...]
    grid_size: tuple[int, int]
    patches_embedded: torch.Tensor

    @property
    def tokens_per_block(self) -> list[tuple[int, int]]:
        """Per block ``(n_attn, n_mlp)``, the batch's largest count (the padded width)."""
        mx = self.tokens_per_image.amax(0) if len(self.tokens_per_image) else None
        if mx is None:
            return []
        return [(int(a), int(m)) for a, m in mx.tolist()]

    @property
    def token_fraction(self) -> float:
        """Patch tokens kept by the last stage over all patch tokens of the batch, in [0, 1]."""
        last = self.kept[-1]
        return float(last.sum()) / max(1, last.numel())


@dataclass
class _Group:
    """Images of the batch run together: ``idx`` (g,) rows of the batch, x (g, T, D), pos (g, T)."""

    idx: torch.Tensor
    x: torch.Tensor
    pos: torch.Tensor


@dataclass
class _Record:
    """Per-image results written by batch row, whatever the grouping."""

    kept: list[torch.Tensor]
    importance: torch.Tensor
    tokens: torch.Tensor
    embedding: torch.Tensor | None = None


def build_vit(
    config: ViTConfig,
    load_weights: Callable[[nn.Module, str], None] | None = None,
) -> VisionTransformer:
    """Create the timm ViT named by ``config`` (no classifier head), in eval mode.

    Where it comes from is decided by :func:`~wsi_prune.models.hub.resolve_model_source`,
    without the network:

    * a local ``config.weights`` file always wins, ``pretrained`` or not: the architecture is
      built with ``pretrained=False`` and the file loaded. For an ``hf-hub:`` name the
      architecture comes from the repo's ``config.json`` in the local Hugging Face cache or from
      :data:`~wsi_prune.models.hub.KNOWN_HUB_MODELS`, never from the Hub;
      ``config.model_kwargs`` override its arguments (:mod:`~wsi_prune.models.timm_args`).
    * without a local file, ``pretrained: true`` downloads through timm (Hub or its cache; only
      the cache when ``HF_HUB_OFFLINE`` is set), and an ``hf-hub:`` name needs it.

    ``config.mean`` / ``config.std``, when set, replace the model's normalisation.

    Args:
        config: ``model``, ``pretrained``, ``model_kwargs``, ``weights``, ``mean``, ``std``.
        load_weights: called as ``load_weights(model, config.weights)`` to load the local file
            (default :func:`~wsi_prune.models.checkpoints.load_into`, which owns checkpoint
            safety, with :func:`~wsi_prune.models.hub.vit_mismatch_hint`).

    Raises:
        ConfigError: unknown model name, not a ``VisionTransformer``, a hub name with a local
            file whose architecture is unknown offline.
        CheckpointRefused: the weights file is missing or does not fit (expected vs found
            shapes, a few keys, the likely ``model_kwargs``); the Hub is needed but switched
            off, unreachable or refusing access (the message names the model and says to pass
            a local safetensors file); a hub name without ``pretrained`` or a file.
    """
    kwargs = {**config.model_kwargs, "num_classes": 0}
    norm = {k: v for k, v in (("mean", config.mean), ("std", config.std)) if v is not None}
    if norm:
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **norm}
    try:
        source = resolve_model_source(config.model, config.weights, config.pretrained)
        model = create_architecture(source, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"vit.model: {exc.reason}", exc.path) from exc
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"vit.model {config.model!r} is a {type(model).__name__}, not a timm "
                          "VisionTransformer")
    if source.weights_path is not None:
        if load_weights is None:
            load_into(model, source.weights_path, hint=vit_mismatch_hint)
        else:
            load_weights(model, source.weights_path)
    return model.eval()


def check_supported(model: nn.Module, pooling: str = "model") -> None:
    """Raise :class:`ConfigError` unless :class:`PrunedViT` reproduces ``model`` exactly.

    Supported: a timm ``VisionTransformer`` whose blocks are exactly ``Block`` with exactly
    ``Attention`` (pre-norm, attention then MLP; LayerScale, q/k norm, SwiGLU, registers fine),
    pooled by ``token``, ``avg``, ``max`` or ``avgmax``; with ``pooling="cls+mean"`` (the
    wrapper pools itself, as Virchow's card does) also ``global_pool=""``, which in timm
    returns every token rather than an embedding.
    """
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"PrunedViT wraps a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in SUPPORTED_BLOCKS or any(not hasattr(blk, a) for a in _BLOCK_ATTRS):
            raise ConfigError(
                f"block {i} is a {type(blk).__name__}; PrunedViT supports "
                f"{', '.join(c.__name__ for c in SUPPORTED_BLOCKS)} (pre-norm, sequential "
                "attention then MLP)"
            )
        att = blk.attn
        if type(att) not in SUPPORTED_ATTENTION or any(not hasattr(att, a) for a in _ATTN_ATTRS):
            raise ConfigError(f"block {i} attention is a {type(att).__name__}; PrunedViT "
                              "supports timm Attention")
    if getattr(model, "attn_pool", None) is not None or model.global_pool == "map":
        raise ConfigError("PrunedViT: attention-pool ('map') heads are not supported")
    if model.global_pool == "" and pooling != "cls+mean":
        raise ConfigError("PrunedViT: global_pool='' gives every token, not an embedding; set "
                          "vit.pooling: cls+mean (CLS concatenated with the mean of the patch "
                          "tokens, as Virchow's card)")
    if model.global_pool not in SUPPORTED_POOLING + ("",):
        raise ConfigError(f"PrunedViT: global_pool={model.global_pool!r} is not supported "
                          f"({', '.join(SUPPORTED_POOLING)})")


class PrunedViT(nn.Module):
    """A timm ``VisionTransformer`` run with token selection and in-network pruning.

    Args:
        model: the timm model (its modules are used, never copied). Put it in eval mode:
            this is an inference wrapper (in train mode dropout would be active and drop-path
            would act per token on the packed MLP rows instead of per image).
        config: ``prune_blocks``, ``prune_policy``, ``prune_p``, ``keep_ratio``,
            ``prune_min_tokens``, ``fuse_pruned``, ``pooling``.
        batching: ``pad`` (pad + key mask, packed MLP) or ``bucket`` (exact-length groups).

    Raises:
        ConfigError: unsupported model (see :func:`check_supported`), a pruning block outside
            the model, pruning or ``cls+mean`` without a class token, an unknown ``batching``.
    """

    def __init__(self, model: VisionTransformer, config: ViTConfig, batching: str = "pad") -> None:
        super().__init__()
        check_supported(model, config.pooling)
        if batching not in BATCHING:
            raise ConfigError(f"PrunedViT batching must be one of {BATCHING}, got {batching!r}")
        self.model = model
        self.config = config
        self.batching = batching
        depth = len(model.blocks)
        bad = [b for b in config.prune_blocks if b >= depth]
        if bad:
            raise ConfigError(f"vit.prune_blocks {bad} outside the model's {depth} blocks")
        self.has_cls = model.cls_token is not None
        if config.prune_blocks and not self.has_cls:
            raise ConfigError("vit.prune_blocks needs a model with a class token (CLS attention)")
        if config.pooling == "cls+mean":
            if not self.has_cls:
                raise ConfigError("vit.pooling cls+mean needs a model with a class token")
            if not isinstance(model.fc_norm, nn.Identity):
                raise ConfigError("vit.pooling cls+mean with a model that has an fc_norm")
        self.num_prefix = int(model.num_prefix_tokens)
        #: block index -> stage (1-based) for pruning blocks
        self.stage_of = {b: s + 1 for s, b in enumerate(sorted(config.prune_blocks))}
        row_blocks = set(config.prune_blocks) | ({depth - 1} if self.has_cls else set())
        self.cls_attn_blocks = tuple(sorted(row_blocks))
        # timm >= 1.0 Attention takes a mask, SDPA itself when fused; else our own SDPA call
        self._timm_sdpa = [
            bool(getattr(blk.attn, "fused_attn", False))
            and "attn_mask" in inspect.signature(blk.attn.forward).parameters
            for blk in model.blocks
        ]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, patch_keep: torch.Tensor | None = None) -> PrunedOutput:
        """Embed a batch of tiles, under ``config.precision`` autocast
        (:func:`~wsi_prune.models.accel.autocast`; fp32: none).

        Args:
            images: (B, 3, H, W) float, normalised as the model expects.
            patch_keep: (B, P) bool patch tokens allowed in (row-major grid), or None (all).
                Each row must keep at least one patch.

        Returns:
            :class:`PrunedOutput`; its embedding is float32 whatever the precision.

        Raises:
            ValueError: ``patch_keep`` of the wrong shape or keeping no patch of some image.
        """
        with autocast(images.device, self.config.precision):
            out = self._forward(images, patch_keep)
        out.embedding = out.embedding.float()
        return out

    def _forward(self, images: torch.Tensor, patch_keep: torch.Tensor | None) -> PrunedOutput:
        m = self.model
        if patch_keep is not None:
            patch_keep = patch_keep.to(device=images.device, dtype=torch.bool)
        x = None if patch_keep is None else embed_kept_patches(m.patch_embed, images, patch_keep)
        embedded = x is not None
        x = m.patch_embed(images) if x is None else x
        x = m._pos_embed(x)  # adds CLS/register tokens and handles no_embed_class
        x = m.norm_pre(x)  # patch_drop is replaced by the selection below
        b, n, _ = x.shape
        npre = self.num_prefix
        n_patch = n - npre
        grid = _grid_size(m, n_patch)
        dev = x.device
        if patch_keep is None:
            patch_keep = torch.ones(b, n_patch, dtype=torch.bool, device=dev)
        if patch_keep.shape != (b, n_patch):
            raise ValueError(f"patch_keep must be ({b}, {n_patch}), got {tuple(patch_keep.shape)}")
        if not bool(patch_keep.any(1).all()):
            raise ValueError("patch_keep keeps no patch in some image")

        patch_pos = torch.arange(n_patch, device=dev).expand(b, -1)
        patches, ppos = _compact(x[:, npre:], patch_pos, patch_keep)
        x = torch.cat([x[:, :npre], patches], 1)
        pos = torch.cat([torch.full((b, npre), PREFIX, device=dev), ppos], 1)

        depth = len(m.blocks)
        rec = _Record(
            kept=[patch_keep.clone()]
            + [torch.zeros(b, n_patch, dtype=torch.bool, device=dev) for _ in self.stage_of],
            importance=torch.zeros(b, n_patch, dtype=torch.float32, device=dev),
            tokens=torch.zeros(b, depth, 2, dtype=torch.long, device=dev),
        )
        groups = [_Group(torch.arange(b, device=dev), x, pos)]
        if self.batching == "bucket":
            groups = _bucket(groups)
        for i, blk in enumerate(m.blocks):
            groups = [self._block(i, blk, g, rec) for g in groups]
            if self.batching == "bucket" and i in self.stage_of:
                groups = _bucket(groups)
        for g in groups:
            out = self._pool(m.norm(g.x), g.pos)
            if rec.embedding is None:
                rec.embedding = out.new_zeros(b, out.shape[1])
            rec.embedding[g.idx] = out
        return PrunedOutput(
            embedding=rec.embedding,
            kept=rec.kept,
            token_importance=rec.importance,
            tokens_per_image=rec.tokens.cpu(),
            cls_attn_blocks=self.cls_attn_blocks,
            grid_size=grid,
            patches_embedded=(patch_keep.sum(1) if embedded else torch.full(
                (b,), n_patch, dtype=torch.long, device=dev)).cpu(),
        )

    # -- one block ----------------------------------------------------------------------------
    def _block(self, i: int, blk: nn.Module, g: _Group, rec: _Record) -> _Group:
        """Run block ``i`` on one group; prune between its attention and MLP if it is a
        pruning block. Records token counts, importance and kept maps by batch row."""
        valid = g.pos != PAD
        all_valid = bool(valid.all())
        mask = None if all_valid else valid[:, None, None, :]
        rec.tokens[g.idx, i, 0] = valid.sum(1)
        z = blk.norm1(g.x)
        row = None
        if i in self.cls_attn_blocks:
            a, row = _sdpa_attention(blk.attn, z, mask, cls_row=True)
            rec.importance[g.idx] = _importance(rec.importance[g.idx], row, g.pos)
        elif self._timm_sdpa[i]:
            a = blk.attn(z) if mask is None else blk.attn(z, attn_mask=mask)
        else:
            a, _ = _sdpa_attention(blk.attn, z, mask, cls_row=False)
        x = g.x + blk.drop_path1(blk.ls1(a))
        pos = g.pos
        if i in self.stage_of:
            x, pos, keep_map = self._prune(x, pos, row, rec.importance.shape[1])
            rec.kept[self.stage_of[i]][g.idx] = keep_map
            valid = pos != PAD
            all_valid = bool(valid.all())
        rec.tokens[g.idx, i, 1] = valid.sum(1)
        return _Group(g.idx, _mlp_residual(blk, x, None if all_valid else valid), pos)

    def _prune(
        self, x: torch.Tensor, pos: torch.Tensor, cls_attn: torch.Tensor, n_patch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep patch tokens by CLS attention, fuse the rest if asked, compact the tensor.

        Args:
            x: (g, T, D) tokens after the attention residual; pos: (g, T) slot codes;
            cls_attn: (g, T) CLS attention row (0 at padding); n_patch: P, patches in the grid.

        Returns:
            x (g, T', D), pos (g, T'), and the (g, P) keep map in the patch grid.
        """
        cfg = self.config
        npre = self.num_prefix
        is_patch = pos >= 0
        keep = keep_by_attention(
            cls_attn, is_patch, cfg.prune_policy, cfg.prune_p, cfg.keep_ratio,
            cfg.prune_min_tokens,
        )
        keep_map = _to_grid(keep, pos, n_patch)
        # Prefix slots stay first; the old fused slot (not a patch) never survives compaction:
        # it is folded into the new fused token instead.
        patches, ppos = _compact(x[:, npre:], pos[:, npre:], keep[:, npre:])
        parts, pparts = [x[:, :npre]], [pos[:, :npre]]
        if cfg.fuse_pruned:
            # EViT: the dropped tokens (and an earlier fused token) become one token, their
            # average weighted by the CLS attention they received.
            src = (is_patch & ~keep) | (pos == FUSED)
            w = torch.where(src, cls_attn.clamp_min(1e-12), torch.zeros_like(cls_attn))
            fused = (w[..., None] * x).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-30)
            fused_pos = torch.where(src.any(1), FUSED, PAD)
            parts.append(fused[:, None].to(x.dtype))
            pparts.append(fused_pos[:, None])
        parts.append(patches)
        pparts.append(ppos)
        x, pos = torch.cat(parts, 1), torch.cat(pparts, 1)
        if cfg.fuse_pruned and self.batching == "pad" and not bool((pos[:, npre] != PAD).any()):
            # nobody dropped anything: remove the empty fused slot
            x, pos = torch.cat([x[:, :npre], x[:, npre + 1 :]], 1), torch.cat(
                [pos[:, :npre], pos[:, npre + 1 :]], 1
            )
        return x, pos, keep_map

    def _pool(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Pool as ``forward_head(pre_logits=True)`` does, over valid tokens only (x is normed).

        The fused token (EViT) is not a patch token and is left out of averages.
        """
        m = self.model
        patch = pos >= 0
        if self.config.pooling == "cls+mean":
            return torch.cat([x[:, 0], _masked_mean(x, patch)], -1)
        if m.global_pool == "token":
            out = x[:, 0]
        else:
            sel = (patch | (pos == PREFIX)) if m.pool_include_prefix else patch
            if m.global_pool == "avg":
                out = _masked_mean(x, sel)
            elif m.global_pool == "max":
                out = _masked_max(x, sel)
            else:  # avgmax, as timm: 0.5 * (max + mean)
                out = 0.5 * (_masked_max(x, sel) + _masked_mean(x, sel))
        return m.fc_norm(out)


# -- helpers ----------------------------------------------------------------------------------
def _grid_size(model: VisionTransformer, n_patch: int) -> tuple[int, int]:
    gs = tuple(int(g) for g in model.patch_embed.grid_size)
    if gs[0] * gs[1] == n_patch:
        return gs  # type: ignore[return-value]
    side = int(round(n_patch**0.5))  # dynamic_img_size with another input size: assume square
    return (side, n_patch // max(side, 1))


def _compact(
    x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept slots to the front (order kept), pad rows to the batch's largest count.

    Args:
        x: (B, L, D) tokens; pos: (B, L) long slot codes; keep: (B, L) bool.

    Returns:
        (B, K, D) tokens and (B, K) codes with ``PAD`` where a row has fewer than K kept.
    """
    b, n, d = x.shape
    counts = keep.sum(1)
    width = int(counts.max()) if b else 0
    if width == n and bool(keep.all()):
        return x, pos
    ar = torch.arange(n, device=x.device)
    order = torch.where(keep, ar, ar + n).argsort(dim=1)[:, :width]
    out = x.gather(1, order[..., None].expand(-1, -1, d))
    slot_ok = torch.arange(width, device=x.device)[None, :] < counts[:, None]
    out = out.masked_fill(~slot_ok[..., None], 0.0)
    return out, torch.where(slot_ok, pos.gather(1, order), PAD)


def _bucket(groups: list[_Group]) -> list[_Group]:
    """Regroup images by exact token count, each group unpadded (``batching="bucket"``)."""
    pieces: dict[int, list[_Group]] = {}
    for g in groups:
        valid = g.pos != PAD
        counts = valid.sum(1)
        for c in torch.unique(counts).tolist():
            sel = counts == c
            x, pos = _compact(g.x[sel], g.pos[sel], valid[sel])
            pieces.setdefault(int(c), []).append(_Group(g.idx[sel], x, pos))
    out = []
    for c in sorted(pieces, reverse=True):
        ps = pieces[c]
        if len(ps) == 1:
            out.append(ps[0])
        else:
            out.append(
                _Group(
                    torch.cat([p.idx for p in ps]),
                    torch.cat([p.x for p in ps]),
                    torch.cat([p.pos for p in ps]),
                )
            )
    return out


def _to_grid(mask: torch.Tensor, pos: torch.Tensor, n_patch: int) -> torch.Tensor:
    """(B, T) per-slot bool -> (B, P) bool in the original patch grid."""
    idx = torch.where(pos >= 0, pos, n_patch)
    out = torch.zeros(mask.shape[0], n_patch + 1, dtype=torch.bool, device=mask.device)
    out.scatter_(1, idx, mask & (pos >= 0))
    return out[:, :n_patch]


def _importance(importance: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``importance`` (B, P) with each present patch's share of patch-token CLS attention.

    ``attn`` (B, T) is the row over all keys; the prefix and fused entries are dropped and the
    patch entries renormalised, so each image's present patches sum to 1. Patches not present
    keep the share they had when last present.
    """
    is_patch = pos >= 0
    a = torch.where(is_patch, attn, torch.zeros_like(attn)).float()
    share = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    n_patch = importance.shape[1]
    idx = torch.where(is_patch, pos, n_patch)
    full = torch.cat([importance, importance.new_zeros(importance.shape[0], 1)], 1)
    full.scatter_(1, idx, torch.where(is_patch, share, full.gather(1, idx)))
    return full[:, :n_patch]


def _sdpa_attention(
    attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cls_row: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention.forward`` through one fused SDPA call, plus (optionally) the CLS row.

    Uses the module's own qkv, q_norm, k_norm, scale norm, gate and proj, so the output equals
    ``attn(x, attn_mask=mask)``. The CLS row is ``softmax(q_cls · Kᵀ · scale)`` over all valid
    keys, prefix keys included on purpose (see the module docstring), averaged over heads:
    ``heads · T · head_dim`` extra MACs, the q and K are shared.

    Args:
        attn: a timm ``Attention``; x: (B, T, D) normed block input; mask: (B, 1, 1, T) bool
            valid keys, or None (all valid).
        cls_row: also return the CLS row.

    Returns:
        (B, T, D) attention output and (B, T) float32 CLS row (0 at masked keys) or None.
    """
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    g = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    row = None
    if cls_row:
        # fp32 under autocast too: the row ranks tokens, and bf16 would tie close scores
        with torch.autocast(x.device.type, enabled=False):
            s = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * attn.scale  # (B,H,1,T)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            row = s.softmax(-1).mean(1)[:, 0]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, h * hd))
    if g is not None:
        out = out * g
    return attn.proj_drop(attn.proj(out)), row


def _mlp_residual(blk: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x + dp2(ls2(mlp(norm2(x))))``; with ``valid`` (B, T) only on the valid tokens, packed.

    Everything here is per token, so running it on the packed valid tokens gives the same
    numbers without spending MACs on padding.
    """
    if valid is None:
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    xv = x[valid]  # (N_valid, D)
    yv = xv + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xv))))
    return x.masked_scatter(valid[..., None], yv)


def _masked_mean(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    w = sel[..., None].to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _masked_max(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~sel[..., None], float("-inf")).amax(1)
