"""PrunedViT on tiny ``pretrained=False`` timm ViTs: exactness, pruning, batching, MAC counts.

Every model's parameters are perturbed after creation so that norms' biases, LayerScale, q/k
norms and register tokens all change the output: a wrapper that skipped one of them would
fail the exactness tests.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock
from torch import nn

from tests._hub import cache_repo
from wsi_prune.config import ViTConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models import kept_embed, pruned_vit
from wsi_prune.models.checkpoints import load_into, save_safetensors
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.selection.macs import (
    MacTally,
    ViTSpec,
    block_macs,
    patch_embed_macs,
    slide_macs,
    vit_batch_macs,
    vit_macs,
)

TOL = 1e-5
TINY = dict(depth=4, embed_dim=64, num_heads=2, img_size=96)  # 6x6 = 36 patches
CONFIGS = {
    "plain": {},
    "registers": dict(reg_tokens=4),
    "layerscale": dict(init_values=0.5),
    "swiglu": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=4.0),
    "qk_norm": dict(qk_norm=True),
    "patch14": dict(patch_size=14, img_size=98),  # 7x7 = 49 patches
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
    "avg": dict(global_pool="avg"),  # timm adds an fc_norm for avg pooling
    "avg_no_cls": dict(global_pool="avg", class_token=False),
    "max": dict(global_pool="max"),
    "avgmax_prefix": dict(global_pool="avgmax", pool_include_prefix=True, reg_tokens=2),
    # UNI2-h / H-optimus style: registers, LayerScale, SwiGLU, patch 14, no_embed_class.
    "foundation": dict(
        patch_size=14, img_size=98, reg_tokens=4, no_embed_class=True, init_values=0.5,
        mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=4.0, qk_norm=True,
    ),
}
KEEP_ALL = ViTConfig(prune_blocks=(), pooling="model")

# Foundation-model families: the timm architecture and arguments each model card uses, taken
# from the known-models table (so with its config strings, e.g. mlp_layer: swiglu_packed,
# act_layer: silu), shrunk to 3 blocks. Patch size, registers, no_embed_class, LayerScale,
# SwiGLU, dynamic_img_size and global_pool stay those of the real model.
FAMILIES = {
    "uni": ("hf-hub:MahmoodLab/UNI", dict(depth=3, embed_dim=32, num_heads=2, img_size=64)),
    "uni2_h": ("hf-hub:MahmoodLab/UNI2-h", dict(depth=3, embed_dim=48, num_heads=2, img_size=56)),
    "virchow2": ("hf-hub:paige-ai/Virchow2", dict(depth=3, embed_dim=32, num_heads=2, img_size=56)),
    "h_optimus_0": ("hf-hub:bioptimus/H-optimus-0",
                    dict(depth=3, embed_dim=48, num_heads=2, img_size=56)),
    "gigapath": ("hf_hub:prov-gigapath/prov-gigapath",
                 dict(depth=3, embed_dim=48, num_heads=2, img_size=64)),
}


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, **{**TINY, **kw}
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images(n: int, size: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stock(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def size_of(model: nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def n_patches(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine the OpenMP
    hand-offs cost ~100x the work."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: tiny(**kw) for name, kw in CONFIGS.items()}


@pytest.fixture(scope="module")
def reg_model(models: dict[str, nn.Module]) -> nn.Module:
    return models["foundation"]


def family(name: str) -> tuple[nn.Module, str]:
    """A tiny perturbed model of a foundation family, built through build_vit from the
    known-models entry (config strings resolved there), and the pooling its card uses."""
    from wsi_prune.models.hub import hub_architecture, known_model

    hub, shrink = FAMILIES[name]
    arch, args, pcfg = hub_architecture(hub)
    torch.manual_seed(0)
    model = build_vit(ViTConfig(model=arch, model_kwargs={**args, **shrink}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, known_model(hub).pooling


@pytest.fixture(scope="module")
def families() -> dict[str, tuple[nn.Module, str]]:
    return {name: family(name) for name in FAMILIES}


def card_embedding(model: nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """What the model card computes: timm's forward, or for Virchow (global_pool "") the CLS
    token concatenated with the mean of the patch tokens, registers excluded."""
    if pooling == "cls+mean":
        tokens = model(x)
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], -1)
    return stock(model, x)


# ---------------------------------------------------------------- exactness with keep-all


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_keep_all_equals_stock_model(models: dict[str, nn.Module], name: str) -> None:
    model = models[name]
    x = images(3, size_of(model))
    ref = stock(model, x)
    has_cls = model.cls_token is not None
    settings = [KEEP_ALL]
    if has_cls:
        # Pruning blocks that keep everything still take the CLS-row attention path.
        settings += [
            ViTConfig(prune_blocks=(0, 2), keep_ratio=1.0),
            ViTConfig(prune_blocks=(1, 3), keep_ratio=1.0, fuse_pruned=True),
        ]
    for cfg in settings:
        for batching in ("pad", "bucket"):
            out = PrunedViT(model, cfg, batching=batching)(x)
            assert out.embedding.shape == ref.shape
            assert (out.embedding - ref).abs().max() < TOL, (name, cfg, batching)
            assert all(bool(k.all()) for k in out.kept)


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_keep_all_equals_the_model_card_per_family(families, name: str) -> None:
    """UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath shapes: PrunedViT keeping everything
    gives the card's embedding, on the plain path and on the CLS-row (pruning-block) path."""
    model, pooling = families[name]
    x = images(3, size_of(model))
    ref = card_embedding(model, x, pooling)
    for cfg in (ViTConfig(prune_blocks=(), pooling=pooling),
                ViTConfig(prune_blocks=(0, 2), keep_ratio=1.0, pooling=pooling)):
        for batching in ("pad", "bucket"):
            out = PrunedViT(model, cfg, batching=batching)(x)
            assert out.embedding.shape == ref.shape
            assert (out.embedding - ref).abs().max() < TOL, (name, cfg, batching)


