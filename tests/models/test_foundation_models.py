"""Pathology foundation models from local weight files, with the Hub switched off: config
strings for timm classes, every known hub model resolved offline (real shapes on the meta
device, tiny copies built and loaded), mismatch messages, per-model normalisation, and one
pipeline config per family. Keep-all exactness per family: tests/models/test_pruned_vit.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from timm.layers import SwiGLUPacked
from torch import nn

from tests._hub import cache_repo
from tests._paths import REPO
from wsi_prune.config import RunConfig, ViTConfig, load_config
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import save_safetensors
from wsi_prune.models.hub import (
    HUB_PREFIX,
    KNOWN_HUB_MODELS,
    canonical_hub_name,
    hub_architecture,
    known_model,
)
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.models.timm_args import resolve_timm_kwargs
from wsi_prune.selection.macs import ViTSpec

# Published sizes (model cards and papers): width, blocks, patch tokens at 224 px, prefix
# tokens (CLS + registers), gated MLP width (None: plain MLP), parameters in millions.
REAL = {
    "mahmoodlab/uni": (1024, 24, 196, 1, None, 303),
    "mahmoodlab/uni2-h": (1536, 24, 256, 9, 4096, 681),
    "paige-ai/virchow": (1280, 32, 256, 1, 3416, 631),
    "paige-ai/virchow2": (1280, 32, 256, 5, 3416, 631),
    "bioptimus/h-optimus-0": (1536, 40, 256, 5, 4096, 1135),
    "bioptimus/h-optimus-1": (1536, 40, 256, 5, 4096, 1135),
    "prov-gigapath/prov-gigapath": (1536, 40, 196, 1, 4096, 1135),
}
FAMILY_YAMLS = ("uni2h.yaml", "virchow2.yaml", "hoptimus.yaml", "gigapath.yaml")
_HUB_WORDS = re.compile(r"Hugging Face Hub|HF_TOKEN|huggingface-cli login|network", re.I)


pytestmark = pytest.mark.usefixtures("one_thread")


def shrink(arch: str, args: dict) -> dict:
    """Tiny overrides of a foundation architecture: 2 blocks, 48 wide, a 4x4 patch grid."""
    with torch.device("meta"):
        patch = timm.create_model(arch, **resolve_timm_kwargs(args)).patch_embed.patch_size[0]
    return dict(depth=2, embed_dim=48, num_heads=2, img_size=4 * patch)


def tiny_weights(path: Path, arch: str, args: dict, seed: int = 0) -> nn.Module:
    """A perturbed tiny model of ``arch`` saved to ``path`` (what a local copy would hold)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **resolve_timm_kwargs(args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_safetensors(model, path)
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def card_embedding(model: nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    with torch.no_grad():
        if pooling == "cls+mean":
            t = model(x)
            return torch.cat([t[:, 0], t[:, model.num_prefix_tokens:].mean(1)], -1)
        return model.forward_head(model.forward_features(x), pre_logits=True)


# ------------------------------------------------------------------ config strings


def test_config_strings_resolve_to_the_cards_classes() -> None:
    out = resolve_timm_kwargs({"mlp_layer": "swiglu_packed", "act_layer": "SiLU", "depth": 2})
    assert out == {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "depth": 2}
    assert resolve_timm_kwargs({"mlp_layer": SwiGLUPacked})["mlp_layer"] is SwiGLUPacked
    with pytest.raises(ConfigError, match=r"mlp_layer: unknown name 'swiglu_pakced' \(known: "
                                          r"mlp, swiglu, swiglu_packed\)"):
        resolve_timm_kwargs({"mlp_layer": "swiglu_pakced"})
    with pytest.raises(ConfigError, match="vit.model: model_kwargs.act_layer: unknown name"):
        build_vit(ViTConfig(model="vit_small_patch16_224",
                            model_kwargs={"act_layer": "swishy", "depth": 1}))


def test_strings_build_the_same_network_as_classes(tmp_path: Path) -> None:
    """The YAML spelling builds exactly what the card's Python builds, and the config still
    round-trips through YAML with the same hash (it holds only strings)."""
    kw = dict(depth=2, embed_dim=48, num_heads=2, img_size=56, reg_tokens=4, mlp_ratio=5.3375,
              init_values=1e-5, global_pool="")
    torch.manual_seed(1)
    card = timm.create_model("vit_huge_patch14_224", num_classes=0, mlp_layer=SwiGLUPacked,
                             act_layer=nn.SiLU, **kw).eval()
    cfg = RunConfig().replace(vit={"model": "vit_huge_patch14_224", "pooling": "cls+mean",
                                   "model_kwargs": {**kw, "mlp_layer": "swiglu_packed",
                                                    "act_layer": "silu"}})
    torch.manual_seed(1)
    built = build_vit(cfg.vit)
    assert same_state(built, card)
    assert type(built.blocks[0].mlp).__name__ == "GluMlp"
    assert isinstance(built.blocks[0].mlp.act, nn.SiLU)
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(card_embedding(built, x, "cls+mean"), card_embedding(card, x, "cls+mean"))
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(tmp_path / "c.yaml").hash() == cfg.hash()


# ------------------------------------------------------------------ known models, offline


@pytest.mark.parametrize("repo", sorted(KNOWN_HUB_MODELS))
def test_known_model_real_shapes(repo: str) -> None:
    """The table's arguments give the published architecture (built on the meta device: no
    memory, no init): width, depth, tokens, registers, gated width, parameter count."""
    known = KNOWN_HUB_MODELS[repo]
    with torch.device("meta"):
        model = timm.create_model(known.architecture, pretrained=False,
                                  **resolve_timm_kwargs(known.model_args))
    spec = ViTSpec.from_timm(model)
    dim, depth, patches, prefix, gated, mparams = REAL[repo]
    assert (spec.embed_dim, spec.depth, spec.n_patches, spec.num_prefix_tokens) == \
        (dim, depth, patches, prefix)
    assert spec.swiglu == (gated is not None)
    assert spec.hidden_dim == (gated or 4 * dim)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == mparams
    assert known.repo.lower() == repo
    assert (known.pooling == "cls+mean") == ("virchow" in repo)


@pytest.mark.parametrize("repo", sorted(KNOWN_HUB_MODELS))
def test_every_known_model_builds_offline_from_a_local_file(tmp_path, offline: list,
                                                            repo: str) -> None:
    """hf-hub name + local file, Hub off and sockets refused: the architecture comes from the
    table, the file loads, the normalisation is the card's, and keep-all PrunedViT equals the
    card's embedding."""
    known = KNOWN_HUB_MODELS[repo]
    small = shrink(known.architecture, known.model_args)
    path = tmp_path / "w.safetensors"
    ref = tiny_weights(path, known.architecture, {**known.model_args, **small, "num_classes": 0})
    name = f"{HUB_PREFIX}{known.repo}"
    cfg = ViTConfig(model=name, weights=str(path), model_kwargs=small, pooling=known.pooling,
                    prune_blocks=())
    model = build_vit(cfg)
    assert same_state(model, ref)
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["mean"]) == tuple(known.pretrained_cfg["mean"])
    assert tuple(data["std"]) == tuple(known.pretrained_cfg["std"])
    x = torch.randn(2, 3, small["img_size"], small["img_size"])
    with torch.no_grad():
        out = PrunedViT(model, cfg)(x).embedding
    assert (out - card_embedding(ref, x, known.pooling)).abs().max() < 1e-5
    assert offline == []


def test_hub_name_spellings() -> None:
    assert canonical_hub_name("hf_hub:prov-gigapath/prov-gigapath") == \
        "hf-hub:prov-gigapath/prov-gigapath"
    assert known_model("hf_hub:Prov-GigaPath/Prov-GigaPath@main").architecture == \
        "vit_giant_patch14_dinov2"
    assert known_model("hf-hub:MahmoodLab/UNI2-h").model_args["reg_tokens"] == 8
    assert known_model("vit_large_patch16_224") is None
    assert hub_architecture("hf_hub:bioptimus/H-optimus-0")[2]["mean"][0] == 0.707223


# Virchow2's config.json as the Hub serves it: no MLP classes (its card passes them in code).
VIRCHOW2_JSON = {
    "architecture": "vit_huge_patch14_224",
    "model_args": {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
                   "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True},
    "pretrained_cfg": {"tag": "virchow_v2", "input_size": [3, 224, 224],
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}


def test_cached_config_json_is_completed_by_the_table(tmp_path, offline: list) -> None:
    """Virchow2's real config.json in the cache lacks the MLP classes: with a local file, and
    with pretrained: true answered from the cache, the table supplies them (as the card's
    code does), so the weights fit."""
    small = shrink("vit_huge_patch14_224", {**VIRCHOW2_JSON["model_args"], "mlp_layer":
                                            "swiglu_packed", "act_layer": "silu"})
    path = tmp_path / "v2.safetensors"
    ref = tiny_weights(path, "vit_huge_patch14_224", {**VIRCHOW2_JSON["model_args"], **small,
                                                      "mlp_layer": "swiglu_packed",
                                                      "act_layer": "silu"})
    cache_repo(tmp_path / "hf-cache", "paige-ai/Virchow2",
                {"config.json": json.dumps(VIRCHOW2_JSON), "model.safetensors": path.read_bytes()})
    arch, args, pcfg = hub_architecture("hf-hub:paige-ai/Virchow2")
    assert arch == "vit_huge_patch14_224" and args["reg_tokens"] == 4
    assert (args["mlp_layer"], args["act_layer"]) == ("swiglu_packed", "silu")  # from the table
    for cfg in (ViTConfig(model="hf-hub:paige-ai/Virchow2", weights=str(path),
                          model_kwargs=small, pooling="cls+mean"),
                ViTConfig(model="hf-hub:paige-ai/Virchow2", pretrained=True,
                          model_kwargs=small, pooling="cls+mean")):
        assert same_state(build_vit(cfg), ref), cfg
    assert offline == []


# ------------------------------------------------------------------ mismatches


def test_local_file_mismatch_names_shapes_keys_and_likely_kwargs(tmp_path, offline) -> None:
    """A UNI2-h-shaped file into the wrong architecture: a mismatch (model vs file shapes, a
    few keys, the model_kwargs to fix), never a Hub or token problem."""
    known = known_model("hf-hub:MahmoodLab/UNI2-h")
    small = shrink(known.architecture, known.model_args)
    path = tmp_path / "uni2h.safetensors"
    tiny_weights(path, known.architecture, {**known.model_args, **small})
    plain = {k: v for k, v in known.model_args.items() if k not in ("mlp_layer", "act_layer")}
    with pytest.raises(CheckpointRefused) as info:
        build_vit(ViTConfig(model=known.architecture, weights=str(path),
                            model_kwargs={**plain, **small}))
    msg = str(info.value)
    assert "uni2h.safetensors" in msg and "weights do not match VisionTransformer" in msg
    # a plain MLP of the same ratio has the packed fc1's shape; fc2 takes half of it in SwiGLU
    assert "2 shape mismatches: blocks.0.mlp.fc2.weight: model (48, 256) vs file (48, 128)" \
        in msg
    assert "mlp_layer: swiglu_packed, act_layer: silu" in msg
    assert not _HUB_WORDS.search(msg)
    # LayerScale and registers the model lacks: unexpected keys, and the kwargs named
    bare = {k: v for k, v in plain.items() if k not in ("init_values", "reg_tokens")}
    with pytest.raises(CheckpointRefused) as info:
        build_vit(ViTConfig(model=known.architecture, weights=str(path),
                            model_kwargs={**known.model_args, **bare, **small,
                                          "init_values": None, "reg_tokens": 0}))
    msg = str(info.value)
    assert "5 unexpected keys: blocks.0.ls1.gamma, blocks.0.ls2.gamma" in msg
    assert "reg_token" in msg
    assert "set init_values" in msg and "set reg_tokens" in msg
    assert not _HUB_WORDS.search(msg) and offline == []


def test_cached_pretrained_mismatch_is_not_a_hub_problem(tmp_path, offline: list) -> None:
    """pretrained: true answered from the HF cache, with arguments that do not fit the cached
    weights: reported as a mismatch, not as 'could not get it from the Hub, log in'."""
    args = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, init_values=1e-5)
    weights = tmp_path / "model.safetensors"
    ref = tiny_weights(weights, "vit_small_patch16_224", {**args, "num_classes": 0})
    cache_repo(tmp_path / "hf-cache", "someorg/tiny-path-fm", {
        "config.json": json.dumps({"architecture": "vit_small_patch16_224", "model_args": args,
                                   "pretrained_cfg": {"mean": [0.1, 0.2, 0.3],
                                                      "std": [0.4, 0.5, 0.6]}}),
        "model.safetensors": weights.read_bytes()})
    model = build_vit(ViTConfig(model="hf-hub:someorg/tiny-path-fm", pretrained=True))
    assert same_state(model, ref)
    with pytest.raises(CheckpointRefused) as info:
        build_vit(ViTConfig(model="hf-hub:someorg/tiny-path-fm", pretrained=True,
                            model_kwargs={"mlp_layer": "swiglu_packed", "act_layer": "silu"}))
    msg = str(info.value)
    assert msg.startswith("hf-hub:someorg/tiny-path-fm: pretrained weights do not match")
    assert "blocks.0.mlp.fc2.weight: model (32, 64) vs file (32, 128)" in msg
    assert "swiglu_packed" in msg and not _HUB_WORDS.search(msg)
    assert offline == []


# ------------------------------------------------------------------ normalisation, precision keys


def test_vit_mean_std_and_precision_keys(tmp_path: Path) -> None:
    cfg = ViTConfig(model="vit_small_patch16_224", mean=[0.7, 0.6, 0.7], std=(0.2, 0.2, 0.2),
                    model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, img_size=32))
    assert cfg.mean == (0.7, 0.6, 0.7)  # lists from YAML become tuples (hashable, frozen)
    data = timm.data.resolve_data_config({}, model=build_vit(cfg))
    assert tuple(data["mean"]) == (0.7, 0.6, 0.7) and tuple(data["std"]) == (0.2, 0.2, 0.2)
    for bad, match in [(dict(mean=[0.5, 0.5]), "vit.mean must be 3 numbers"),
                       (dict(std=[0.2, 0.0, 0.2]), "vit.std must be > 0"),
                       (dict(mean="grey"), "vit.mean must be 3 numbers"),
                       (dict(precision="fp64"), "vit.precision must be fp32|bf16|fp16")]:
        with pytest.raises(ConfigError, match=match):
            ViTConfig(**bad)
    with pytest.raises(ConfigError, match="scorer.precision"):
        RunConfig.from_dict({"scorer": {"precision": "int8"}})
    # at their defaults the new keys leave every run's identity as it was
    base = RunConfig()
    assert base.replace(vit={"precision": "fp32", "mean": None}).hash() == base.hash()
    assert base.replace(vit={"precision": "bf16"}).hash() != base.hash()
    assert base.replace(scorer={"precision": "bf16"}).hash() != base.hash()


# ------------------------------------------------------------------ pipelines/*.yaml


PIPELINES = sorted(p.name for p in (REPO / "pipelines").glob("*.yaml"))


def test_a_pipeline_per_family() -> None:
    assert set(FAMILY_YAMLS) <= set(PIPELINES)
    for name in FAMILY_YAMLS:
        text = (REPO / "pipelines" / name).read_text()
        cfg = load_config(REPO / "pipelines" / name)
        assert "https://huggingface.co/" in text and "PLACEHOLDER" in text, name
        assert cfg.vit.weights and cfg.vit.weights.startswith("/models/"), name
        assert known_model(cfg.vit.model) is not None, name


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_builds_its_vit_offline(tmp_path, offline: list, name: str) -> None:
    """Every pipelines/*.yaml: its ViT resolves without the network, its real architecture
    takes the configured tiles, its pooling and normalisation are the card's, a missing
    weights file stops with a clear error, and a tiny copy of the architecture (same family)
    builds from a local file and runs pruned as configured."""
    from wsi_prune.models.factory import build_models

    cfg = load_config(REPO / "pipelines" / name)
    vit = cfg.vit
    known = known_model(vit.model)
    if known is not None:
        arch, args, pcfg = hub_architecture(vit.model)
        assert vit.pooling == known.pooling, name
        for key in ("mean", "std"):
            if getattr(vit, key) is not None:
                assert getattr(vit, key) == tuple(pcfg[key]), name
    else:
        assert not vit.model.startswith(HUB_PREFIX), name
        arch, args = vit.model, {}
    args = {**args, **vit.model_kwargs, "num_classes": 0}
    with torch.device("meta"):
        real = timm.create_model(arch, **resolve_timm_kwargs(args))
    assert tuple(real.patch_embed.img_size) == (cfg.tiling.tile_px,) * 2, name
    assert max(vit.prune_blocks, default=0) < len(real.blocks), name
    if vit.weights:  # the placeholder: the run stops before any slide, naming the file
        with pytest.raises(CheckpointRefused, match="weights file not found"):
            build_models(cfg)
    small = shrink(arch, args)
    path = tmp_path / "tiny.safetensors"
    ref = tiny_weights(path, arch, {**args, **small})
    tiny_cfg = cfg.vit.__class__(**{**vit.__dict__, "weights": str(path),
                                    "model_kwargs": {**vit.model_kwargs, **small},
                                    "prune_blocks": (1,) if vit.prune_blocks else ()})
    model = build_vit(tiny_cfg)
    assert same_state(model, ref)
    x = torch.randn(2, 3, small["img_size"], small["img_size"])
    with torch.no_grad():
        out = PrunedViT(model, tiny_cfg)(x)
    assert out.embedding.shape == (2, model.num_features * (2 if vit.pooling == "cls+mean"
                                                            else 1))
    assert offline == []
