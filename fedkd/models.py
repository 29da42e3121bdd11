"""Client and server models, built by name from the scenario.

Every model is a :class:`FedModel`: a feature extractor ``features`` that maps an input batch to
``(N, latent_dim)`` latents and a linear ``head`` that maps latents to class logits.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.errors import ScenarioError
from fedkd.registry import Registry


class FedModel(nn.Module):
    """Base class: ``forward(x) = head(features(x))``.

    Parameters
    ----------
    latent_dim : int
        Width of the latent vector produced by :meth:`features`.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.head = nn.Linear(latent_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map an input batch to latents of shape ``(N, latent_dim)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(N, num_classes)``."""
        return self.head(self.features(x))


MODELS: Registry[Callable[..., FedModel]] = Registry("model")


def _spatial(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Split an image shape ``(C, H, W)`` into channels, height and width."""
    if len(input_shape) != 3:
        raise ScenarioError("dataset.input_shape", input_shape, "an image shape (C, H, W)")
    c, h, w = input_shape
    return int(c), int(h), int(w)


def _halve(size: int, times: int) -> int:
    """Spatial size after ``times`` 2x2 max-pools with ``ceil_mode=True``."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


class MLP(FedModel):
    """Fully connected network on the flattened input.

    Parameters
    ----------
    in_features : int
        Flattened input size.
    hidden : Sequence[int]
        Hidden layer widths; the last one is the latent width.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__(hidden[-1], num_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        """Hidden activations of the last layer."""
        return self.body(x)


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...] | list[int] = (200, 200),
) -> FedModel:
    """Build an MLP (the FedAvg paper's 2NN by default).

    Parameters
    ----------
    input_shape : tuple[int, ...]
        Shape of one example; flattened.
    num_classes : int
        Number of classes.
    hidden : tuple[int, ...] | list[int]
        Hidden widths, at least one.
    """
    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < 1:
        raise ScenarioError(
            "clients.models.mlp.hidden", hidden, "a non-empty list of positive ints"
        )
    return MLP(int(np.prod(input_shape)), hidden, num_classes)


# ---------------------------------------------------------------------------------------------
# Plain CNNs
# ---------------------------------------------------------------------------------------------


