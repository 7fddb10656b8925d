"""The package layout: no import cycles, a config that imports no heavy library, a public API
that resolves, registries that behave alike, and run identities that survive the move into
subpackages (the hashes below were computed by the flat layout before the move, commit e89ab7f).
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import wsi_prune
from tests._paths import REPO, benchmark_module
from wsi_prune.config import MILConfig, RunConfig, TileSelectConfig, TokenSelectConfig
from wsi_prune.errors import ConfigError

PACKAGE = REPO / "wsi_prune"
#: a module over this many lines does two jobs (README: "one module, one job")
MAX_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules ``path`` imports anywhere (function bodies too), except under
    ``if TYPE_CHECKING:``, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("wsi_prune"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("wsi_prune"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_no_import_cycles_and_no_relative_imports() -> None:
    mods = _modules()
    graph = {m: _imports(f, mods) & set(mods) for m, f in mods.items()}
    for m, f in mods.items():
        rel = [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom)
               and n.level > 0]
        assert not rel, f"{m}: relative import (the package uses absolute imports)"
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u] - {u}):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                dfs(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from wsi_prune.b import g\n")
    b.write_text("from wsi_prune.a import f\nif TYPE_CHECKING:\n    from wsi_prune.c import x\n")
    known = {"wsi_prune.a": a, "wsi_prune.b": b, "wsi_prune.c": a}
    assert _imports(a, known) == {"wsi_prune.b"} and _imports(b, known) == {"wsi_prune.a"}


def test_modules_are_small() -> None:
    big = {m: n for m, f in _modules().items()
           if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by job): {big}"


def _fresh_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", ["import wsi_prune.config", "import wsi_prune",
                                  "import wsi_prune.selection.registry",
                                  "from wsi_prune.config import load_config; "
                                  "load_config('pipelines/camelyon16.yaml').run_hash()"])
def test_config_and_package_import_no_heavy_library(code: str) -> None:
    loaded = _fresh_modules(code)
    heavy = {"torch", "zarr", "openslide", "timm", "dask", "numpy", "matplotlib"}
    assert not heavy & loaded, f"{code!r} imported {sorted(heavy & loaded)}"


def test_public_api_resolves() -> None:
    for name in wsi_prune.__all__:
        assert getattr(wsi_prune, name) is not None, name
    assert issubclass(wsi_prune.ConfigError, wsi_prune.WsiPruneError)
    assert wsi_prune.run_batch.__module__ == "wsi_prune.pipeline.batch"
    with pytest.raises(AttributeError):
        wsi_prune.no_such_thing  # noqa: B018


# -- run identities survive the layout ---------------------------------------------------------
# Computed with the flat layout (commit e89ab7f) before anything moved.
GOLDEN = {
    "default": "f16110f4afc9a71b3152e823cbe60d739dedb5e5599d40404859fdea21b98615",
    "dense": "418dc241e07ec375754025cf10018c36867557f314a59a62c095f59c86fb2de0",
    "camelyon16.yaml": "a5c2b02256b17c4d0537311554df25ef0e9a229cbd4a9dacbc3ca87158ad8e39",
    "demo.yaml": "08b18325c67763a1ba14691d47c016341d94fd5aeffe54fef6e32b48a0f9213d",
    "uni.yaml": "5ab4c3bf3bfeb0bcc6837dd6e43c97beb12c42906b23c19065633bd69ac7b124",
    "run_hash": "2e3867305be3731442107f901e0f5731da425606717fe454ae58cc8bf96f7aa1",
    "tile_sections": "a4a0f60fdc96f67c57775acfb631bf2172ffe2a0463167efce33bfc2d4dba5e0",
    # the flat layout's was 72f97924...; the tissue-mask algorithm v2 (io.tissue.MASK_VERSION,
    # issue 16) rebuilds stores on purpose, so the tile-store identity changed then (43d1fd9c...),
    # and again with v3 (ink followed from glass into tissue, 8dc626b1...) and v4 (H&E-coloured
    # ink regions wider than any stroke are tissue out of focus, f8686a94...) and v5 (the slide
    # thumbnail averaged from a level finer than the mask, f40dd028...) and v6 (a few black px do
    # not vouch for a wide ink region)
    "tile_store": "c07e57ba22136ab97c5c099dd8758df425d01d87145f6cff264343930daa209a",
}


def _bench_fidelity():
    return benchmark_module("bench_fidelity")


def test_the_fidelity_pipeline_is_the_benchmark_base() -> None:
    bench = _bench_fidelity()
    assert RunConfig.from_yaml(REPO / "pipelines" / "fidelity.yaml") == \
        RunConfig.from_dict(bench.BASE)


def test_the_recall_pipeline_is_the_benchmarks_thin_budget() -> None:
    """pipelines/fidelity-recall.yaml is the measured setting: bench_fidelity's base at 5 % of
    the tokens and token ratio 0.0612 (12 tokens a tile), its heat blended as
    ``--heat-vit-weight 0.75`` runs it, nothing else changed."""
    bench = _bench_fidelity()
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "fidelity-recall.yaml")
    assert cfg == bench.budget_config(RunConfig.from_dict(bench.BASE), 0.05, 0.0612).replace(
        mil={"heat_vit_weight": 0.75})
    assert math.ceil(cfg.token_select.keep_ratio * 196 - 1e-9) == 12


def test_config_and_run_hashes_unchanged_by_the_layout() -> None:
    from wsi_prune.io.slide import SlideInfo
    from wsi_prune.io.tiling import tile_store_hash

    assert RunConfig().hash() == GOLDEN["default"]
    assert RunConfig().dense().hash() == GOLDEN["dense"]
    for name in ("camelyon16.yaml", "demo.yaml", "uni.yaml"):
        assert RunConfig.from_yaml(REPO / "pipelines" / name).hash() == GOLDEN[name], name
    digests = {"scorer": "a" * 64, "vit": None, "mil": "b" * 64}
    assert RunConfig().run_hash(digests) == GOLDEN["run_hash"]
    assert RunConfig().section_hash("tissue", "tiling") == GOLDEN["tile_sections"]

    class Stat:
        st_size, st_mtime_ns = 123456, 1700000000123456789

    info = SlideInfo("x.svs", "openslide", "aperio", 4096, 4096, ((4096, 4096),), (1.0,), 0.5,
                     0.5, "metadata", 20.0)
    assert tile_store_hash(RunConfig(), info, Stat()) == GOLDEN["tile_store"]


def test_keys_added_later_change_the_hash_only_off_their_default() -> None:
    base = RunConfig()
    assert base.replace(mil={"model": "gated-abmil"}).hash() == GOLDEN["default"]
    assert "model" in base.to_dict()["mil"] and "model" not in base.identity()["mil"]
    other = base.replace(mil={"model": "some-other-head"})
    assert other.hash() != GOLDEN["default"]
    assert RunConfig.from_dict(json.loads(json.dumps(other.to_dict()))).hash() == other.hash()
    assert base.replace(tile_select={"neighbour_mix": 0.0}).hash() == GOLDEN["default"]
    assert base.replace(tile_select={"neighbour_mix": 0.5}).hash() != GOLDEN["default"]
    assert base.replace(mil={"heat_vit_weight": 1.0}).hash() == GOLDEN["default"]
    assert base.replace(mil={"heat_vit_weight": 0.75}).hash() != GOLDEN["default"]
    with pytest.raises(ConfigError, match="heat_vit_weight"):
        base.replace(mil={"heat_vit_weight": 1.5})
    # the dense reference's heat is the ViT's own, whatever the pruned run blends
    assert base.replace(mil={"heat_vit_weight": 0.75}).dense().hash() == GOLDEN["dense"]


# -- registries: one pattern, every entry behaves ------------------------------------------------
def test_unknown_names_list_the_registered_ones() -> None:
    from wsi_prune.models.mil import build_mil
    from wsi_prune.selection.registry import check_policies

    with pytest.raises(ConfigError, match=r"unknown MIL head 'clam' \(registered: gated-abmil"):
        build_mil(MILConfig(model="clam"), 8)
    bad = RunConfig(tile_select=TileSelectConfig(policy="nucelus"))
    with pytest.raises(ConfigError, match=r"tile_select\.policy: unknown tile policy 'nucelus'"):
        check_policies(bad)
    bad = RunConfig(token_select=TokenSelectConfig(policy="nope"))
    with pytest.raises(ConfigError, match=r"token_select\.policy: unknown token policy"):
        check_policies(bad)


def _policies(kind: str) -> list[str]:
    from wsi_prune.selection.registry import list_policies

    return list_policies(kind)


@pytest.mark.parametrize("name", _policies("tile"))
def test_every_tile_policy_keeps_a_budgeted_subset(name: str) -> None:
    from wsi_prune.selection.tiles import select_tiles

    scores = np.random.default_rng(0).random(50)
    cfg = TileSelectConfig(policy=name, min_tiles=5, max_tiles=20, k=10, p=0.3, threshold=0.6)
    keep = select_tiles(scores, cfg)
    assert keep.dtype == bool and keep.shape == (50,)
    assert 5 <= keep.sum() <= 20
    # whatever the policy, a kept tile never scores below a dropped one
    assert scores[keep].min() >= scores[~keep].max()


@pytest.mark.parametrize("name", _policies("token"))
def test_every_token_policy_keeps_a_subset_of_valid_tokens(name: str) -> None:
    from wsi_prune.selection.tokens import keep_by_attention

    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4, 49, generator=g)
    valid = torch.rand(4, 49, generator=g) > 0.3
    keep = keep_by_attention(attn, valid, name, p=0.5, keep_ratio=0.5, min_tokens=3)
    assert keep.shape == valid.shape and not (keep & ~valid).any()
    assert (keep.sum(1) >= torch.clamp(valid.sum(1), max=3)).all()
    for b in range(4):  # the kept tokens are the most attended of the valid ones
        k, d = attn[b][keep[b]], attn[b][valid[b] & ~keep[b]]
        if len(k) and len(d):
            assert k.min() >= d.max()


def _heads() -> list[str]:
    from wsi_prune.models.mil import list_mil_heads

    return list_mil_heads()


@pytest.mark.parametrize("name", _heads())
def test_every_mil_head_gives_a_probability_and_attention(name: str) -> None:
    from wsi_prune.models.mil import build_mil

    torch.manual_seed(0)
    head = build_mil(MILConfig(model=name, hidden=16), in_dim=12)
    assert head.in_dim == 12
    with torch.no_grad():
        out = head(torch.randn(7, 12))
    assert 0.0 <= float(out.prob) <= 1.0
    assert out.attention.shape == (7,)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


def test_registered_scorer_and_head_are_built_by_name(tmp_path: Path) -> None:
    from wsi_prune.models import mil as mil_mod

    @mil_mod.register_mil("test-mean-pool")
    def _mean(config: MILConfig, in_dim: int, n_classes: int) -> torch.nn.Module:
        return mil_mod.GatedABMIL(in_dim, hidden=4, n_classes=n_classes)

    try:
        assert "test-mean-pool" in mil_mod.list_mil_heads()
        head = mil_mod.build_mil(MILConfig(model="test-mean-pool"), 6)
        assert head.in_dim == 6
        with pytest.raises(ConfigError, match="already registered"):
            mil_mod.register_mil("test-mean-pool")(_mean)
    finally:
        mil_mod.MIL_HEADS.unregister("test-mean-pool")
    assert "test-mean-pool" not in mil_mod.list_mil_heads()


def test_every_module_imports() -> None:
    for name in _modules():
        importlib.import_module(name)