def _with_linear_macs(model: nn.Module, run):
    """``run()``'s result and the MACs that every Linear layer and the patch-embedding conv of
    ``model`` spent in it (counted by forward hooks from their actual output sizes)."""
    linear = 0

    def hook(mod: nn.Module, inp, out: torch.Tensor) -> None:
        nonlocal linear
        if isinstance(mod, nn.Linear):
            linear += out.numel() * mod.in_features
        else:  # patch-embedding conv
            k = mod.kernel_size
            linear += out.numel() * mod.in_channels * k[0] * k[1]

    def project(pix: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:  # the patch embedding of kept patches only
        nonlocal linear
        linear += pix.shape[0] * weight.numel()
        return plain_project(pix, weight, bias)

    handles = [mod.register_forward_hook(hook) for mod in model.modules()
               if isinstance(mod, nn.Linear | nn.Conv2d)]
    plain_project = kept_embed._project
    kept_embed._project = project
    try:
        out = run()
    finally:
        kept_embed._project = plain_project
        for h in handles:
            h.remove()
    return out, linear


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_pruning_per_family_keeps_registers_and_counts_macs(families, name: str) -> None:
    """Pruning inside each family: prefix tokens (CLS + registers) are never pruned, and
    vit_batch_macs of the token counts equals the matmuls that really ran (gated MLPs: 3
    matmuls of the gated width; registers counted as tokens)."""
    model, pooling = families[name]
    spec = ViTSpec.from_timm(model)
    npre = int(model.num_prefix_tokens)
    assert spec.num_prefix_tokens == npre
    assert spec.swiglu == (name != "uni")
    cfg = ViTConfig(prune_blocks=(1,), keep_ratio=0.5, pooling=pooling)
    out, linear = _with_linear_macs(
        model, lambda: PrunedViT(model, cfg, batching="bucket")(images(4, size_of(model))))
    t = out.tokens_per_image
    p = n_patches(model)
    kept = int(math.ceil(0.5 * p))
    # block 1's attention sees everything, its MLP and block 2 the prefix plus the kept half
    assert t[:, 1].tolist() == [[npre + p, npre + kept]] * 4
    assert t[:, 2, 0].tolist() == [npre + kept] * 4
    assert out.embedding.shape[1] == model.num_features * (2 if pooling == "cls+mean" else 1)
    attn_core = sum(block_macs(spec, a, m).attn_scores + block_macs(spec, a, m).attn_v
                    for a, m in t.reshape(-1, 2).tolist())
    rows = spec.num_heads * spec.head_dim * int(t[:, list(out.cls_attn_blocks), 0].sum())
    assert vit_batch_macs(spec, t, cls_attn_blocks=out.cls_attn_blocks).vit == \
        linear + attn_core + rows


@torch.no_grad()
def test_keep_all_token_prior_all_equals_stock(models: dict[str, nn.Module]) -> None:
    from wsi_prune.config import TokenSelectConfig
    from wsi_prune.selection.tokens import select_patches

    model = models["registers"]
    x = images(2)
    keep = select_patches(torch.rand(2, 6, 6), TokenSelectConfig(policy="all"), grid=(6, 6))
    out = PrunedViT(model, KEEP_ALL)(x, keep)
    assert (out.embedding - stock(model, x)).abs().max() < TOL


@torch.no_grad()
def test_cls_plus_mean_pooling(models: dict[str, nn.Module]) -> None:
    model = models["registers"]  # token pooling, no fc_norm, 5 prefix tokens
    x = images(2)
    feats = model.forward_features(x)
    ref = torch.cat([feats[:, 0], feats[:, model.num_prefix_tokens :].mean(1)], -1)
    out = PrunedViT(model, ViTConfig(prune_blocks=(), pooling="cls+mean"))(x)
    assert out.embedding.shape == (2, 2 * 64)
    assert (out.embedding - ref).abs().max() < TOL
    pruned = PrunedViT(model, ViTConfig(prune_blocks=(1,), keep_ratio=0.5, pooling="cls+mean"))
    assert pruned(x).embedding.shape == (2, 128)


# ---------------------------------------------------------------- pruning against a reference


@torch.no_grad()
def reference_pruned(
    model: nn.Module,
    img: torch.Tensor,
    prior: torch.Tensor,
    prune_blocks: tuple[int, ...],
    keep_ratio: float,
    fuse: bool,
) -> tuple[torch.Tensor, list[list[int]]]:
    """One image through the stock blocks, pruning by hand (full attention matrix, top-k).

    Returns the pooled embedding and, per pruning block, the kept patch indices.
    """
    m = model
    npre = m.num_prefix_tokens
    x = m.norm_pre(m._pos_embed(m.patch_embed(img[None])))
    idx = torch.nonzero(prior).flatten()
    x = torch.cat([x[:, :npre], x[:, npre:][:, idx]], 1)
    nf = 0  # 1 once a fused token (EViT) sits right after the prefix tokens
    kept = []
    for i, blk in enumerate(m.blocks):
        if i not in prune_blocks:
            x = blk(x)
            continue
        a = blk.attn
        z = blk.norm1(x)
        q, k, _ = a.qkv(z).reshape(1, z.shape[1], 3, a.num_heads, a.head_dim).permute(
            2, 0, 3, 1, 4
        )
        q, k = a.q_norm(q), a.k_norm(k)
        cls_row = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1).mean(1)[0, 0]  # (T,)
        x = x + blk.ls1(a(z))
        patch_attn = cls_row[npre + nf :]
        n_keep = math.ceil(keep_ratio * patch_attn.numel() - 1e-9)
        top = torch.sort(torch.argsort(patch_attn, descending=True, stable=True)[:n_keep])[0]
        patches = x[:, npre + nf :]
        parts = [x[:, :npre]]
        if fuse:
            dropped = torch.ones(patch_attn.numel(), dtype=torch.bool)
            dropped[top] = False
            w = torch.cat([cls_row[npre : npre + nf], patch_attn[dropped]])
            src = torch.cat([x[:, npre : npre + nf], patches[:, dropped]], 1)
            parts.append((w[None, :, None] * src).sum(1, keepdim=True) / w.sum())
            nf = 1
        idx = idx[top]
        kept.append(idx.tolist())
        x = torch.cat([*parts, patches[:, top]], 1)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = m.norm(x)
    x = torch.cat([x[:, :npre], x[:, npre + nf :]], 1)  # the fused token is not pooled
    return m.forward_head(x, pre_logits=True)[0], kept


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("name", ["foundation", "avg", "plain"])
@torch.no_grad()
def test_pruning_matches_hand_reference(
    models: dict[str, nn.Module], name: str, fuse: bool
) -> None:
    model = models[name]
    p = n_patches(model)
    x = images(2, size_of(model), seed=3)
    prior = torch.rand(2, p, generator=torch.Generator().manual_seed(4)) > 0.3
    cfg = ViTConfig(prune_blocks=(1, 2), prune_policy="ratio", keep_ratio=0.6, fuse_pruned=fuse)
    for batching in ("pad", "bucket"):
        out = PrunedViT(model, cfg, batching=batching)(x, prior)
        for b in range(2):
            emb, kept = reference_pruned(model, x[b], prior[b], (1, 2), 0.6, fuse)
            assert (out.embedding[b] - emb).abs().max() < TOL, (name, fuse, batching, b)
            for s, ids in enumerate(kept, start=1):
                assert torch.nonzero(out.kept[s][b]).flatten().tolist() == ids


