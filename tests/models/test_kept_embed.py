"""The patch embedding of kept patches only (wsi_prune.models.kept_embed) against timm's conv."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import SwiGLUPacked

from wsi_prune.config import ViTConfig
from wsi_prune.models import kept_embed
from wsi_prune.models.kept_embed import embed_kept_patches, plain_patch_embed
from wsi_prune.models.pruned_vit import PrunedViT

TINY = dict(depth=3, embed_dim=48, num_heads=2, img_size=96, num_classes=0)  # 6x6 patches


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()


def _keep(b: int, p: int, share: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, p, generator=g) < share
    keep[:, 0] = True  # every image keeps one patch at least
    return keep


@torch.no_grad()
@pytest.mark.parametrize("kw", [{}, {"patch_size": 8}, {"embed_layer_norm": True},
                                {"no_embed_class": True, "reg_tokens": 2}])
def test_kept_patches_are_the_convolutions_and_the_others_zero(kw: dict) -> None:
    if kw.pop("embed_layer_norm", False):
        kw["norm_layer"] = None
        model = _vit(**kw)
        model.patch_embed.norm = torch.nn.LayerNorm(48)  # a norm inside the patch embedding
    else:
        model = _vit(**kw)
    pe = model.patch_embed
    assert plain_patch_embed(pe)
    x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    keep = _keep(5, pe.num_patches, 0.3)
    got = embed_kept_patches(pe, x, keep)
    want = pe(x)
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert not got[~keep].any()


@torch.no_grad()
def test_pruned_vit_gives_the_same_answer_with_either_embedding(monkeypatch) -> None:
    """The wrapper's embeddings, kept maps and token counts do not depend on which way the
    patches were embedded; only the patch-embedding MACs (patches_embedded) do."""
    model = _vit(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=8 / 3)
    cfg = ViTConfig(prune_blocks=(1,), keep_ratio=0.5)
    x = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    keep = _keep(6, 36, 0.2, seed=3)
    vit = PrunedViT(model, cfg)
    fast = vit(x, keep)
    monkeypatch.setattr(kept_embed, "MAX_KEPT_SHARE", 0.0)  # every batch through the conv
    conv = vit(x, keep)
    torch.testing.assert_close(fast.embedding, conv.embedding, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.kept, conv.kept, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fast.tokens_per_image, conv.tokens_per_image)
    assert fast.patches_embedded.tolist() == keep.sum(1).tolist()
    assert conv.patches_embedded.tolist() == [36] * 6


@torch.no_grad()
def test_other_layouts_and_wide_selections_use_the_convolution() -> None:
    model = _vit()
    pe = model.patch_embed
    x = torch.randn(2, 3, 96, 96)
    # more than MAX_KEPT_SHARE of the patches: gathering them would cost more than it saves
    assert embed_kept_patches(pe, x, _keep(2, 36, 0.9)) is None
    # another image size, a mask of the wrong shape
    assert embed_kept_patches(pe, torch.randn(2, 3, 112, 112), _keep(2, 49, 0.2)) is None
    assert embed_kept_patches(pe, x, _keep(2, 35, 0.2)) is None
    # dynamic image size (NHWC output, not flattened) and an overlapping projection
    dyn = _vit(dynamic_img_size=True).patch_embed
    assert not plain_patch_embed(dyn)
    pe.proj = torch.nn.Conv2d(3, 48, kernel_size=16, stride=8)
    assert not plain_patch_embed(pe)
    # the wrapper still runs such a model (the convolution, every patch embedded)
    out = PrunedViT(_vit(dynamic_img_size=True), ViTConfig(prune_blocks=()))(
        x, _keep(2, 36, 0.2))
    assert out.patches_embedded.tolist() == [36, 36]