class ConvNet(FedModel):
    """Convolutional trunk followed by one fully connected latent layer.

    Parameters
    ----------
    trunk : nn.Module
        Convolutional layers producing ``(N, C, H, W)``.
    flat_dim : int
        ``C * H * W`` of the trunk output.
    latent_dim : int
        Width of the latent layer.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, trunk: nn.Module, flat_dim: int, latent_dim: int, num_classes: int) -> None:
        super().__init__(latent_dim, num_classes)
        self.trunk = trunk
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(flat_dim, latent_dim), nn.ReLU(inplace=True)
        )

    def features(self, x: Tensor) -> Tensor:
        """Latent activations after the fully connected layer."""
        return self.fc(self.trunk(x))


@MODELS.register("cnn_small")
def cnn_small(input_shape: tuple[int, ...], num_classes: int) -> FedModel:
    """FedAvg-style CNN: two 5x5 conv + 2x2 max-pool layers (32, 64 channels), FC to 128.

    Padding keeps the spatial size through each conv, so 8x8, 28x28 and 32x32 inputs all work.
    """
    c, h, w = _spatial(input_shape)
    trunk = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    )
    return ConvNet(trunk, 64 * _halve(h, 2) * _halve(w, 2), 128, num_classes)


def _conv_bn_block(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv, BatchNorm, ReLU, 2x2 max-pool."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    ]


@MODELS.register("cnn_medium")
def cnn_medium(input_shape: tuple[int, ...], num_classes: int) -> FedModel:
    """Three conv blocks (32, 64, 128 channels) with BatchNorm, pooled to 2x2, FC to 256."""
    c, _, _ = _spatial(input_shape)
    layers: list[nn.Module] = []
    for c_in, c_out in ((c, 32), (32, 64), (64, 128)):
        layers += _conv_bn_block(c_in, c_out)
    layers.append(nn.AdaptiveAvgPool2d(2))
    return ConvNet(nn.Sequential(*layers), 128 * 2 * 2, 256, num_classes)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets
# ---------------------------------------------------------------------------------------------


def _norm_factory(norm: str, arch: str) -> Callable[[int], nn.Module]:
    """Return a constructor ``channels -> normalisation layer``."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda ch: nn.GroupNorm(2, ch)
    raise ScenarioError(f"clients.models.{arch}.norm", norm, "batch or group")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv shortcut when the shape changes).

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the first conv.
    norm : Callable[[int], nn.Module]
        Normalisation layer constructor.
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(FedModel):
    """CIFAR ResNet (He et al. 2016): 3 stages of 16/32/64 channels, ``n`` blocks each.

    Parameters
    ----------
    in_channels : int
        Input channels (1 or 3).
    n : int
        Basic blocks per stage (depth ``6n + 2``).
    num_classes : int
        Number of output logits.
    norm : Callable[[int], nn.Module]
        Normalisation layer constructor.
    """

    def __init__(
        self, in_channels: int, n: int, num_classes: int, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__(64, num_classes)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            norm(16),
            nn.ReLU(inplace=True),
        ]
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride, norm))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming init for convs, unit scale for norms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Globally pooled 64-d features."""
        return self.body(x)


def _resnet(
    arch: str, n: int, input_shape: tuple[int, ...], num_classes: int, norm: str
) -> FedModel:
    """Build a CIFAR ResNet with ``n`` blocks per stage."""
    c, _, _ = _spatial(input_shape)
    return ResNet(c, n, num_classes, _norm_factory(norm, arch))


@MODELS.register("resnet8")
def resnet8(input_shape: tuple[int, ...], num_classes: int, norm: str = "batch") -> FedModel:
    """ResNet-8 (one basic block per stage); ``norm`` is ``"batch"`` or ``"group"``."""
    return _resnet("resnet8", 1, input_shape, num_classes, norm)


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, norm: str = "batch") -> FedModel:
    """ResNet-20 (three basic blocks per stage); ``norm`` is ``"batch"`` or ``"group"``."""
    return _resnet("resnet20", 3, input_shape, num_classes, norm)


# ---------------------------------------------------------------------------------------------
# Construction and assignment
# ---------------------------------------------------------------------------------------------


def _check_params(arch: str, builder: Callable[..., FedModel], params: dict[str, object]) -> None:
    """Reject parameters the builder does not accept."""
    accepted = [
        p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ScenarioError(f"clients.models.{arch}", unknown[0], f"parameters {accepted}")


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    **params: object,
) -> FedModel:
    """Build a model with a deterministic initialisation.

    The global torch RNG state is left untouched.

    Parameters
    ----------
    arch : str
        Registered model name.
    input_shape : tuple[int, ...]
        Shape of one example, e.g. ``(1, 28, 28)``.
    num_classes : int
        Number of classes.
    seed : int
        Initialisation seed; the same seed gives an identical ``state_dict``.
    **params
        Architecture parameters.

    Returns
    -------
    FedModel
        The freshly initialised model.
    """
    builder = MODELS.get(arch, "clients.models")
    _check_params(arch, builder, params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(input_shape), num_classes, **params)


def _largest_remainder(fractions: Sequence[float], total: int) -> list[int]:
    """Integer counts proportional to ``fractions`` that sum exactly to ``total``."""
    exact = [f * total for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_archs(specs: list[tuple[str, float]], num_clients: int, seed: int) -> list[str]:
    """Assign an architecture to every client according to fractions.

    Parameters
    ----------
    specs : list[tuple[str, float]]
        ``(arch, fraction)`` pairs; fractions are non-negative and sum to 1.
    num_clients : int
        Number of clients.
    seed : int
        Shuffle seed.

    Returns
    -------
    list[str]
        ``archs[cid]`` for every client id; counts follow the largest-remainder method.

    Raises
    ------
    ScenarioError
        When the specs are empty or the fractions are negative or do not sum to 1.
    """
    fractions = [float(f) for _, f in specs]
    if not specs or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ScenarioError("clients.models", specs, "non-negative fractions summing to 1")
    counts = _largest_remainder(fractions, num_clients)
    archs = [arch for (arch, _), k in zip(specs, counts, strict=True) for _ in range(k)]
    order = np.random.default_rng(seed).permutation(num_clients)
    return [archs[i] for i in order]


def one_latent_dim(dims: dict[str, int], why: str) -> int:
    """The one latent width shared by every architecture group in ``dims``.

    Raises
    ------
    ScenarioError
        When the groups' latent widths differ (``why`` says what needs them equal).
    """
    if len(set(dims.values())) != 1:
        raise ScenarioError("clients.models", dims, f"architectures sharing one latent_dim ({why})")
    return next(iter(dims.values()))