# ---------------------------------------------------------------- batching


def varied_prior(model: nn.Module, n: int, seed: int = 5) -> torch.Tensor:
    """(n, P) keep masks with very different counts per image (nucleus on peaked maps)."""
    from wsi_prune.config import TokenSelectConfig
    from wsi_prune.selection.tokens import select_patches

    g = torch.Generator().manual_seed(seed)
    p = n_patches(model)
    sharp = torch.linspace(0.5, 6.0, n)[:, None]
    imp = torch.rand(n, p, generator=g) ** sharp
    keep = select_patches(imp, TokenSelectConfig(policy="nucleus", p=0.7, min_tokens=2))
    assert len(set(keep.sum(1).tolist())) > 2  # really different token counts
    return keep


@pytest.mark.parametrize("batching", ["pad", "bucket"])
@pytest.mark.parametrize(
    "cfg",
    [
        ViTConfig(prune_blocks=(1, 2), prune_policy="nucleus", prune_p=0.6),
        ViTConfig(prune_blocks=(0, 2), prune_policy="ratio", keep_ratio=0.5, fuse_pruned=True),
        ViTConfig(prune_blocks=(1,), prune_policy="nucleus", prune_p=0.5, pooling="cls+mean"),
    ],
    ids=["nucleus", "ratio-fuse", "cls+mean"],
)
@torch.no_grad()
def test_batch_invariance(reg_model: nn.Module, cfg: ViTConfig, batching: str) -> None:
    model = reg_model
    n = 5
    x = images(n, size_of(model), seed=6)
    prior = varied_prior(model, n)
    wrapper = PrunedViT(model, cfg, batching=batching)
    batch = wrapper(x, prior)
    # Padding really happened inside the batch: token counts differ across images.
    assert len({tuple(t) for t in batch.tokens_per_image[:, -1].tolist()}) > 1
    for b in range(n):
        alone = wrapper(x[b : b + 1], prior[b : b + 1])
        assert (alone.embedding[0] - batch.embedding[b]).abs().max() < TOL
        assert torch.equal(alone.tokens_per_image[0], batch.tokens_per_image[b])
        for ka, kb in zip(alone.kept, batch.kept, strict=True):
            assert torch.equal(ka[0], kb[b])
        assert (alone.token_importance[0] - batch.token_importance[b]).abs().max() < 1e-5
    # And the two batching modes agree with each other.
    other = PrunedViT(model, cfg, batching="bucket" if batching == "pad" else "pad")(x, prior)
    assert (other.embedding - batch.embedding).abs().max() < TOL


