"""Safe weights loading: safetensors, weights_only pickles, refusals naming the file and keys."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from wsi_prune._files import file_sha256
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import load_into, load_state_dict, save_safetensors
from wsi_prune.models.hub import (
    ModelSource,
    create_from_source,
    hub_architecture,
    hub_offline,
    resolve_model_source,
)
from wsi_prune.models.sidecars import read_sidecar, sidecar_path, write_sidecar


class _Net(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("count", torch.tensor(7))


def _net(seed: int, hidden: int = 4) -> _Net:
    torch.manual_seed(seed)
    return _Net(hidden)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Exploit:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Payload:
    def __init__(self) -> None:
        self.w = torch.zeros(2)


# -- round trips ---------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path) -> None:
    src, dst = _net(0), _net(1)
    assert not _same(src, dst)
    path = tmp_path / "w.safetensors"
    save_safetensors(src, path, metadata={"model": "net"})
    load_into(dst, path)
    assert _same(src, dst)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"model": "net"}
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors(src, tmp_path / "x.safetensors", metadata={"epoch": 3})  # type: ignore


def test_tied_weights_are_saved(tmp_path) -> None:
    w = _net(0).fc.weight
    shared = {"a": w, "b": w, "view": w[:, :2]}  # one storage under three names, one strided
    save_safetensors(shared, tmp_path / "t.safetensors")
    state = load_state_dict(tmp_path / "t.safetensors")
    assert torch.equal(state["a"], state["b"]) and torch.equal(state["view"], w[:, :2])


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickled_state_dict_loads_with_weights_only(tmp_path, suffix: str) -> None:
    src, dst = _net(0), _net(1)
    path = tmp_path / f"w{suffix}"
    torch.save(src.state_dict(), path)
    load_into(dst, path)
    assert _same(src, dst)


def test_nested_and_dataparallel_checkpoints(tmp_path) -> None:
    src = _net(0)
    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}
    for i, ckpt in enumerate([
        {"state_dict": src.state_dict(), "epoch": 3, "best_auc": 0.9},
        {"model": {"state_dict": wrapped}, "optimizer": {"lr": torch.tensor(0.1)}},
        {"model_state_dict": wrapped, "step": 10},
        wrapped,
    ]):
        path = tmp_path / f"c{i}.pth"
        torch.save(ckpt, path)
        dst = _net(1)
        load_into(dst, path)
        assert _same(src, dst), ckpt.keys()


# -- refusals ------------------------------------------------------------------------------------
def test_pickled_code_is_refused_and_not_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(4, 3), "x": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointRefused, match=r"evil\.pth.*refused.*system") as info:
        load_state_dict(path)
    assert info.value.path == str(path)
    assert not marker.exists()


@pytest.mark.parametrize("obj,name", [
    (_Payload(), "_Payload"),
    (nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_pickled_objects_are_refused(tmp_path, obj: object, name: str) -> None:
    path = tmp_path / "obj.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointRefused, match=f"pickles the Python object .*{name}"):
        load_into(_net(0), path)


def test_missing_unknown_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(CheckpointRefused, match=r"nope\.safetensors: weights file not found"):
        load_into(_net(0), tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointRefused, match="unsupported weights format '.onnx'"):
        load_state_dict(tmp_path / "w.onnx")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointRefused, match=r"junk\.pth: corrupt"):
        load_state_dict(tmp_path / "junk.pth")
    good = tmp_path / "good.pth"
    torch.save(_net(0).state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointRefused, match=r"cut\.pth: corrupt or truncated"):
        load_state_dict(tmp_path / "cut.pth")
    save_safetensors(_net(0), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointRefused, match=r"cut\.safetensors: unreadable safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    torch.save({"lr": 0.1, "epochs": [1, 2]}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointRefused, match="not named tensors"):
        load_state_dict(tmp_path / "noweights.pth")
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointRefused, match="no tensors"):
        load_state_dict(tmp_path / "empty.pth")


def test_mismatched_keys_and_shapes_name_the_file_and_keys(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_safetensors(_net(0, hidden=5), path)
    with pytest.raises(CheckpointRefused) as info:
        load_into(_net(1, hidden=4), path)
    msg = str(info.value)
    assert str(path) in msg and "_Net" in msg
    assert "fc.weight: model (4, 3) vs file (5, 3)" in msg
    assert "head.weight: model (1, 4) vs file (1, 5)" in msg

    state = _net(0).state_dict()
    state["extra.bias"] = torch.zeros(2)
    del state["head.bias"]
    save_safetensors(state, path)
    dst = _net(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointRefused, match=r"1 missing key: head\.bias.*1 unexpected key: "
                                                 r"extra\.bias"):
        load_into(dst, path)
    # a refused load changes nothing
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    # non-strict loading takes what fits, but never a wrong shape
    load_into(dst, path, strict=False)
    assert torch.equal(dst.fc.weight, state["fc.weight"])
    assert torch.equal(dst.head.bias, before["head.bias"])


def test_many_missing_keys_are_summarised() -> None:
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(CheckpointRefused, match=r"12 missing keys: .*\(\+7 more\)"):
        load_into(big, {"x": torch.zeros(1)})


# -- model sources (no network) -----------------------------------------------------------------
def test_resolve_model_source_classification(tmp_path) -> None:
    src = resolve_model_source("vit_small_patch16_224", None, pretrained=False)
    assert src == ModelSource("vit_small_patch16_224", False, None) and not src.is_hub
    # timm download asked for a timm name: classified, not fetched
    assert resolve_model_source("resnet18", None, pretrained=True).pretrained

    w = tmp_path / "uni.safetensors"
    save_safetensors(_net(0), w)
    local = resolve_model_source("hf-hub:MahmoodLab/UNI", w, pretrained=True)
    assert local.is_hub and local.weights_path == str(w) and not local.pretrained
    # the architecture is known here, so the local copy builds without the Hub
    assert local.architecture == "vit_large_patch16_224"
    assert local.model_args["init_values"] == 1e-5 and local.model_args["dynamic_img_size"]

    hub = resolve_model_source("hf-hub:MahmoodLab/UNI", None, pretrained=True)
    assert hub.is_hub and hub.pretrained and hub.weights_path is None

    with pytest.raises(CheckpointRefused, match="Hugging Face Hub model.*pretrained: true"):
        resolve_model_source("hf-hub:MahmoodLab/UNI", None, pretrained=False)
    with pytest.raises(CheckpointRefused, match="not found"):
        resolve_model_source("vit_small_patch16_224", tmp_path / "missing.pth", pretrained=False)
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nonexistent'"):
        resolve_model_source("vit_nonexistent", None, pretrained=False)


def test_create_from_source_loads_local_weights(tmp_path) -> None:
    kwargs = {"num_classes": 0, "depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32,
              "patch_size": 16}
    torch.manual_seed(0)
    ref = create_from_source(ModelSource("vit_tiny_patch16_224", False, None), **kwargs)
    path = tmp_path / "vit.safetensors"
    save_safetensors(ref, path)
    torch.manual_seed(1)
    got = create_from_source(resolve_model_source("vit_tiny_patch16_224", path, False), **kwargs)
    assert _same(ref, got)
    with pytest.raises(TypeError):
        create_from_source(ModelSource("vit_tiny_patch16_224", False, None), no_such_arg=1)


def test_hub_offline_reads_the_environment_now(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub_offline()
    for value, off in [("1", True), ("yes", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is off, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_offline()


def _cached_config(cache, repo: str, text: str) -> None:
    commit = "1" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    (base / "snapshots" / commit / "config.json").write_text(text)


def test_hub_architecture_from_cache_table_or_refusal(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    # timm's legacy flat layout; a known model: the cached config wins over the table
    _cached_config(tmp_path, "MahmoodLab/UNI", json.dumps(
        {"architecture": "vit_large_patch16_224", "num_classes": 0, "mean": [0.5, 0.5, 0.5],
         "std": [0.5, 0.5, 0.5], "model_args": {"img_size": 256}}))
    arch, args, pcfg = hub_architecture("hf-hub:MahmoodLab/UNI")
    assert arch == "vit_large_patch16_224" and args["img_size"] == 256
    assert args["init_values"] == 1e-5  # from the table: UNI's config.json does not say it
    assert pcfg["mean"] == [0.5, 0.5, 0.5]
    # not cached but known; revisions are accepted
    assert hub_architecture("hf-hub:mahmoodlab/uni@main")[0] == "vit_large_patch16_224"
    _cached_config(tmp_path, "org/broken", "{not json")
    with pytest.raises(CheckpointRefused, match=r"config\.json: unreadable timm hub config"):
        hub_architecture("hf-hub:org/broken")
    _cached_config(tmp_path, "org/noarch", json.dumps({"pretrained_cfg": {}}))
    with pytest.raises(CheckpointRefused, match="unreadable timm hub config"):
        hub_architecture("hf-hub:org/noarch")
    with pytest.raises(ConfigError, match="org/unknown's config.json is not in the Hugging"):
        hub_architecture("hf-hub:org/unknown")


# -- sidecar configs and digests ----------------------------------------------------------------
def test_sidecar_round_trip_and_kind_check(tmp_path) -> None:
    w = tmp_path / "mil.safetensors"
    assert sidecar_path(w) == tmp_path / "mil.json"
    assert read_sidecar(w) is None
    write_sidecar(w, {"kind": "wsi-prune-mil", "in_dim": 8})
    assert read_sidecar(w, "wsi-prune-mil") == {"kind": "wsi-prune-mil", "in_dim": 8}
    with pytest.raises(CheckpointRefused, match=r"mil\.json.*kind 'wsi-prune-mil'.*scorer"):
        read_sidecar(w, "wsi-prune-scorer")
    (tmp_path / "mil.json").write_text("{broken")
    with pytest.raises(CheckpointRefused, match="unreadable model config"):
        read_sidecar(w)
    (tmp_path / "mil.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointRefused, match="JSON object"):
        read_sidecar(w)


def test_file_sha256(tmp_path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p, chunk_bytes=2) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(CheckpointRefused, match="cannot read"):
        file_sha256(tmp_path / "missing")
