"""The gated-ABMIL slide head: attention, masking, invariances, weights."""

from __future__ import annotations

import pytest
import torch

from wsi_prune.config import MILConfig
from wsi_prune.errors import CheckpointRefused
from wsi_prune.models.checkpoints import save_safetensors
from wsi_prune.models.mil import GatedABMIL, build_mil, trained_mil_config
from wsi_prune.models.sidecars import write_sidecar

D = 24


@pytest.fixture()
def head() -> GatedABMIL:
    torch.manual_seed(0)
    return GatedABMIL(D, hidden=16).eval()


def _bag(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, D, generator=torch.Generator().manual_seed(seed))


def test_attention_is_a_distribution(head: GatedABMIL) -> None:
    out = head(_bag(9, 0))
    assert out.attention.shape == (9,) and out.logit.shape == () and out.prob.shape == ()
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((out.attention > 0).all())
    torch.testing.assert_close(out.prob, torch.sigmoid(out.logit))


def test_forward_matches_the_gated_abmil_formula(head: GatedABMIL) -> None:
    x = _bag(5, 1)
    h = torch.relu(head.fc[0](x))
    a = head.attention_w(torch.tanh(head.attention_v(h)) * torch.sigmoid(head.attention_u(h)))
    att = torch.softmax(a[:, 0], 0)
    logit = head.classifier(att @ h)[0]
    out = head(x)
    torch.testing.assert_close(out.attention, att)
    torch.testing.assert_close(out.logit, logit)


def test_padding_has_zero_attention_and_no_effect_even_nan(head: GatedABMIL) -> None:
    bag = _bag(6, 2)
    ref = head(bag)
    for fill in (0.0, 1e6, float("nan"), float("inf")):
        padded = torch.cat([bag, torch.full((4, D), fill)])
        mask = torch.tensor([True] * 6 + [False] * 4)
        out = head(padded, mask)
        assert torch.equal(out.attention[6:], torch.zeros(4))
        torch.testing.assert_close(out.attention[:6], ref.attention)
        torch.testing.assert_close(out.logit, ref.logit)
        assert bool(torch.isfinite(out.logit))


def test_padding_in_the_middle_is_masked_too(head: GatedABMIL) -> None:
    bag = _bag(5, 3)
    padded = torch.cat([bag[:2], torch.full((3, D), float("nan")), bag[2:]])
    mask = torch.tensor([True, True, False, False, False, True, True, True])
    out = head(padded, mask)
    torch.testing.assert_close(out.logit, head(bag).logit)
    torch.testing.assert_close(out.attention[mask], head(bag).attention)


def test_permutation_invariance(head: GatedABMIL) -> None:
    bag = _bag(12, 4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    a, b = head(bag), head(bag[perm])
    torch.testing.assert_close(a.logit, b.logit)
    torch.testing.assert_close(a.attention[perm], b.attention)


def test_batch_of_bags_equals_bags_one_by_one(head: GatedABMIL) -> None:
    bags = [_bag(k, 10 + k) for k in (3, 7, 1, 5)]
    k_max = max(len(b) for b in bags)
    x = torch.full((4, k_max, D), float("nan"))
    mask = torch.zeros(4, k_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    out = head(x, mask)
    assert out.logit.shape == (4,) and out.attention.shape == (4, k_max)
    for i, b in enumerate(bags):
        single = head(b)
        torch.testing.assert_close(out.logit[i], single.logit, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.attention[i, : len(b)], single.attention)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(4))


def test_multiclass_softmax() -> None:
    torch.manual_seed(0)
    out = GatedABMIL(D, hidden=8, n_classes=3)(_bag(4, 0))
    assert out.logit.shape == (3,)
    torch.testing.assert_close(out.prob, torch.softmax(out.logit, -1))


def test_bad_bags_are_refused(head: GatedABMIL) -> None:
    with pytest.raises(ValueError, match="empty bag"):
        head(torch.zeros(0, D))
    with pytest.raises(ValueError, match="every instance"):
        head(_bag(3, 0), torch.tensor([False, False, False]))
    with pytest.raises(ValueError, match=rf"\(K, {D}\)"):
        head(torch.zeros(3, D + 1))
    with pytest.raises(ValueError, match="mask"):
        head(_bag(3, 0), torch.tensor([True, True]))
    with pytest.raises(ValueError):
        GatedABMIL(0)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    mil = GatedABMIL(D, hidden=64, dropout=0.5)
    bag = _bag(8, 5)
    mil.eval()
    torch.testing.assert_close(mil(bag).logit, mil(bag).logit)
    mil.train()
    assert not torch.equal(mil(bag).logit, mil(bag).logit)


def test_weights_round_trip_and_mismatch(tmp_path) -> None:
    torch.manual_seed(0)
    trained = GatedABMIL(D, hidden=16)
    path = tmp_path / "mil.safetensors"
    save_safetensors(trained, path)
    loaded = build_mil(MILConfig(hidden=16, weights=str(path)), D)
    assert not loaded.training
    bag = _bag(7, 6)
    torch.testing.assert_close(loaded(bag).logit, trained.eval()(bag).logit)
    with pytest.raises(CheckpointRefused, match=r"mil\.safetensors.*shape mismatch.*fc\.0\.weight"):
        build_mil(MILConfig(hidden=16, weights=str(path)), D + 8)


def test_sidecar_names_the_mismatch_and_gives_the_config(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "mil.safetensors"
    save_safetensors(GatedABMIL(D, hidden=16), path)
    write_sidecar(path, {"kind": "wsi-prune-mil", "in_dim": D, "hidden": 16, "n_classes": 1})
    with pytest.raises(CheckpointRefused, match=r"hidden=16 \(here: 128\)"):
        build_mil(MILConfig(weights=str(path)), D)
    with pytest.raises(CheckpointRefused, match=rf"in_dim={D} \(here: 384\)"):
        build_mil(MILConfig(hidden=16, weights=str(path)), 384)
    cfg, in_dim, n_classes = trained_mil_config(str(path), MILConfig(threshold=0.3))
    assert (cfg.hidden, cfg.threshold, cfg.weights, in_dim, n_classes) == (
        16, 0.3, str(path), D, 1)
    assert build_mil(cfg, in_dim, n_classes).in_dim == D
    with pytest.raises(CheckpointRefused, match="no MIL config"):
        trained_mil_config(str(tmp_path / "other.safetensors"))