# ---------------------------------------------------------------- kept sets and counts


@torch.no_grad()
def test_kept_sets_counts_and_prefix(reg_model: nn.Module) -> None:
    model = reg_model  # 5 prefix tokens (CLS + 4 registers), 49 patches
    p = 49
    assert model.num_prefix_tokens == 5
    cfg = ViTConfig(prune_blocks=(1, 2), prune_policy="ratio", keep_ratio=0.5)
    out = PrunedViT(model, cfg)(images(3, 98))
    assert out.grid_size == (7, 7)
    assert len(out.kept) == 3 and all(k.shape == (3, p) for k in out.kept)
    # Nested stages.
    for a, b in zip(out.kept, out.kept[1:], strict=False):
        assert not bool((b & ~a).any())
    # Schedule: 49 -> ceil(24.5) = 25 -> ceil(12.5) = 13 patches; prefix tokens always there.
    expected = [[54, 54], [54, 30], [30, 18], [18, 18]]
    assert out.tokens_per_image.tolist() == [expected] * 3
    assert out.tokens_per_block == [tuple(e) for e in expected]
    assert out.kept[1].sum(1).tolist() == [25] * 3 and out.kept[2].sum(1).tolist() == [13] * 3
    assert out.cls_attn_blocks == (1, 2, 3)
    assert out.token_fraction == pytest.approx(13 / 49)
    # Importance: a share of CLS attention per patch; the last block's shares sum to 1 over
    # the survivors, patches that never entered have 0.
    imp = out.token_importance
    assert imp.shape == (3, p) and bool((imp >= 0).all())
    assert torch.allclose((imp * out.kept[-1]).sum(1), torch.ones(3), atol=1e-5)
    prior = torch.zeros(3, p, dtype=torch.bool)
    prior[:, :10] = True
    out = PrunedViT(model, cfg)(images(3, 98), prior)
    assert bool((out.token_importance[:, 10:] == 0).all())
    assert bool((out.kept[2] & ~prior).sum() == 0)
    # Fused: one more token after each pruning block, prefix untouched.
    fused = PrunedViT(model, ViTConfig(prune_blocks=(1, 2), keep_ratio=0.5, fuse_pruned=True))
    counts = fused(images(3, 98)).tokens_per_image[0].tolist()
    assert counts == [[54, 54], [54, 31], [31, 19], [19, 19]]


