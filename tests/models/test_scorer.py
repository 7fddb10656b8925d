"""The CNN triage scorer: patch maps on the ViT grid, tile pooling, batched streaming inference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr

from wsi_prune.config import ScorerConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models import scorer as scorer_mod
from wsi_prune.models.checkpoints import save_safetensors
from wsi_prune.models.scorer import (
    PatchScorer,
    build_scorer,
    pool_patch_map,
    register_scorer,
    score_tiles,
    to_input,
    trained_scorer_config,
)
from wsi_prune.models.sidecars import write_sidecar

CNNS = ["mobilenetv3_small_100", "resnet18"]


def _tiles(n: int, side: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and many times faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_scorer(ScorerConfig(), 14)


# -- shapes and the ViT grid ------------------------------------------------------------------
@pytest.mark.parametrize("model", CNNS)
@pytest.mark.parametrize("grid", [14, 16])
def test_patch_map_is_on_the_vit_grid(model: str, grid: int) -> None:
    torch.manual_seed(0)
    sc = build_scorer(ScorerConfig(model=model), grid)
    out = score_tiles(sc, _tiles(5), batch_size=4, threads=1)
    assert out.patch.shape == (5, grid, grid)
    assert out.tile.shape == (5,)
    assert out.embedding.shape == (5, sc.embed_dim)
    assert out.embedding.shape[1] == {"mobilenetv3_small_100": 576, "resnet18": 512}[model]
    assert out.patch.dtype == torch.float32
    assert float(out.patch.min()) >= 0.0 and float(out.patch.max()) <= 1.0
    # default pooling is max
    torch.testing.assert_close(out.tile, out.patch.flatten(1).amax(1))


@pytest.mark.parametrize("corner", ["top-left", "top-right", "bottom-left"])
def test_patch_map_orientation_follows_the_tile(corner: str) -> None:
    """A dark square in one corner of the coarse tile changes the map in that corner: rows are
    tile rows (top first), columns tile columns, nothing is transposed or flipped."""
    torch.manual_seed(0)
    # stride-4 features of a 56 px tile are 14x14: receptive fields stay local
    sc = build_scorer(ScorerConfig(feature_levels=(1,)), 14)
    base = np.full((1, 56, 56, 3), 225, np.uint8)
    spot = base.copy()
    r0 = 0 if corner.startswith("top") else 42
    c0 = 42 if corner.endswith("right") else 0
    spot[0, r0:r0 + 14, c0:c0 + 14] = (60, 30, 110)
    ref = score_tiles(sc, base, 1).patch[0]
    diff = (score_tiles(sc, spot, 1).patch[0] - ref).abs()
    pr, pc = r0 // 4, c0 // 4  # the spot covers patches [pr, pr + 4) x [pc, pc + 4)
    assert float(diff[pr:pr + 4, pc:pc + 4].sum()) > 1e-2
    # Beyond the receptive field's reach (2 patches around the spot) the map barely moves
    # (mobilenet's squeeze-excitation pools globally, so not exactly 0).
    near = torch.zeros_like(diff, dtype=torch.bool)
    near[max(0, pr - 2):pr + 6, max(0, pc - 2):pc + 6] = True
    assert float(diff[~near].max()) < 0.01 * float(diff[near].max())
    r, c = divmod(int(diff.argmax()), 14)
    assert abs(r - (pr + 1.5)) <= 3 and abs(c - (pc + 1.5)) <= 3


def test_coarse_maps_resample_to_the_grid() -> None:
    """Finer maps are block-averaged onto G×G; coarser ones (7×7 from a 56 px tile at stride 8)
    are interpolated, keeping a constant constant and a step monotone in place."""
    fine = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28)
    got = scorer_mod._to_grid(fine, 14)
    want = fine.view(1, 1, 14, 2, 14, 2).mean(dim=(3, 5))
    torch.testing.assert_close(got, want)
    const = torch.full((1, 1, 7, 7), 0.3)
    torch.testing.assert_close(scorer_mod._to_grid(const, 14), torch.full((1, 1, 14, 14), 0.3))
    step = torch.zeros(1, 1, 7, 7)
    step[..., 4:] = 1.0  # columns 4-6 of 7 cover tile columns [32, 56) px: patches 8-13 of 14
    up = scorer_mod._to_grid(step, 14)[0, 0]
    assert torch.all(up[:, :7] < 0.5) and torch.all(up[:, 9:] > 0.5)
    assert torch.all(up[:, 1:] >= up[:, :-1])


# -- tile pooling --------------------------------------------------------------------------------
def test_pool_patch_map_numbers() -> None:
    patch = torch.tensor([[[0.1, 0.9], [0.5, 0.3]], [[0.2, 0.2], [0.2, 0.2]]])
    torch.testing.assert_close(pool_patch_map(patch, "max"), torch.tensor([0.9, 0.2]))
    torch.testing.assert_close(pool_patch_map(patch, "mean"), torch.tensor([0.45, 0.2]))
    torch.testing.assert_close(pool_patch_map(patch, "topk", 2), torch.tensor([0.7, 0.2]))
    torch.testing.assert_close(pool_patch_map(patch, "topk", 3), torch.tensor([1.7 / 3, 0.2]))
    # k is clamped to G*G: top-100 of 4 patches is their mean
    torch.testing.assert_close(pool_patch_map(patch, "topk", 100), torch.tensor([0.45, 0.2]))
    with pytest.raises(ConfigError, match="pooling"):
        pool_patch_map(patch, "median")


@pytest.mark.parametrize("pooling,topk", [("mean", 8), ("topk", 5)])
def test_scorer_uses_configured_pooling(pooling: str, topk: int) -> None:
    torch.manual_seed(0)
    sc = build_scorer(ScorerConfig(pooling=pooling, topk=topk), 14)
    out = score_tiles(sc, _tiles(3), 8)
    torch.testing.assert_close(out.tile, pool_patch_map(out.patch, pooling, topk))
    flat = out.patch.flatten(1)
    assert torch.all(flat.amax(1) >= out.tile) and torch.all(out.tile >= flat.mean(1) - 1e-6)


# -- batching, channels-last, threads, streaming --------------------------------------------
def test_batches_equal_one_big_batch(mobilenet: torch.nn.Module) -> None:
    tiles = _tiles(11)
    one = score_tiles(mobilenet, tiles, batch_size=11)
    for bs in (1, 3, 4):
        split = score_tiles(mobilenet, tiles, batch_size=bs)
        torch.testing.assert_close(split.patch, one.patch, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(split.tile, one.tile, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(split.embedding, one.embedding, atol=1e-5, rtol=1e-4)


def test_uint8_and_float_inputs_agree(mobilenet: torch.nn.Module) -> None:
    tiles = _tiles(4)
    x = to_input(tiles)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 56, 56)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert float(x.max()) <= 1.0
    with torch.inference_mode():
        a = mobilenet(x)
        b = mobilenet(torch.from_numpy(tiles).permute(0, 3, 1, 2))
    torch.testing.assert_close(a.patch, b.patch, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        to_input(tiles.astype(np.float32))


def test_model_and_batches_are_channels_last(mobilenet: torch.nn.Module) -> None:
    conv = next(m for m in mobilenet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = mobilenet.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    try:
        score_tiles(mobilenet, _tiles(5), batch_size=2)
    finally:
        hook.remove()
    assert seen == [True, True, True]


def test_threads_set_during_and_restored_after(mobilenet: torch.nn.Module) -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    during = []
    score_tiles(mobilenet, _tiles(4), 2, threads=wanted,
                progress=lambda done, total: during.append((done, total, torch.get_num_threads())))
    assert during == [(2, 4, wanted), (4, 4, wanted)]
    assert torch.get_num_threads() == before

    def boom(done: int, total: int) -> None:
        raise RuntimeError("stop")

    mobilenet.train()
    with pytest.raises(RuntimeError, match="stop"):
        score_tiles(mobilenet, _tiles(4), 2, threads=wanted, progress=boom)
    assert torch.get_num_threads() == before
    assert mobilenet.training  # its mode is restored too, even on error
    mobilenet.eval()


class _CountingReads:
    """A real Zarr array that records how many tiles each read asked for."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr, self.reads = arr, []
        self.shape, self.dtype = arr.shape, arr.dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        out = self.arr[key]
        self.reads.append(len(out))
        return out


