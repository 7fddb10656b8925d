"""Patch embedding of the kept patches only.

timm's ``PatchEmbed`` is a convolution with kernel = stride = patch size: every patch of the
tile is projected, then :class:`~wsi_prune.models.pruned_vit.PrunedViT` keeps the CNN prior's
share of them. At an eighth of the patches that projection is most of what is thrown away:
for a 6-block ViT-Ti, embedding all 196 patches costs 29 MMACs, as much as 11 patch tokens
through every block. :func:`embed_kept_patches` projects only the kept patches (the same
weights as a matrix product on their pixels) and leaves zeros in the others, so that the
model's own ``_pos_embed`` (class and register tokens, position embeddings) runs unchanged
before the dropped slots are removed.

The result equals the convolution's on every kept patch up to float rounding (the sums run in
another order: about 1e-6 relative in float32). Only the plain layout is taken this way: a
``Conv2d`` with kernel = stride = patch size, no padding, dilation or groups, output flattened
to (B, P, D), and images of the model's own size; anything else (dynamic image size, padding,
another projection) returns None and the caller runs the module as it is.
"""

from __future__ import annotations

import torch
from torch import nn

#: the kept share of a batch's patches above which the whole convolution is run instead.
#: benchmarks/bench_kept_embed.py (ViT-Ti, 32 tiles of 224 px, 2 CPU threads, idle): the
#: embedding 1.3 / 2.3 / 5.9 ms kept against 9.7-10.4 ms convolved at 12 / 25 / 74 patches of
#: 196, and the whole PrunedViT 1.47x / 1.23x / 1.03x; at 98 patches no faster (0.99x), and
#: gathering nearly every patch can only cost more
MAX_KEPT_SHARE = 0.4


def plain_patch_embed(pe: nn.Module) -> bool:
    """Whether ``pe`` is a patch embedding :func:`embed_kept_patches` can reproduce: a timm
    ``PatchEmbed`` whose projection is a plain non-overlapping ``Conv2d``, flattened to NLC."""
    proj = getattr(pe, "proj", None)
    if type(proj) is not nn.Conv2d:
        return False
    patch = tuple(getattr(pe, "patch_size", ()))
    return (
        getattr(pe, "flatten", False) is True
        and not getattr(pe, "dynamic_img_pad", False)
        and getattr(pe, "img_size", None) is not None
        and len(patch) == 2
        and tuple(proj.kernel_size) == patch
        and tuple(proj.stride) == patch
        and tuple(proj.padding) == (0, 0)
        and tuple(proj.dilation) == (1, 1)
        and proj.groups == 1
        and proj.padding_mode == "zeros"
    )


def embed_kept_patches(pe: nn.Module, images: torch.Tensor, patch_keep: torch.Tensor
                       ) -> torch.Tensor | None:
    """``pe(images)`` computed on the kept patches only, zeros in the others.

    Args:
        pe: the model's ``patch_embed``.
        images: (B, C, H, W) float, (H, W) the model's image size.
        patch_keep: (B, P) bool, row-major over the patch grid.

    Returns:
        (B, P, D) embeddings (the projection and ``pe.norm`` of each kept patch, 0 elsewhere),
        or None where the layout is not the plain one (:func:`plain_patch_embed`), the images
        are not the model's size, or more than :data:`MAX_KEPT_SHARE` of the patches are kept.
    """
    if not plain_patch_embed(pe) or tuple(images.shape[-2:]) != tuple(pe.img_size):
        return None
    b, c = int(images.shape[0]), int(images.shape[1])
    ph, pw = (int(v) for v in pe.patch_size)
    gh, gw = (int(v) for v in pe.grid_size)
    if patch_keep.shape != (b, gh * gw):
        return None
    n_kept = int(patch_keep.sum())
    if n_kept > MAX_KEPT_SHARE * patch_keep.numel():
        return None
    proj: nn.Conv2d = pe.proj
    idx = patch_keep.nonzero()  # (K, 2): image, patch (row-major), in boolean-index order
    rows, cols = torch.div(idx[:, 1], gw, rounding_mode="floor"), idx[:, 1] % gw
    # (B, C, gh, ph, gw, pw); advanced indices on dims 0, 2, 4 put K first: (K, C, ph, pw)
    grid = images.reshape(b, c, gh, ph, gw, pw)
    pix = grid[idx[:, 0], :, rows, :, cols, :].reshape(n_kept, c * ph * pw)
    weight = proj.weight.reshape(proj.out_channels, c * ph * pw)
    emb = pe.norm(_project(pix, weight, proj.bias))
    out = emb.new_zeros(b, gh * gw, emb.shape[-1])
    out[patch_keep] = emb
    return out


def _project(pix: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(K, C·ph·pw) patch pixels → (K, D): the convolution's weights as one matrix product."""
    return nn.functional.linear(pix, weight, bias)