@torch.no_grad()
def test_nucleus_min_tokens_and_fuse_change_the_output(reg_model: nn.Module) -> None:
    model = reg_model
    x = images(2, 98)
    base = ViTConfig(prune_blocks=(1,), prune_policy="nucleus", prune_p=0.05)
    few = PrunedViT(model, base)(x)
    # A 5 % nucleus of 49 roughly even attention weights: a few patches, at least one.
    assert 1 <= few.kept[1].sum(1).min() and few.kept[1].sum(1).max() < 20
    forced = PrunedViT(model, ViTConfig(**{**_fields(base), "prune_min_tokens": 20}))(x)
    assert forced.kept[1].sum(1).tolist() == [20, 20]
    fused = PrunedViT(model, ViTConfig(**{**_fields(base), "fuse_pruned": True}))(x)
    assert (fused.embedding - few.embedding).abs().max() > 1e-3


def _fields(cfg: ViTConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


# ---------------------------------------------------------------- SDPA and the CLS row


@torch.no_grad()
def test_blocks_use_sdpa_and_cls_row_only_where_needed(
    reg_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"sdpa": 0, "row": 0}
    real_sdpa = F.scaled_dot_product_attention
    real_attn = pruned_vit._sdpa_attention

    def sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    def attn(module, x, mask, cls_row):
        calls["row"] += int(cls_row)
        return real_attn(module, x, mask, cls_row)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(pruned_vit, "_sdpa_attention", attn)
    model = reg_model
    assert all(blk.attn.fused_attn for blk in model.blocks)
    cfg = ViTConfig(prune_blocks=(1,), prune_policy="nucleus", prune_p=0.5)
    out = PrunedViT(model, cfg)(images(3, 98), varied_prior(model, 3))
    # One fused attention call per block, padded or not; CLS rows at block 1 and the last.
    assert calls == {"sdpa": 4, "row": 2}
    assert out.cls_attn_blocks == (1, 3)


# ---------------------------------------------------------------- MAC counts


@torch.no_grad()
def test_vit_batch_macs_equals_linear_hook_count(reg_model: nn.Module) -> None:
    """The counts in ``tokens_per_image`` are what the matmuls really ran on (bucket mode)."""
    model = reg_model
    spec = ViTSpec.from_timm(model)
    cfg = ViTConfig(prune_blocks=(1, 2), prune_policy="nucleus", prune_p=0.6, fuse_pruned=True)
    out, linear = _with_linear_macs(
        model,
        lambda: PrunedViT(model, cfg, batching="bucket")(images(4, 98), varied_prior(model, 4)))
    t = out.tokens_per_image
    attn_core = sum(
        block_macs(spec, a, m).attn_scores + block_macs(spec, a, m).attn_v
        for a, m in t.reshape(-1, 2).tolist()
    )
    rows = spec.num_heads * spec.head_dim * int(t[:, list(out.cls_attn_blocks), 0].sum())
    assert out.patches_embedded.tolist() == out.kept[0].sum(1).tolist()  # kept ones only
    tally = vit_batch_macs(spec, t, cls_attn_blocks=out.cls_attn_blocks,
                           patches_embedded=out.patches_embedded)
    assert tally.vit == linear + attn_core + rows
    # Per image it is vit_macs over that image's schedule, with the patch embedding of the
    # patches it embedded; dense is B dense passes.
    per_patch = patch_embed_macs(spec) // spec.n_patches
    per_image = sum(
        vit_macs(spec, [tuple(p) for p in ti.tolist()], cls_attn_blocks=out.cls_attn_blocks,
                 include_patch_embed=False) + int(e) * per_patch
        for ti, e in zip(t, out.patches_embedded, strict=True)
    )
    assert tally.vit == per_image
    assert tally.dense == 4 * vit_macs(spec)
    assert 0 < tally.vit < tally.dense


def test_mac_tally_and_slide_macs() -> None:
    spec = ViTSpec.preset("deit_small")
    dense_sched = torch.full((2, 12), 197)
    assert vit_batch_macs(spec, dense_sched).vit == 2 * vit_macs(spec)
    assert vit_batch_macs(spec, dense_sched).dense == 2 * vit_macs(spec)
    half = torch.tensor([[197] * 3 + [99] * 9])
    tally = slide_macs(spec, [half, half], n_tiles=10, scorer_macs_per_tile=1000)
    assert tally.vit == 2 * vit_macs(spec, [197] * 3 + [99] * 9)
    assert tally.scorer == 10_000
    assert tally.dense == 10 * vit_macs(spec)
    assert tally.spent == tally.vit + tally.scorer
    assert tally.gmacs == pytest.approx(tally.spent / 1e9)
    assert (MacTally(1, 2, 3) + MacTally(10, 20, 30)) == MacTally(11, 22, 33)
    with pytest.raises(ConfigError, match="grows"):
        vit_batch_macs(spec, torch.tensor([[99] * 3 + [197] * 9]))
    with pytest.raises(ConfigError, match=r"\(B, 12, 2\)"):
        vit_batch_macs(spec, torch.zeros(2, 11))
    with pytest.raises(ConfigError, match="ViT tiles of"):
        slide_macs(spec, [half, half], n_tiles=1)


# ---------------------------------------------------------------- errors and building


def test_unsupported_models_raise_clear_errors() -> None:
    for block_fn in (ResPostBlock, ParallelScalingBlock):
        model = timm.create_model("vit_small_patch16_224", pretrained=False, block_fn=block_fn,
                                  **TINY)
        with pytest.raises(ConfigError, match=f"block 0 is a {block_fn.__name__}"):
            PrunedViT(model, KEEP_ALL)
    mapped = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="map",
                               **TINY)
    with pytest.raises(ConfigError, match="attention-pool"):
        PrunedViT(mapped, KEEP_ALL)
    with pytest.raises(ConfigError, match="not a timm VisionTransformer|got ResNet"):
        PrunedViT(timm.create_model("resnet18", pretrained=False), KEEP_ALL)


