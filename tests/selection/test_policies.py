"""Selection policies as pure functions, checked against hand-computed selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_prune.config import TileSelectConfig, TokenSelectConfig
from wsi_prune.errors import ConfigError
from wsi_prune.selection.registry import get_policy, list_policies, register_policy
from wsi_prune.selection.tiles import neighbour_mixed, nucleus_count, select_tiles
from wsi_prune.selection.tokens import (
    keep_by_attention,
    ratio_count,
    select_patches,
    slide_token_counts,
)


def tiles(scores, **kw) -> np.ndarray:
    """Kept tile indices under a TileSelectConfig with no budget unless given."""
    kw.setdefault("min_tiles", 0)
    kw.setdefault("max_tiles", None)
    return np.flatnonzero(select_tiles(np.asarray(scores, dtype=float), TileSelectConfig(**kw)))


def kept_rows(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(r).flatten().tolist() for r in mask]


# ---------------------------------------------------------------- tile level: policies

# Normalised mass of [0.1, 0.4, 0.2, 0.3] in descending order: 0.4, 0.3, 0.2, 0.1 at
# indices 1, 3, 2, 0; cumulative 0.4, 0.7, 0.9, 1.0.
SCORES = [0.1, 0.4, 0.2, 0.3]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.3, [1]),  # 0.4 alone reaches 0.3
        (0.4, [1]),  # reached exactly: no spurious extra tile from rounding
        (0.5, [1, 3]),  # 0.4 < 0.5 <= 0.7
        (0.7, [1, 3]),  # 0.4 + 0.3 lands exactly on 0.7 (0.7000000000000001 in floats)
        (0.71, [1, 2, 3]),
        (0.95, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_tile_nucleus_smallest_set_reaching_mass(p: float, expected: list[int]) -> None:
    assert tiles(SCORES, policy="nucleus", p=p).tolist() == expected


def test_tile_nucleus_uses_normalised_mass() -> None:
    # Halving every score changes nothing: the mass is relative to the slide's total.
    half = [s / 2 for s in SCORES]
    assert tiles(half, policy="nucleus", p=0.5).tolist() == [1, 3]
    assert tiles(half, policy="nucleus", p=0.71).tolist() == [1, 2, 3]


def test_tile_nucleus_ties_and_zero_mass() -> None:
    # Equal scores: ties go to the lower index; 2 of 4 equal tiles reach p = 0.5.
    assert tiles([0.5] * 4, policy="nucleus", p=0.5).tolist() == [0, 1]
    # No mass at all is treated as uniform: ceil(0.5 * 4) = 2, lowest indices.
    assert tiles([0.0] * 4, policy="nucleus", p=0.5).tolist() == [0, 1]
    # Zero-score tiles never join a nucleus that the positive ones already reach.
    assert tiles([0.0, 0.6, 0.0, 0.2], policy="nucleus", p=1.0).tolist() == [1, 3]


def test_nucleus_count_direct() -> None:
    mass = np.array([0.4, 0.3, 0.2, 0.1])
    assert nucleus_count(mass, 0.5) == 2
    assert nucleus_count(mass, 0.7) == 2
    assert nucleus_count(mass, 0.7001) == 3
    assert nucleus_count(mass * 10, 0.7001) == 3
    assert nucleus_count(np.array([]), 0.5) == 0
    assert nucleus_count(np.zeros(5), 0.5) == 3  # uniform: ceil(2.5)


def test_tile_topk_threshold_all() -> None:
    s = [0.1, 0.9, 0.5, 0.9, 0.3]
    assert tiles(s, policy="topk", k=2).tolist() == [1, 3]
    assert tiles(s, policy="topk", k=3).tolist() == [1, 2, 3]
    assert tiles(s, policy="topk", k=50).tolist() == [0, 1, 2, 3, 4]
    # threshold keeps score >= threshold: 0.5 itself is in.
    assert tiles(s, policy="threshold", threshold=0.5).tolist() == [1, 2, 3]
    assert tiles(s, policy="threshold", threshold=0.95).tolist() == []
    assert tiles(s, policy="all").tolist() == [0, 1, 2, 3, 4]
    assert tiles([], policy="nucleus", p=0.5).tolist() == []


def test_tile_budgets_min_and_max() -> None:
    s = [0.1, 0.9, 0.5, 0.8, 0.3]
    # Nothing passes 0.95, min_tiles tops up by score: 0.9 (1), 0.8 (3).
    assert tiles(s, policy="threshold", threshold=0.95, min_tiles=2).tolist() == [1, 3]
    # min_tiles above N keeps all, without error.
    assert tiles(s, policy="threshold", threshold=0.95, min_tiles=9, max_tiles=None).size == 5
    # max_tiles caps by score.
    assert tiles(s, policy="all", max_tiles=2).tolist() == [1, 3]
    assert tiles(s, policy="all", min_tiles=1, max_tiles=1).tolist() == [1]
    # The default config (min 8) on a small slide keeps everything.
    keep = select_tiles(np.array(s), TileSelectConfig(policy="nucleus", p=0.1))
    assert keep.all()


def test_tile_scores_are_validated() -> None:
    cfg = TileSelectConfig()
    for bad in ([0.1, np.nan], [0.1, 1.5], [-0.1, 0.5]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            select_tiles(np.array(bad), cfg)
    with pytest.raises(ValueError, match="must be \\(N,\\)"):
        select_tiles(np.zeros((2, 2)), cfg)


# ---------------------------------------------------------------- tile level: redundancy

# Five tiles on the grid (row, col). Tile 0 anchors; 1 is its right neighbour and a near
# duplicate; 2 its diagonal neighbour and a near duplicate; 3 has the same embedding as 0 but
# sits 3 columns away (and 2 from tile 1): no neighbour; 4 neighbours 0 but looks different.
GRID = np.array([[5, 5], [5, 6], [6, 6], [5, 8], [4, 5]])
EMB = np.array(
    [[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [1.0, 0.0, 0.01], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
)
RED_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5])


def test_redundancy_drops_near_duplicate_neighbours_only() -> None:
    # 1 - cos for tiles 1 and 2 against 0: 1 - 1/sqrt(1.0001) = 5.0e-5 <= eps.
    cfg = TileSelectConfig(policy="all", min_tiles=0, max_tiles=None, redundancy_eps=1e-3)
    keep = select_tiles(RED_SCORES, cfg, grid=GRID, embeddings=EMB)
    assert keep.tolist() == [True, False, False, True, True]
    # eps below their distance: nothing is redundant.
    cfg = TileSelectConfig(policy="all", min_tiles=0, max_tiles=None, redundancy_eps=1e-5)
    assert select_tiles(RED_SCORES, cfg, grid=GRID, embeddings=EMB).all()


def test_redundancy_dropped_tiles_are_not_anchors() -> None:
    # A row of three: B duplicates A and is dropped; C duplicates B and neighbours B only
    # (A is two columns away). A dropped tile anchors nothing, so C stays.
    grid = np.array([[0, 0], [0, 1], [0, 2]])
    emb = np.array([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02]])
    cfg = TileSelectConfig(policy="all", min_tiles=0, max_tiles=None, redundancy_eps=1e-3)
    scores = np.array([0.9, 0.8, 0.7])
    assert select_tiles(scores, cfg, grid=grid, embeddings=emb).tolist() == [True, False, True]
    # Higher-scored tiles anchor first: with C on top, B is C's duplicate and A is kept.
    scores = np.array([0.7, 0.8, 0.9])
    assert select_tiles(scores, cfg, grid=grid, embeddings=emb).tolist() == [True, False, True]
    scores = np.array([0.8, 0.9, 0.7])  # B first: both A and C are its duplicates
    assert select_tiles(scores, cfg, grid=grid, embeddings=emb).tolist() == [False, True, False]


def test_redundancy_respects_min_tiles_and_runs_after_policy() -> None:
    cfg = TileSelectConfig(policy="all", min_tiles=4, max_tiles=None, redundancy_eps=1e-3)
    # Visited by score: tile 1 is dropped (5 -> 4 tiles), tile 2 would go below min_tiles.
    keep = select_tiles(RED_SCORES, cfg, grid=GRID, embeddings=EMB)
    assert keep.tolist() == [True, False, True, True, True]
    # Only tiles the policy kept are filtered: with topk 2 tile 1 is the only other candidate.
    cfg = TileSelectConfig(policy="topk", k=2, min_tiles=0, max_tiles=None, redundancy_eps=1e-3)
    assert np.flatnonzero(select_tiles(RED_SCORES, cfg, grid=GRID, embeddings=EMB)).tolist() == [0]


def test_redundancy_needs_grid_and_embeddings() -> None:
    cfg = TileSelectConfig(policy="all", min_tiles=0, redundancy_eps=0.1)
    with pytest.raises(ValueError, match="needs both grid"):
        select_tiles(RED_SCORES, cfg, grid=GRID)
    with pytest.raises(ValueError, match=r"grid must be \(5, 2\)"):
        select_tiles(RED_SCORES, cfg, grid=GRID[:3], embeddings=EMB)


# ---------------------------------------------------------------- tokens before block 0


def tok(policy: str, **kw) -> TokenSelectConfig:
    kw.setdefault("min_tokens", 1)
    return TokenSelectConfig(policy=policy, **kw)


def test_select_patches_nucleus_ratio_all_by_hand() -> None:
    imp = torch.tensor([SCORES])  # (1, 4)
    assert kept_rows(select_patches(imp, tok("nucleus", p=0.5))) == [[1, 3]]
    assert kept_rows(select_patches(imp, tok("nucleus", p=0.71))) == [[1, 2, 3]]
    # ratio rounds up: ceil(0.3 * 4) = 2, ceil(0.5 * 4) = 2, ceil(0.51 * 4) = 3.
    assert kept_rows(select_patches(imp, tok("ratio", keep_ratio=0.3))) == [[1, 3]]
    assert kept_rows(select_patches(imp, tok("ratio", keep_ratio=0.5))) == [[1, 3]]
    assert kept_rows(select_patches(imp, tok("ratio", keep_ratio=0.51))) == [[1, 2, 3]]
    assert kept_rows(select_patches(imp, tok("all"))) == [[0, 1, 2, 3]]


def test_select_patches_nucleus_is_adaptive_per_tile() -> None:
    imp = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    keep = select_patches(imp, tok("nucleus", p=0.5))
    # peaked: 1 patch; flat: 2 (ties by index); no mass at all: uniform ceil(0.5 * 4) = 2.
    assert kept_rows(keep) == [[0], [0, 1], [0, 1]]


def test_select_patches_min_tokens() -> None:
    imp = torch.tensor([SCORES])
    assert kept_rows(select_patches(imp, tok("nucleus", p=0.4, min_tokens=3))) == [[1, 2, 3]]
    assert kept_rows(select_patches(imp, tok("ratio", keep_ratio=0.25, min_tokens=2))) == [[1, 3]]
    assert kept_rows(select_patches(imp, tok("nucleus", p=0.3, min_tokens=9))) == [[0, 1, 2, 3]]


def test_select_patches_grid_shapes_and_resampling_14_to_16() -> None:
    # A 14x14 map hot in its top-left 7x7 quadrant, for a patch-14 ViT (16x16 grid at 224 px).
    imp = torch.zeros(2, 14, 14)
    imp[:, :7, :7] = 1.0
    keep = select_patches(imp, tok("ratio", keep_ratio=0.25), grid=(16, 16))
    assert keep.shape == (2, 256) and keep.dtype == torch.bool
    # 64 kept: exactly the top-left 8x8 quadrant of the 16x16 grid, row-major.
    grid = keep.reshape(2, 16, 16)
    assert grid[:, :8, :8].all() and int(keep.sum()) == 2 * 64
    # Downsampling 16 -> 14 (area) keeps the quadrant too.
    imp16 = torch.zeros(1, 16, 16)
    imp16[:, :8, :8] = 1.0
    keep14 = select_patches(imp16, tok("ratio", keep_ratio=0.25), grid=(14, 14))
    assert keep14.reshape(14, 14)[:7, :7].all() and int(keep14.sum()) == 49
    # Same grid, (B, G, G) and (B, P) agree.
    flat = select_patches(imp.flatten(1), tok("ratio", keep_ratio=0.25), grid=(14, 14))
    assert torch.equal(select_patches(imp, tok("ratio", keep_ratio=0.25), grid=(14, 14)), flat)


def test_select_patches_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ViT grid"):
        select_patches(torch.rand(2, 196), tok("all"), grid=(16, 16))
    with pytest.raises(ValueError, match="must be"):
        select_patches(torch.rand(196), tok("all"))
    with pytest.raises(ValueError, match="finite"):
        select_patches(torch.tensor([[0.5, float("nan")]]), tok("all"))


# ---------------------------------------------------------------- tokens inside the ViT


def test_slide_scope_gives_the_budget_to_the_slides_best_patches_by_hand() -> None:
    imp = torch.tensor([[0.9, 0.8, 0.7, 0.1],
                        [0.2, 0.1, 0.05, 0.0],
                        [0.6, 0.85, 0.3, 0.3]])
    # budget 3 x ceil(0.5 * 4) = 6: each tile's best first (0.9, 0.2, 0.85), then the
    # three best of the rest over the slide (0.8 and 0.7 of tile 0, 0.6 of tile 2)
    counts = slide_token_counts(imp, 0.5, 1)
    assert counts.tolist() == [3, 1, 2]
    keep = select_patches(imp, TokenSelectConfig(), counts=counts)
    assert keep.tolist() == [[True, True, True, False], [True, False, False, False],
                             [True, True, False, False]]
    # min_tokens first: with 2 each, 6 go to the tiles' two best and nothing is left
    assert slide_token_counts(imp, 0.5, 2).tolist() == [2, 2, 2]
    # min_tokens above the ratio: the minimum wins, as per tile
    assert slide_token_counts(imp, 0.25, 3).tolist() == [3, 3, 3]
    # ties: the lower tile first
    assert slide_token_counts(torch.full((2, 4), 0.5), 0.5, 1).tolist() == [3, 1]
    assert slide_token_counts(torch.zeros((0, 4)), 0.5, 1).tolist() == []
    # a 7x7 CNN map is resampled to the ViT grid as select_patches does
    c = slide_token_counts(torch.rand((5, 7, 7), generator=torch.Generator().manual_seed(0)),
                           0.25, 4, grid=(14, 14))
    assert int(c.sum()) == 5 * 49 and bool((c >= 4).all()) and len(set(c.tolist())) > 1
    with pytest.raises(ValueError, match="counts"):
        select_patches(imp, TokenSelectConfig(), counts=torch.tensor([1, 2]))


def test_slide_scope_is_a_ratio_setting() -> None:
    from wsi_prune.config import RunConfig

    assert TokenSelectConfig(scope="slide").scope == "slide"
    with pytest.raises(ConfigError, match="scope"):
        TokenSelectConfig(scope="batch")
    with pytest.raises(ConfigError, match="policy 'nucleus'"):
        TokenSelectConfig(policy="nucleus", scope="slide")
    cfg = RunConfig().replace(token_select={"scope": "slide"})
    assert cfg.dense().token_select.scope == "tile"  # the dense reference keeps every token
    # a config that leaves the scope at its default hashes as before the key existed
    assert "scope" not in RunConfig().identity()["token_select"]
    assert cfg.hash() != RunConfig().hash()


def test_keep_by_attention_nucleus_adaptive_count() -> None:
    attn = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]])
    valid = torch.ones_like(attn, dtype=torch.bool)
    keep = keep_by_attention(attn, valid, "nucleus", p=0.6, keep_ratio=1.0)
    assert kept_rows(keep) == [[0], [0, 1], [2, 3]]
    # Any scale: only the normalised mass matters.
    assert torch.equal(keep_by_attention(attn * 7, valid, "nucleus", p=0.6, keep_ratio=1.0), keep)


def test_keep_by_attention_only_valid_and_normalised_over_valid() -> None:
    # Slot 0 (say a padded or already-pruned slot) has the most attention but is not valid.
    attn = torch.tensor([[0.9, 0.04, 0.03, 0.03]])
    valid = torch.tensor([[False, True, True, True]])
    # Over valid slots the mass is 0.4, 0.3, 0.3: p = 0.5 needs two of them.
    keep = keep_by_attention(attn, valid, "nucleus", p=0.5, keep_ratio=1.0)
    assert kept_rows(keep) == [[1, 2]]
    assert not bool((keep & ~valid).any())


def test_keep_by_attention_ratio_ceil_and_min_tokens() -> None:
    attn = torch.tensor([[0.1, 0.5, 0.2, 0.15, 0.05, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    valid = torch.tensor([[True] * 5 + [False], [True] * 6])
    keep = keep_by_attention(attn, valid, "ratio", p=1.0, keep_ratio=0.5)
    # Row 0: ceil(0.5 * 5 valid) = 3 -> 0.5, 0.2, 0.15; row 1: ceil(3.0) = 3, ties by index.
    assert kept_rows(keep) == [[1, 2, 3], [0, 1, 2]]
    assert ratio_count(torch.tensor([5, 6, 196]), 0.7).tolist() == [4, 5, 138]
    keep = keep_by_attention(attn, valid, "ratio", p=1.0, keep_ratio=0.1, min_tokens=4)
    assert keep.sum(1).tolist() == [4, 4]
    # min_tokens above the valid count keeps every valid token, never an invalid one.
    keep = keep_by_attention(attn, valid, "ratio", p=1.0, keep_ratio=0.1, min_tokens=10)
    assert torch.equal(keep, valid)


def test_keep_by_attention_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"must both be \(B, P\)"):
        keep_by_attention(torch.rand(2, 4), torch.ones(2, 5, dtype=torch.bool), "ratio", 1, 0.5)
    with pytest.raises(ConfigError, match="unknown token policy 'topp'"):
        keep_by_attention(torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool), "topp", 1, 0.5)


# ---------------------------------------------------------------- registry


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry for this test only."""
    import copy

    from wsi_prune.selection import registry

    list_policies()  # the built-in policies are registered before the copy
    monkeypatch.setattr(registry, "_REGISTRIES",
                        {k: copy.copy(v) for k, v in registry._REGISTRIES.items()})
    for reg in registry._REGISTRIES.values():
        reg._items = dict(reg._items)