def test_streams_a_zarr_array_in_batches(tmp_path, mobilenet: torch.nn.Module) -> None:
    tiles = _tiles(10, seed=3)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = group.create_array("coarse", shape=tiles.shape, chunks=(1, 56, 56, 3),
                             shards=(5, 56, 56, 3), dtype="uint8")
    arr[:] = tiles
    reader = _CountingReads(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["coarse"])
    streamed = score_tiles(mobilenet, reader, batch_size=4)
    assert reader.reads == [4, 4, 2]
    in_memory = score_tiles(mobilenet, tiles, batch_size=10)
    torch.testing.assert_close(streamed.patch, in_memory.patch, atol=1e-5, rtol=1e-4)


def test_empty_and_bad_inputs(mobilenet: torch.nn.Module) -> None:
    empty = score_tiles(mobilenet, np.zeros((0, 56, 56, 3), np.uint8), 8)
    assert empty.patch.shape == (0, 14, 14) and len(empty) == 0
    with pytest.raises(ValueError, match="uint8"):
        score_tiles(mobilenet, np.zeros((2, 56, 56, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(N, h, w, 3\)"):
        score_tiles(mobilenet, np.zeros((2, 56, 56), np.uint8), 8)
    with pytest.raises(ValueError, match="batch_size"):
        score_tiles(mobilenet, _tiles(2), 0)


def test_unknown_model_and_bad_grid() -> None:
    with pytest.raises(ConfigError, match="no_such_cnn"):
        build_scorer(ScorerConfig(model="no_such_cnn"), 14)
    with pytest.raises(ConfigError, match="grid"):
        PatchScorer(ScorerConfig(), 0)


# -- registry ------------------------------------------------------------------------------------
def test_registered_scorer_is_built_by_name() -> None:
    name = "test_constant_scorer"

    class Constant(torch.nn.Module):
        def __init__(self, grid: int) -> None:
            super().__init__()
            self.grid, self.embed_dim = grid, 2
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> scorer_mod.ScorerOutput:
            b = x.shape[0]
            patch = torch.full((b, self.grid, self.grid), 0.25) + self.w
            return scorer_mod.ScorerOutput(patch, patch.flatten(1).amax(1), torch.zeros(b, 2))

    register_scorer(name)(lambda cfg, grid: Constant(grid))
    try:
        assert name in scorer_mod.list_scorers()
        with pytest.raises(ValueError, match="already registered"):
            register_scorer(name)(lambda cfg, grid: Constant(grid))
        sc = build_scorer(ScorerConfig(model=name), 16)
        out = score_tiles(sc, _tiles(3), 2)
        assert out.patch.shape == (3, 16, 16)
        torch.testing.assert_close(out.tile, torch.full((3,), 0.25))
    finally:
        scorer_mod.SCORERS.unregister(name)


# -- weights -------------------------------------------------------------------------------------
def test_weights_round_trip_through_build_scorer(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = ScorerConfig(model="resnet18", feature_levels=(2, 3), head_channels=16)
    trained = build_scorer(cfg, 14)
    path = tmp_path / "scorer.safetensors"
    save_safetensors(trained, path)
    torch.manual_seed(2)
    loaded = build_scorer(dataclasses.replace(cfg, weights=str(path)), 14)
    tiles = _tiles(3)
    torch.testing.assert_close(score_tiles(loaded, tiles, 3).patch,
                               score_tiles(trained, tiles, 3).patch)
    other = dataclasses.replace(cfg, head_channels=8, weights=str(path))
    with pytest.raises(CheckpointRefused, match=r"scorer\.safetensors.*shape mismatch.*lateral"):
        build_scorer(other, 14)


def test_sidecar_config_is_checked_and_applied(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = ScorerConfig(model="resnet18", feature_levels=(2, 4), head_channels=16)
    path = tmp_path / "sc.safetensors"
    save_safetensors(build_scorer(cfg, 16), path)
    write_sidecar(path, {"kind": "wsi-prune-scorer", "model": "resnet18",
                         "feature_levels": [2, 4], "head_channels": 16, "grid": 16})
    # the run's config says mobilenet: the sidecar names what to change
    with pytest.raises(CheckpointRefused, match=r"model='resnet18' \(config: 'mobilenetv3"):
        build_scorer(ScorerConfig(weights=str(path)), 16)
    with pytest.raises(CheckpointRefused, match=r"grid=16 \(config: 14\)"):
        build_scorer(dataclasses.replace(cfg, weights=str(path)), 14)
    fixed, grid = trained_scorer_config(str(path), ScorerConfig(batch_size=7, pooling="mean"))
    assert (fixed.model, fixed.feature_levels, fixed.head_channels, grid) == (
        "resnet18", (2, 4), 16, 16)
    assert (fixed.batch_size, fixed.pooling, fixed.weights) == (7, "mean", str(path))
    assert build_scorer(fixed, grid).grid == 16
    write_sidecar(path, {"kind": "wsi-prune-mil", "in_dim": 8})
    with pytest.raises(CheckpointRefused, match="wsi-prune-mil"):
        trained_scorer_config(str(path))