def test_config_errors(models: dict[str, nn.Module]) -> None:
    with pytest.raises(ConfigError, match=r"prune_blocks \[4\] outside"):
        PrunedViT(models["plain"], ViTConfig(prune_blocks=(1, 4)))
    with pytest.raises(ConfigError, match="needs a model with a class token"):
        PrunedViT(models["avg_no_cls"], ViTConfig(prune_blocks=(1,)))
    with pytest.raises(ConfigError, match="fc_norm"):
        PrunedViT(models["avg"], ViTConfig(prune_blocks=(), pooling="cls+mean"))
    with pytest.raises(ConfigError, match="batching"):
        PrunedViT(models["plain"], KEEP_ALL, batching="ragged")


@torch.no_grad()
def test_patch_keep_is_validated(models: dict[str, nn.Module]) -> None:
    w = PrunedViT(models["plain"], KEEP_ALL)
    with pytest.raises(ValueError, match=r"patch_keep must be \(2, 36\)"):
        w(images(2), torch.ones(2, 35, dtype=torch.bool))
    keep = torch.ones(2, 36, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(ValueError, match="keeps no patch"):
        w(images(2), keep)


def test_build_vit(tmp_path) -> None:
    cfg = ViTConfig(model="vit_small_patch16_224", model_kwargs=TINY)
    model = build_vit(cfg)
    assert not model.training and model.num_classes == 0
    with pytest.raises(ConfigError, match="vit.model: unknown timm model"):
        build_vit(ViTConfig(model="vit_nonexistent_model"))
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        build_vit(ViTConfig(model="resnet18"))
    with pytest.raises(CheckpointRefused, match=r"w\.pt: weights file not found"):
        build_vit(ViTConfig(model="vit_small_patch16_224", model_kwargs=TINY, weights="w.pt"))
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    seen = []
    build_vit(
        ViTConfig(model="vit_small_patch16_224", model_kwargs=TINY, weights=str(path)),
        load_weights=lambda m, p: seen.append(p),
    )
    assert seen == [str(path)]


# ------------------------------------------- where the weights come from, with the Hub off


UNI_TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hub_name_with_local_weights_builds_offline(tmp_path, offline: list) -> None:
    """The pipelines/uni.yaml pattern (hf-hub name, pretrained: true) plus a local file: the
    architecture comes from the known-models table, the local file is loaded, nothing
    downloads. A tiny UNI-shaped ViT stands in for UNI (same architecture, fewer blocks)."""
    torch.manual_seed(3)
    ref = timm.create_model(
        "vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
        dynamic_img_size=True, **UNI_TINY,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "uni.safetensors"
    save_safetensors(ref, path)
    cfg = ViTConfig(model="hf-hub:MahmoodLab/uni", pretrained=True, weights=str(path),
                    model_kwargs=UNI_TINY, prune_blocks=())
    torch.manual_seed(4)
    model = build_vit(cfg, load_weights=load_into)
    # LayerScale (init_values) and dynamic_img_size came from the table: the keys match
    assert _same_state(model, ref) and model.dynamic_img_size
    x = images(2, size=32)
    assert torch.equal(stock(model, x), stock(ref, x))
    # UNI's ImageNet normalisation, not timm's 0.5/0.5 for vit_large_patch16_224
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(data["std"]) == (0.229, 0.224, 0.225)
    assert offline == []


def test_hub_name_architecture_from_the_cache(tmp_path, offline: list) -> None:
    cfg_json = {
        "architecture": "vit_small_patch16_224",
        "model_args": {**TINY, "reg_tokens": 2},
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "tag": "x"},
    }
    cache_repo(tmp_path / "hf-cache", "someorg/tiny-vit", {"config.json": json.dumps(cfg_json)})
    ref = tiny(reg_tokens=2)
    path = tmp_path / "tiny.safetensors"
    save_safetensors(ref, path)
    model = build_vit(ViTConfig(model="hf-hub:someorg/tiny-vit", weights=str(path)))
    assert _same_state(model, ref) and model.num_reg_tokens == 2
    assert list(model.pretrained_cfg["mean"]) == [0.1, 0.2, 0.3]
    assert offline == []


def test_hub_name_without_local_weights_gives_a_clear_error(tmp_path, offline: list) -> None:
    with pytest.raises(CheckpointRefused) as info:
        build_vit(ViTConfig(model="hf-hub:MahmoodLab/uni", pretrained=True, model_kwargs=TINY))
    msg = str(info.value)
    assert "hf-hub:MahmoodLab/uni" in msg and "HF_HUB_OFFLINE" in msg
    assert "local safetensors file" in msg and "vit.weights" in msg
    assert type(info.value) is CheckpointRefused  # not a huggingface_hub exception
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False  # offline mode held only during the attempt
    with pytest.raises(CheckpointRefused, match="local safetensors file.*pretrained: true"):
        build_vit(ViTConfig(model="hf-hub:MahmoodLab/uni", pretrained=False))
    # timm weights of a plain timm name: only from the cache when the Hub is off
    with pytest.raises(CheckpointRefused, match="vit_small_patch16_224 needs the Hugging Face"):
        build_vit(ViTConfig(model="vit_small_patch16_224", pretrained=True, model_kwargs=TINY))
    # a hub model nobody knows offline, with a local file: name its architecture instead
    w = tmp_path / "w.safetensors"
    save_safetensors(tiny(), w)
    with pytest.raises(ConfigError, match="vit.model: hf-hub:someorg/other.*timm architecture"):
        build_vit(ViTConfig(model="hf-hub:someorg/other", weights=str(w)))
    assert offline == []


def test_local_weights_win_over_pretrained(tmp_path, offline: list) -> None:
    ref = tiny()
    path = tmp_path / "vit.safetensors"
    save_safetensors(ref, path)
    model = build_vit(ViTConfig(model="vit_small_patch16_224", pretrained=True,
                                weights=str(path), model_kwargs=TINY))
    assert _same_state(model, ref) and offline == []