def test_builtin_policies_are_listed() -> None:
    assert list_policies("tile") == ["all", "fraction", "nucleus", "threshold", "topk"]
    assert list_policies("token") == ["all", "nucleus", "ratio"]
    assert "tile:topk" in list_policies() and "token:ratio" in list_policies()


@pytest.mark.usefixtures("scratch_registry")
def test_register_get_list_and_duplicates() -> None:
    @register_policy("lowest", kind="tile")
    def lowest(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
        return scores == scores.min()

    assert get_policy("lowest", "tile") is lowest
    assert "lowest" in list_policies("tile") and "tile:lowest" in list_policies()
    assert "lowest" not in list_policies("token")
    assert get_policy("lowest")(np.array([0.3, 0.1, 0.2]), TileSelectConfig()).tolist() == [
        False, True, False,
    ]
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("lowest", kind="tile")(lowest)


def test_registry_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match=r"unknown tile policy 'nucelus' \(registered: all, "):
        get_policy("nucelus", "tile")
    with pytest.raises(ConfigError, match="policy kind must be one of"):
        get_policy("nucleus", "slide")
    with pytest.raises(ConfigError, match="policy kind must be one of"):
        register_policy("x", kind="slide")
    with pytest.raises(ConfigError, match="policy kind must be one of"):
        list_policies("slide")


