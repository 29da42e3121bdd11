"""Tests for fedkd.models."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from fedkd.errors import ScenarioError
from fedkd.models import MODELS, FedModel, assign_archs, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
ARCHS = ["mlp", "cnn_small", "cnn_medium", "resnet8", "resnet20"]


def test_registry_names() -> None:
    assert set(ARCHS) <= set(MODELS.names())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_and_head(arch: str, shape: tuple[int, int, int]) -> None:
    model = build_model(arch, shape, 10, seed=0)
    assert isinstance(model, FedModel)
    model.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        logits = model(x)
        z = model.features(x)
        assert logits.shape == (3, 10)
        assert z.shape == (3, model.latent_dim)
        assert isinstance(model.head, nn.Linear)
        assert model.head.in_features == model.latent_dim
        torch.testing.assert_close(model.head(z), logits, rtol=0, atol=0)


def test_latent_dims() -> None:
    dims = {a: build_model(a, (1, 28, 28), 10, seed=0).latent_dim for a in ARCHS}
    assert dims == {"mlp": 200, "cnn_small": 128, "cnn_medium": 256, "resnet8": 64, "resnet20": 64}


def test_mlp_hidden_param() -> None:
    model = build_model("mlp", (1, 8, 8), 5, seed=0, hidden=[32])
    assert model.latent_dim == 32
    assert model(torch.randn(2, 64)).shape == (2, 5)
    with pytest.raises(ScenarioError):
        build_model("mlp", (1, 8, 8), 5, seed=0, hidden=[])


@pytest.mark.parametrize("arch", ["resnet8", "resnet20"])
def test_group_norm_variant(arch: str) -> None:
    model = build_model(arch, (3, 32, 32), 10, seed=0, norm="group")
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert all(m.num_groups == 2 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_norm() -> None:
    with pytest.raises(ScenarioError) as err:
        build_model("resnet8", (3, 32, 32), 10, seed=0, norm="layer")
    assert err.value.path == "clients.models.resnet8.norm"
    assert err.value.value == "layer"


def test_unknown_arch_and_param() -> None:
    with pytest.raises(ScenarioError):
        build_model("vgg99", (3, 32, 32), 10, seed=0)
    with pytest.raises(ScenarioError):
        build_model("cnn_small", (3, 32, 32), 10, seed=0, width=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_init(arch: str) -> None:
    a = build_model(arch, (1, 28, 28), 10, seed=7).state_dict()
    b = build_model(arch, (1, 28, 28), 10, seed=7).state_dict()
    c = build_model(arch, (1, 28, 28), 10, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("cnn_small", (1, 28, 28), 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_assign_archs_pinned() -> None:
    archs = assign_archs([("a", 0.5), ("b", 0.3), ("c", 0.2)], 7, seed=0)
    assert Counter(archs) == {"a": 4, "b": 2, "c": 1}
    assert archs == assign_archs([("a", 0.5), ("b", 0.3), ("c", 0.2)], 7, seed=0)
    assert archs == ["a", "b", "a", "c", "b", "a", "a"]
    assert assign_archs([("a", 0.5), ("b", 0.3), ("c", 0.2)], 7, seed=1) != archs


@pytest.mark.parametrize("n", [1, 3, 10, 11, 100])
def test_assign_archs_counts(n: int) -> None:
    specs = [("x", 1 / 3), ("y", 1 / 3), ("z", 1 / 3)]
    archs = assign_archs(specs, n, seed=1)
    assert len(archs) == n
    counts = Counter(archs)
    assert max(counts.values()) - min(counts.get(k, 0) for k in "xyz") <= 1


def test_assign_archs_largest_remainder() -> None:
    counts = Counter(assign_archs([("a", 0.45), ("b", 0.45), ("c", 0.1)], 10, seed=3))
    assert counts == {"a": 5, "b": 4, "c": 1} or counts == {"a": 4, "b": 5, "c": 1}
    counts = Counter(assign_archs([("a", 0.26), ("b", 0.74)], 10, seed=3))
    assert counts == {"a": 3, "b": 7}


@pytest.mark.parametrize(
    "specs", [[("a", 0.5), ("b", 0.4)], [("a", 0.7), ("b", 0.7)], [("a", 1.2), ("b", -0.2)], []]
)
def test_assign_archs_bad_fractions(specs: list[tuple[str, float]]) -> None:
    with pytest.raises(ScenarioError) as err:
        assign_archs(specs, 10, seed=0)
    assert err.value.path == "clients.models"
