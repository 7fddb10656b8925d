"""Tests of the analytic MAC counter against published tables and hook counts of real timm models.

Published "GFLOPs" are GMACs. Sources: DeiT (Touvron et al. 2021) dense; DynamicViT README
(T-PAMI version, predictor included); EViT Table (DeiT-S, fused token); ToMe off-the-shelf
DeiT-S. See the module docstring of ``wsi_prune.selection.macs`` for the convention.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from wsi_prune.errors import ConfigError
from wsi_prune.selection.macs import (
    PRESETS,
    ViTSpec,
    block_macs,
    cls_attention_macs,
    cnn_macs,
    patch_embed_macs,
    vit_macs,
)
from wsi_prune.selection.schedules import (
    dense_schedule,
    dynamicvit_predictor_macs,
    dynamicvit_schedule,
    evit_schedule,
    tome_schedule,
)

REL_TOL = 0.03
DEIT_S = ViTSpec.preset("deit_small")
DEIT_B = ViTSpec.preset("deit_base")


def gmacs(macs: int) -> float:
    return macs / 1e9


# ---------------------------------------------------------------- published tables


@pytest.mark.parametrize(("spec", "published"), [(DEIT_S, 4.6), (DEIT_B, 17.6)])
def test_dense_deit_matches_published(spec: ViTSpec, published: float) -> None:
    assert gmacs(vit_macs(spec)) == pytest.approx(published, rel=REL_TOL)
    assert vit_macs(spec, dense_schedule(spec)) == vit_macs(spec)


@pytest.mark.parametrize(("spec", "published"), [(DEIT_S, 2.9), (DEIT_B, 11.4)])
def test_dynamicvit_keep_07_matches_published(spec: ViTSpec, published: float) -> None:
    sched = dynamicvit_schedule(spec, 0.7)
    # Blocks 0-2 dense, then 137 / 96 / 67 patch tokens (+CLS) as DynamicViT's int(196·ρ^s).
    assert sched == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    # Convention: the README's 11.4 for DeiT-B counts the PredictorLG heads (fvcore over the
    # whole model): 11.48 with them; without them 11.06, near the NeurIPS paper's 11.2.
    total = vit_macs(spec, sched) + dynamicvit_predictor_macs(spec, 0.7)
    assert gmacs(total) == pytest.approx(published, rel=REL_TOL)


@pytest.mark.parametrize(
    ("keep", "published"), [(0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)]
)
def test_evit_deit_s_fused_matches_published(keep: float, published: float) -> None:
    sched = evit_schedule(DEIT_S, keep)
    assert gmacs(vit_macs(DEIT_S, sched)) == pytest.approx(published, rel=REL_TOL)


def test_evit_schedule_prunes_inside_block_with_one_fused_token() -> None:
    sched = evit_schedule(DEIT_S, 0.7)
    # Block 3 (1-based 4th): attention at 197, MLP at CLS + ceil(0.7·196)=138 + fused.
    assert sched[3] == (197, 140)
    # Next pruning counts the fused token among the patch tokens: ceil(0.7·139) + 1 = 99.
    assert sched[6] == (140, 100)
    assert sched[9] == (100, 72)
    assert all(a == m for i, (a, m) in enumerate(sched) if i not in (3, 6, 9))
    no_fuse = evit_schedule(DEIT_S, 0.7, fuse_token=False)
    assert no_fuse[3] == (197, 139)


@pytest.mark.parametrize(("r", "published"), [(8, 3.4), (13, 2.7), (16, 2.3)])
def test_tome_deit_s_matches_published(r: int, published: float) -> None:
    sched = tome_schedule(DEIT_S, r)
    assert gmacs(vit_macs(DEIT_S, sched)) == pytest.approx(published, rel=REL_TOL)
    # The other convention (whole block at N - i·r) misses the table: merging must sit
    # between attention and MLP.
    whole_block = [a for a, _ in sched]
    assert gmacs(vit_macs(DEIT_S, whole_block)) > published * (1 + REL_TOL)


def test_tome_schedule_caps_r_at_half_the_tokens() -> None:
    sched = tome_schedule(DEIT_S, 16)
    assert sched[0] == (197, 181)
    # Block 11 enters with 21 tokens; ToMe can merge at most (21 - 1) // 2 = 10.
    assert sched[11] == (21, 11)


# ---------------------------------------------------------------- per-block formula


def test_block_macs_terms() -> None:
    b = block_macs(DEIT_S, 197, 140)
    d = 384
    assert b.qkv == 3 * 197 * d * d
    assert b.attn_scores == b.attn_v == 197 * 197 * d
    assert b.proj == 197 * d * d
    assert b.mlp == 2 * 140 * d * 4 * d
    assert b.total == sum(b)
    swiglu = ViTSpec(embed_dim=64, depth=1, num_heads=2, swiglu=True, mlp_hidden_dim=128)
    assert block_macs(swiglu, 10).mlp == 3 * 10 * 64 * 128


def test_patch_embed_and_cls_attention() -> None:
    assert patch_embed_macs(DEIT_S) == 196 * 3 * 16 * 16 * 384
    assert cls_attention_macs(DEIT_S, 197) == 6 * 197 * 64
    dense = vit_macs(DEIT_S)
    assert vit_macs(DEIT_S, cls_attn_blocks=(3, 6)) == dense + 2 * 197 * 384
    assert vit_macs(DEIT_S, include_patch_embed=False) == dense - patch_embed_macs(DEIT_S)


def test_monotonic_in_tokens() -> None:
    n = DEIT_S.n_tokens
    counts = [block_macs(DEIT_S, k).total for k in range(1, n + 1)]
    assert all(a < b for a, b in zip(counts, counts[1:], strict=False))
    assert block_macs(DEIT_S, n, n - 10).total < block_macs(DEIT_S, n).total
    rhos = [0.3, 0.5, 0.7, 0.9, 1.0]
    dyn = [vit_macs(DEIT_S, dynamicvit_schedule(DEIT_S, r)) for r in rhos]
    assert all(a < b for a, b in zip(dyn, dyn[1:], strict=False))
    assert dyn[-1] == vit_macs(DEIT_S)
    evit = [vit_macs(DEIT_S, evit_schedule(DEIT_S, k)) for k in rhos]
    assert all(a < b for a, b in zip(evit, evit[1:], strict=False))
    tome = [vit_macs(DEIT_S, tome_schedule(DEIT_S, r)) for r in (0, 4, 8, 13, 16)]
    assert all(a > b for a, b in zip(tome, tome[1:], strict=False))
    assert tome[0] == vit_macs(DEIT_S)


def test_invalid_inputs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        ViTSpec(embed_dim=100, depth=2, num_heads=3)
    with pytest.raises(ConfigError, match="unknown ViT preset 'vit_huge'.*deit_small"):
        ViTSpec.preset("vit_huge")
    with pytest.raises(ConfigError, match="12 blocks"):
        vit_macs(DEIT_S, [197] * 11)
    with pytest.raises(ConfigError, match="grows"):
        vit_macs(DEIT_S, [100] + [197] * 11)
    with pytest.raises(ConfigError, match="n_mlp"):
        block_macs(DEIT_S, 10, 11)
    with pytest.raises(ConfigError, match="keep_ratio"):
        dynamicvit_schedule(DEIT_S, 1.5)
    with pytest.raises(ConfigError, match="prune blocks"):
        evit_schedule(DEIT_S, 0.7, prune_blocks=(6, 3))
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        ViTSpec.from_timm(nn.Linear(2, 2))


# ---------------------------------------------------------------- timm models


def _as_read(spec: ViTSpec, hidden: int) -> ViTSpec:
    """A preset as from_timm reports it: exact hidden width and the ratio it implies."""
    return dataclasses.replace(spec, mlp_hidden_dim=hidden, mlp_ratio=hidden / spec.embed_dim)


def _tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_from_timm_vit_small_equals_deit_small_preset() -> None:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert ViTSpec.from_timm(model) == _as_read(DEIT_S, 1536)


def test_from_timm_registers_and_swiglu_packed() -> None:
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=56,
        depth=2,
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
        mlp_ratio=4.0,
    )
    spec = ViTSpec.from_timm(model)
    assert spec.num_prefix_tokens == 5
    assert spec.swiglu
    # Packed fc1 384→1536 splits into gate and value: the gated width is 768.
    assert model.blocks[0].mlp.fc1.out_features == 1536
    assert spec.hidden_dim == 768
    assert (spec.patch_size, spec.img_size, spec.n_tokens) == (14, 56, 21)
    assert (spec.embed_dim, spec.depth, spec.num_heads) == (384, 2, 6)


def test_from_timm_foundation_model_presets_on_meta_device() -> None:
    # Built on the meta device: the real timm architectures, no memory, no weights.
    with torch.device("meta"):
        hopt = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=224)
        uni2 = timm.create_model(
            "vit_giant_patch14_224",
            pretrained=False,
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            mlp_layer=SwiGLUPacked,
            act_layer=nn.SiLU,
            reg_tokens=8,
            dynamic_img_size=True,
        )
        uni = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    assert ViTSpec.from_timm(hopt) == PRESETS["h_optimus_0"]
    assert ViTSpec.from_timm(uni2) == PRESETS["uni2_h"]
    assert ViTSpec.from_timm(uni) == _as_read(PRESETS["vit_large_patch16"], 4096)
    # timm's published count for vit_large_patch16_224 is 61.6 GMACs.
    assert gmacs(vit_macs(PRESETS["vit_large_patch16"])) == pytest.approx(61.6, rel=0.01)


class _HookCounter:
    """Counts Linear and Conv2d MACs and attention matmuls from the shapes seen in a forward."""

    def __init__(self, model: VisionTransformer) -> None:
        self.linear = 0
        self.attn = 0
        self.handles = []
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_hook(self._linear))
            elif isinstance(mod, nn.Conv2d):
                self.handles.append(mod.register_forward_hook(self._conv))
        for blk in model.blocks:
            self.handles.append(blk.attn.register_forward_pre_hook(self._attn))

    def _linear(self, mod, inp, out) -> None:
        self.linear += inp[0].numel() // mod.in_features * mod.in_features * mod.out_features

    def _conv(self, mod, inp, out) -> None:
        k = mod.kernel_size[0] * mod.kernel_size[1]
        self.linear += out.shape[2] * out.shape[3] * mod.out_channels * mod.in_channels * k

    def _attn(self, mod, args) -> None:
        _, n, d = args[0].shape
        # q·kᵀ per head: n·n·head_dim, attn·v the same; over heads: 2·n²·D.
        self.attn += 2 * n * n * d

    @property
    def total(self) -> int:
        return self.linear + self.attn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reg_tokens": 4, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": 4.0},
        {"reg_tokens": 2, "mlp_layer": SwiGLU, "act_layer": nn.SiLU, "mlp_ratio": 2.0},
        {"class_token": False, "reg_tokens": 1, "global_pool": "avg"},
    ],
    ids=["plain", "reg4-swiglu-packed", "reg2-swiglu", "no-cls"],
)
def test_dense_count_equals_hook_count_exactly(kw: dict) -> None:
    model = _tiny_vit(**kw)
    spec = ViTSpec.from_timm(model)
    counter = _HookCounter(model)
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 3, 32, 32))
    counter.close()
    assert vit_macs(spec) == counter.total
    assert spec.swiglu == ("mlp_layer" in kw)


def _run_pruned(model: VisionTransformer, sched: list[tuple[int, int]]) -> None:
    """Run the blocks keeping the first tokens: attention on n_attn, MLP on n_mlp."""
    x = model._pos_embed(model.patch_embed(torch.zeros(1, 3, 32, 32)))
    for blk, (n_attn, n_mlp) in zip(model.blocks, sched, strict=True):
        x = x[:, :n_attn]
        x = x + blk.ls1(blk.attn(blk.norm1(x)))
        x = x[:, :n_mlp]
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize("swiglu", [False, True])
def test_pruned_schedules_equal_hook_count_of_pruned_forward(swiglu: bool) -> None:
    kw = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "reg_tokens": 2} if swiglu else {}
    model = _tiny_vit(depth=4, **kw)
    spec = ViTSpec.from_timm(model)
    schedules = {
        "evit": evit_schedule(spec, 0.5, prune_blocks=(1, 2)),
        "tome": tome_schedule(spec, 3),
        "dynamicvit": [(n, n) for n in dynamicvit_schedule(spec, 0.6, prune_blocks=(1, 3))],
    }
    for name, sched in schedules.items():
        counter = _HookCounter(model)
        with torch.no_grad():
            _run_pruned(model, sched)
        counter.close()
        assert vit_macs(spec, sched) == counter.total, name
        assert vit_macs(spec, sched) < vit_macs(spec), name


# ---------------------------------------------------------------- CNN scorer


def test_cnn_macs_exact_on_handmade_net() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8x8 out: 64·8·3·9
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 64·8·1·9
        nn.Conv2d(8, 16, 1),  # 64·16·8
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),  # 80
    )
    net.train()
    expected = 64 * 8 * 3 * 9 + 64 * 8 * 9 + 64 * 16 * 8 + 16 * 5
    assert cnn_macs(net, (3, 16, 16)) == expected
    assert cnn_macs(net, (1, 3, 16, 16)) == expected
    assert net.training  # mode restored
    with pytest.raises(ConfigError, match="input_shape"):
        cnn_macs(net, (2, 3, 16, 16))


def test_cnn_macs_mobilenetv3_small_matches_timm() -> None:
    model = timm.create_model("mobilenetv3_small_100", pretrained=False)
    at_224 = cnn_macs(model, (3, 224, 224))
    # timm's results table: 0.06 GMACs for mobilenetv3_small_100 at 224 px.
    assert gmacs(at_224) == pytest.approx(0.06, rel=0.10)
    at_56 = cnn_macs(model, (3, 56, 56))
    # Convs scale with pixels (16x fewer); the 576->1024->1000 head and the
    # squeeze-excite FCs do not, so a 56 px tile costs between 1/16 and 1/8.
    assert at_224 / 16 < at_56 < at_224 / 8


def test_cnn_macs_counts_vit_linear_layers_on_meta_device() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    spec = ViTSpec.from_timm(model)
    attn_matmuls = spec.depth * 2 * spec.n_tokens**2 * spec.embed_dim
    assert cnn_macs(model, (3, 224, 224)) + attn_matmuls == vit_macs(spec)