@pytest.mark.parametrize("n,fraction,want", [(100, 0.05, 5), (101, 0.05, 6), (7, 1.0, 7),
                                             (10, 0.01, 1), (40, 0.25, 10)])
def test_fraction_policy_keeps_the_top_share_of_tissue_tiles(n, fraction, want) -> None:
    scores = np.random.default_rng(n).random(n)
    cfg = TileSelectConfig(policy="fraction", fraction=fraction, min_tiles=0, max_tiles=None)
    keep = select_tiles(scores, cfg)
    assert keep.sum() == want
    assert scores[keep].min() >= scores[~keep].max() if want < n else keep.all()
    with pytest.raises(ConfigError, match="fraction"):
        TileSelectConfig(fraction=0.0)


def test_neighbour_mix_keeps_a_lesion_edge_over_an_isolated_false_positive():
    # 5 x 5 tissue tiles: two strong lesion tiles, a weaker one at their edge, an isolated
    # false positive in a corner, background 0.1
    scores = np.full((5, 5), 0.1)
    scores[1, 2] = scores[2, 2] = 0.9
    scores[2, 3] = 0.4
    scores[0, 0] = 0.5
    grid = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
    flat = scores.ravel()
    raw = TileSelectConfig(policy="topk", k=3, min_tiles=0)
    assert set(np.flatnonzero(select_tiles(flat, raw, grid))) == {0, 7, 12}
    mixed = neighbour_mixed(flat, grid, 0.5)
    # the edge: neighbours 0.9, 0.9 and six of 0.1 -> mean 0.3; the corner: three of 0.1
    assert mixed[13] == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    assert mixed[0] == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)
    cfg = TileSelectConfig(policy="topk", k=3, min_tiles=0, neighbour_mix=0.5)
    assert set(np.flatnonzero(select_tiles(flat, cfg, grid))) == {7, 12, 13}
    # the grid's origin does not matter; a tile without a tissue neighbour keeps its score
    assert np.allclose(neighbour_mixed(flat, grid + 7, 0.5), mixed)
    lone = neighbour_mixed(np.array([0.2, 0.8]), np.array([[0, 0], [5, 5]]), 0.5)
    assert np.allclose(lone, [0.2, 0.8])
    with pytest.raises(ValueError, match="needs the tile grid"):
        select_tiles(flat, cfg)
    with pytest.raises(ConfigError, match="neighbour_mix"):
        TileSelectConfig(neighbour_mix=1.0)
