"""Mixed precision and device transfers, on the CPU (CI has no GPU): bf16 autocast really runs
and stays close to fp32, fp16 on CPU is fp32, CPU transfers copy nothing, and the models of a
run carry their device to every tensor they take."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_prune.config import RunConfig, ScorerConfig, ViTConfig
from wsi_prune.errors import ConfigError
from wsi_prune.models.accel import autocast, autocast_dtype, to_device
from wsi_prune.models.hub import known_model
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.models.scorer import build_scorer, score_tiles

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uni2h() -> nn.Module:
    """A tiny perturbed UNI2-h-shaped ViT (SwiGLU, SiLU, 8 registers, LayerScale)."""
    known = known_model("hf-hub:MahmoodLab/UNI2-h")
    torch.manual_seed(0)
    model = build_vit(ViTConfig(model=known.architecture, model_kwargs={
        **known.model_args, "depth": 3, "embed_dim": 48, "num_heads": 2, "img_size": 56}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _linear_dtypes(model: nn.Module, fn) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    handles = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("prune_blocks", [(), (1,)])
@torch.no_grad()
def test_bf16_autocast_on_cpu_is_close_to_fp32(uni2h: nn.Module, prune_blocks) -> None:
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    cfg = ViTConfig(prune_blocks=prune_blocks, keep_ratio=0.5)
    full = PrunedViT(uni2h, cfg)
    half = PrunedViT(uni2h, dataclasses.replace(cfg, precision="bf16"))
    ref = full(x)
    out = half(x)
    # the matmuls really ran in bf16 (and in fp32 without autocast)...
    assert _linear_dtypes(uni2h, lambda: half(x)) == {torch.bfloat16}
    assert _linear_dtypes(uni2h, lambda: full(x)) == {torch.float32}
    # ...and the embedding, float32 either way, stays within bf16's rounding of fp32: 0.3-0.5 %
    # per image with AVX-512 kernels; with AVX2 ones (ATEN_CPU_CAPABILITY=avx2, a CPU without
    # AVX-512) one image keeps another of two near-tied tokens and moves 2.9 %
    assert out.embedding.dtype == torch.float32
    assert not torch.equal(out.embedding, ref.embedding)
    rel = (out.embedding - ref.embedding).norm(dim=1) / ref.embedding.norm(dim=1)
    assert float(rel.median()) < 0.01 and float(rel.max()) < 0.05
    assert float(F.cosine_similarity(out.embedding, ref.embedding).min()) > 0.999
    # the CLS row that ranks tokens is computed in fp32: as many tokens are kept, nearly all
    # the same ones (its inputs went through bf16 blocks, so a near tie may go the other way)
    for a, b in zip(out.kept, ref.kept, strict=True):
        assert float((a == b).float().mean()) > 0.95
    assert torch.equal(out.tokens_per_image, ref.tokens_per_image)


@torch.no_grad()
def test_fp16_on_cpu_runs_in_fp32(uni2h: nn.Module, caplog) -> None:
    from wsi_prune.models import accel

    accel._warned.discard("cpu-fp16")
    caplog.set_level(logging.WARNING, logger="wsi_prune.models.accel")
    x = torch.randn(2, 3, 56, 56)
    ref = PrunedViT(uni2h, ViTConfig(prune_blocks=()))(x).embedding
    out = PrunedViT(uni2h, ViTConfig(prune_blocks=(), precision="fp16"))(x).embedding
    assert torch.equal(out, ref)
    assert "fp16 on CPU runs in fp32" in caplog.text


def test_autocast_dtypes_per_device() -> None:
    assert autocast_dtype("cpu", "fp32") is None and autocast_dtype("cuda:1", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype("cpu", "fp16") is None
    assert autocast_dtype("cuda", "bf16") is torch.bfloat16
    assert autocast_dtype("cuda:3", "fp16") is torch.float16
    assert autocast_dtype("mps", "fp16") is torch.float16
    with pytest.raises(ConfigError, match="precision must be fp32|bf16|fp16"):
        autocast_dtype("cpu", "tf32")
    lin = nn.Linear(4, 4)
    with autocast("cpu", "bf16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_scorer_bf16_scores_close_to_fp32() -> None:
    torch.manual_seed(0)
    scorer = build_scorer(ScorerConfig(), 16)
    tiles = np.random.default_rng(0).integers(0, 256, (6, 56, 56, 3), dtype=np.uint8)
    ref = score_tiles(scorer, tiles, 4)
    out = score_tiles(scorer, tiles, 4, precision="bf16")
    assert out.patch.dtype == torch.float32 and not torch.equal(out.patch, ref.patch)
    assert float((out.tile - ref.tile).abs().max()) < 0.01
    assert float(F.cosine_similarity(out.embedding, ref.embedding).min()) > 0.999


def test_to_device_on_cpu_copies_nothing() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    t = to_device(tiles, "cpu")
    assert t.data_ptr() == tiles.ctypes.data and t.dtype == torch.uint8
    assert to_device(tiles[:, ::2], "cpu").shape == (3, 4, 8, 3)  # non-contiguous: one copy
    meta = to_device(tiles, "meta")
    assert meta.device.type == "meta" and meta.shape == tiles.shape


def test_models_carry_their_device_to_inputs_and_the_slide_head() -> None:
    from wsi_prune.models.factory import build_models
    from wsi_prune.pipeline.stages import slide_head

    cfg = RunConfig().replace(
        tiling={"tile_px": 64},
        vit={"model_kwargs": dict(depth=2, embed_dim=32, num_heads=2, img_size=64),
             "prune_blocks": (1,), "precision": "bf16"})
    models = build_models(cfg, "cpu")
    assert models.device == "cpu"
    tiles = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = models.vit_input(tiles)
    want = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - models.vit_mean) \
        / models.vit_std
    # one multiply-add instead of the formula's four passes: equal up to float rounding
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous()
    assert torch.allclose(x, want, rtol=0, atol=1e-6)
    with torch.inference_mode():
        res = models.vit(x)
    assert res.embedding.dtype == torch.float32  # bf16 inside, float32 out
    prob, attention = slide_head(models, res.embedding.numpy())
    assert 0.0 <= prob <= 1.0 and attention.shape == (2,)


def _scorer_with_real_bn_statistics() -> nn.Module:
    """The default scorer with running statistics and affines drawn at random (a fresh model
    has mean 0, var 1, weight 1, bias 0, which folding would leave nearly unchanged)."""
    torch.manual_seed(3)
    scorer = build_scorer(ScorerConfig(), 14)
    gen = torch.Generator().manual_seed(4)
    for m in scorer.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    return scorer.eval()


def test_folded_batch_norms_score_as_the_model_does() -> None:
    from wsi_prune.models.accel import fuse_conv_bn, fused_for_inference

    scorer = _scorer_with_real_bn_statistics()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in scorer.modules())
    fused = fused_for_inference(scorer, (4, 3, 56, 56))
    assert fused is not scorer and n_bn > 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in scorer.modules()) == n_bn  # a copy
    tiles = np.random.default_rng(2).integers(0, 256, (9, 56, 56, 3), dtype=np.uint8)
    ref, out = score_tiles(scorer, tiles, 4), score_tiles(fused, tiles, 4)
    assert torch.allclose(out.patch, ref.patch, atol=1e-5)
    assert torch.allclose(out.tile, ref.tile, atol=1e-5)
    assert torch.allclose(out.embedding, ref.embedding, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out.embedding, ref.embedding)  # really another computation
    # a model whose batch norm is registered right after a convolution it does not follow
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.BatchNorm2d(4)
            self.b.running_mean.fill_(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(self.b(x.float()[:, :1].repeat(1, 4, 1, 1))[:, :3])

    model = Model().eval()
    assert fuse_conv_bn(Model()) == 1  # the pair is there by registration order ...
    assert fused_for_inference(model, (2, 3, 8, 8)) is model  # ... but folding changes it
