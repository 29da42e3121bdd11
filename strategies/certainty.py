"""FedAUX's certainty weighting: teachers weigh by how much a sample resembles their own data.

Sattler, Korjakow, Rischke, Samek, "FedAUX: Leveraging Unlabeled Auxiliary Data in Federated
Learning", IEEE TNNLS 2021 (arXiv 2102.02514; reference code: github.com/fedl-repo/fedaux,
``code/fl_devices.py``: ``Client.extract_features_and_compute_scores`` and the
``weighted_logits_precomputed`` mode of ``Server.distill``).

Each client ``k`` fits a small L2-regularised logistic regression (the *scorer*) that tells its
own private samples (label 1) from the public samples (label 0), on features of a feature map
every client shares. It releases the scorer with Gaussian noise on its parameters, which makes
the release (ε, δ)-differentially private with respect to its private samples, and uploads its
*certainty scores* ``s_k(x) = sigmoid(θ_k · u(x)) ∈ (0, 1)`` on the proxy samples. The server
weighs each teacher's prediction on sample ``x_n`` by

    w[n, k] = s_k(x_n) / Σ_j s_j(x_n),

so a teacher counts where the sample looks like the data it was trained on. Rows where every
score is (numerically) zero are uniform. The :class:`Certainty` weighting reads the scores from
``TeacherContext.certainty``; its class attribute ``client_scores = True`` tells a strategy that
the clients must compute them (:func:`certainty_scores`) and upload them with their reply.
FedAUX averages the teachers' *logits* with these weights (``softmax(Σ_k s_k z_k / Σ_k s_k)``),
which is FedDF's ``ensemble: logits`` in fedkd.

Feature map (:func:`fit_feature_map`). FedAUX scores on the features of a network pre-trained
with contrastive self-supervision (SimCLR) on the auxiliary data, which all clients share at
initialisation. fedkd has no such extractor, so the map is fixed and computed from the public
data only: flatten, standardise with the public per-feature mean and standard deviation (a
constant feature keeps standard deviation 1), optionally project with a fixed Gaussian matrix
``R ∈ R^{D×dim}`` (entries ``N(0, 1/dim)``, drawn from ``torch.Generator`` seeded with
``feature_seed``, the same on every client), divide by the largest norm of a mapped public
sample and clip every row to norm ≤ 1. Since the map depends on public data only, the scores of
the proxy samples are a post-processing of the released scorer.

Scorer (:func:`fit_scorer`). The scorer's input is ``u(x) = [φ(x), 1] / √2`` with ``‖φ(x)‖ ≤ 1``
(so ``‖u‖ ≤ 1`` and the bias is a regularised coordinate of ``θ = (weight, bias)``); it minimises
the class-balanced objective

    J(θ) = mean_own softplus(-θ·u) + mean_public softplus(θ·u) + (λ/2) ‖θ‖²

(float64, full batch, L-BFGS with a strong-Wolfe line search from ``θ = 0``, ``steps``
iterations at most). The two class means make the scorer independent of the client's size.

Differential privacy (:func:`dp_sigma`). With ``dp_epsilon`` set, the released parameters are
``θ + σ ξ`` with ``ξ = torch.randn(dim + 1)`` (weight entries first, then the bias) drawn from a
``torch.Generator`` seeded with ``seed`` (never the global generator) and

    σ = Δ · sqrt(2 ln(1.25/δ)) / ε,   Δ = 2 / (n λ),

``n`` the client's own samples: the Gaussian mechanism (Dwork and Roth, Theorem A.1, which holds
for ε < 1, hence ``dp_epsilon`` in (0, 1)) at the L2 sensitivity of regularised logistic
regression's minimiser (Chaudhuri, Monteleoni, Sarwate, "Differentially Private Empirical Risk
Minimization", JMLR 2011, output perturbation). For ``J``
above, replacing one own sample changes the gradient of the own term by at most ``2/n``
(``|softplus'| ≤ 1``, ``‖u‖ ≤ 1``) while the public term is the same on both datasets, and
``J`` is λ-strongly convex, so the minimisers differ by at most ``2/(nλ)``. The guarantee is for
the exact minimiser; ``steps`` L-BFGS iterations approximate it. It covers one release: a client
that recomputes its scores should reuse its seed (same data, same output) rather than pay for
fresh noise. This is the reference code's formula (``sig2 = 2 ln(1.25/δ) sensitivity² / ε²``,
``sensitivity = 2/(nλ)``) with the differences below.

Where fedkd differs from the reference code, and why:

- features: a fixed public-data feature map instead of the SimCLR-pretrained network (above);
- normalisation: the code divides by the largest feature norm over the client's own *and* the
  public samples, a statistic of the private data outside the privacy analysis; fedkd scales
  by the largest public norm and clips, so ``‖φ‖ ≤ 1`` holds by construction;
- objective: the code fits scikit-learn's ``LogisticRegression(C=1/λ)``, which *sums* the losses
  (effective regulariser λ/n, so its minimiser's sensitivity is ``2/λ``, n times the ``2/(nλ)``
  its noise is calibrated for), leaves the intercept unregularised and weighs the classes by
  their sizes; fedkd minimises the class-balanced mean objective ``J`` the bound is for, with
  the bias regularised through the constant coordinate;
- ``n``: the code counts own plus public samples; only the own samples are protected (the public
  term is identical on neighbouring datasets), so fedkd's ``n`` is the own count;
- noise: the code draws from numpy's global generator; fedkd from a generator seeded with
  ``seed`` (reproducible, and the global generators are left untouched);
- scores: the code adds ``1e-8`` to every score so no row sums to zero; fedkd keeps the scores
  and makes rows whose scores sum to at most :data:`ZERO_TOTAL` uniform;
- data: the code splits the auxiliary data into a distillation part and a disjoint public part
  for the scorer; a fedkd client may pass the proxy set as both ``public_x`` and ``proxy_x``
  (it then also scores samples the scorer saw as negatives);
- timing: the code scores once, before training, with the frozen pre-trained features; fedkd's
  feature map does not change with training either, so the scores of a client depend only on
  its data, the public data, the settings and ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedkd.client import ClientEnv, client_fn, seed_for, train
from strategies.weighting import WEIGHTINGS, TeacherContext, make_weighting

#: Rows whose certainty scores sum to at most this are given uniform weights.
ZERO_TOTAL = 1e-12

_SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class CertaintyParams:
    """The client-side scorer's settings (the ``certainty`` weighting's ``weighting_params``).

    Attributes
    ----------
    l2 : float (default: 0.01)
        λ > 0, the L2 regulariser of the scorer (strong convexity the DP bound needs).
    steps : int (default: 100)
        L-BFGS iterations at most (>= 1).
    lr : float (default: 1.0)
        L-BFGS step size (> 0).
    dim : int or None (default: 64)
        Features after the fixed random projection (>= 1); None keeps the standardised
        flattened inputs.
    dp_epsilon : float or None (default: None)
        ε in (0, 1) of the Gaussian noise on the scorer; None releases the scorer without noise.
    dp_delta : float (default: 1e-5)
        δ in (0, 1).
    feature_seed : int (default: 0)
        Seed of the random projection, shared by every client.
    """

    l2: float = 0.01
    steps: int = 100
    lr: float = 1.0
    dim: int | None = 64
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    feature_seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("l2", self.l2, _number(self.l2) and self.l2 > 0, "a number > 0"),
            ("steps", self.steps, _integer(self.steps) and self.steps >= 1, "an integer >= 1"),
            ("lr", self.lr, _number(self.lr) and self.lr > 0, "a number > 0"),
            ("dim", self.dim, self.dim is None or (_integer(self.dim) and self.dim >= 1),
             "an integer >= 1 or None"),
            ("dp_epsilon", self.dp_epsilon,
             self.dp_epsilon is None or (_number(self.dp_epsilon) and 0 < self.dp_epsilon < 1),
             "a number in (0, 1) (the Gaussian mechanism's calibration holds there) or None"),
            ("dp_delta", self.dp_delta, _number(self.dp_delta) and 0 < self.dp_delta < 1,
             "a number in (0, 1)"),
            ("feature_seed", self.feature_seed, _integer(self.feature_seed), "an integer")]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- features
def clip_rows(x: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Scale every row of ``x`` whose L2 norm exceeds ``max_norm`` down to ``max_norm``."""
    norm = x.norm(dim=1, keepdim=True)
    return x * torch.clamp(max_norm / norm.clamp_min(1e-300), max=1.0)


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """The fixed feature map ``φ`` every client shares (built from public data only).

    Attributes
    ----------
    mean, std : torch.Tensor
        ``(D,)`` per-feature mean and standard deviation of the flattened public inputs.
    projection : torch.Tensor or None
        ``(D, dim)`` random projection, or None.
    scale : float
        Largest norm of a projected, standardised public sample (1 when all are 0).
    """

    mean: torch.Tensor
    std: torch.Tensor
    projection: torch.Tensor | None
    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` inputs -> ``(N, d)`` float64 features of norm at most 1."""
        return clip_rows(self._raw(x) / self.scale)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.reshape(len(x), -1).to(torch.float64) - self.mean) / self.std
        return z if self.projection is None else z @ self.projection


def fit_feature_map(public: torch.Tensor, dim: int | None = 64, seed: int = 0) -> FeatureMap:
    """The feature map of the module docstring, from the public inputs.

    Parameters
    ----------
    public : torch.Tensor
        ``(M, ...)`` public inputs (M >= 1).
    dim : int or None (default: 64)
        Output dimension of the random projection; None: no projection.
    seed : int (default: 0)
        Seed of the projection's generator (the same on every client).

    Returns
    -------
    FeatureMap
    """
    if len(public) == 0:
        raise ValueError("the feature map needs at least one public sample")
    flat = public.reshape(len(public), -1).to(torch.float64)
    mean = flat.mean(dim=0)
    std = flat.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    projection = None
    if dim is not None:
        gen = torch.Generator().manual_seed(seed)
        projection = torch.randn(flat.shape[1], dim, generator=gen,
                                 dtype=torch.float64) / math.sqrt(dim)
    fmap = FeatureMap(mean=mean, std=std, projection=projection, scale=1.0)
    scale = float(fmap._raw(public).norm(dim=1).max())
    return FeatureMap(mean=mean, std=std, projection=projection,
                      scale=scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------- scorer
def _augment(features: torch.Tensor) -> torch.Tensor:
    """``u = [clip(φ), 1] / √2``: rows of norm at most 1, the bias as a constant coordinate."""
    phi = clip_rows(features.to(torch.float64))
    return torch.cat([phi, torch.ones(len(phi), 1, dtype=torch.float64)], dim=1) / _SQRT2


@dataclass(frozen=True, eq=False)
class Scorer:
    """A (possibly noised) logistic-regression scorer ``s(x) = sigmoid((φ·weight + bias)/√2)``.

    Attributes
    ----------
    weight : torch.Tensor
        ``(d,)`` float64 weights on the (clipped) features.
    bias : float
        The bias (the weight of the constant coordinate).
    """

    weight: torch.Tensor
    bias: float

    @property
    def theta(self) -> torch.Tensor:
        """``(d + 1,)`` parameters ``(weight, bias)``, the vector the DP noise is added to."""
        return torch.cat([self.weight, self.weight.new_tensor([self.bias])])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float64 logits ``θ · u(x)`` of ``(N, d)`` features (rows clipped to norm 1)."""
        return _augment(features) @ self.theta

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float64 scores ``sigmoid(θ · u(x))`` in (0, 1): how much ``x`` looks own."""
        return torch.sigmoid(self.logits(features))


def objective(theta: torch.Tensor, own: torch.Tensor, public: torch.Tensor,
              l2: float) -> torch.Tensor:
    """The scorer's class-balanced objective ``J(θ)`` (module docstring) on ``(·, d)`` features."""
    own_loss = F.softplus(-(_augment(own) @ theta)).mean()
    public_loss = F.softplus(_augment(public) @ theta).mean()
    return own_loss + public_loss + 0.5 * l2 * theta.dot(theta)


def dp_sigma(n: int, l2: float, epsilon: float, delta: float) -> float:
    """Noise scale ``σ = (2 / (n λ)) · sqrt(2 ln(1.25/δ)) / ε`` for ``n`` own samples."""
    return 2.0 / (n * l2) * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def fit_scorer(own: torch.Tensor, public: torch.Tensor, *, l2: float = 0.01, steps: int = 100,
               lr: float = 1.0, seed: int = 0, dp_epsilon: float | None = None,
               dp_delta: float = 1e-5) -> Scorer:
    """Fit the scorer that tells ``own`` features (label 1) from ``public`` ones (label 0).

    Parameters
    ----------
    own, public : torch.Tensor
        ``(n, d)`` and ``(m, d)`` features (rows are clipped to norm 1), n, m >= 1.
    l2 : float (default: 0.01)
        λ > 0.
    steps : int (default: 100)
        L-BFGS iterations at most.
    lr : float (default: 1.0)
        L-BFGS step size.
    seed : int (default: 0)
        Seed of the DP noise's generator.
    dp_epsilon : float or None (default: None)
        ε in (0, 1); None: no noise.
    dp_delta : float (default: 1e-5)
        δ in (0, 1).

    Returns
    -------
    Scorer
        The minimiser of ``J``, plus ``dp_sigma(n, l2, dp_epsilon, dp_delta) *
        torch.randn(d + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)``
        when ``dp_epsilon`` is set. Deterministic given its arguments.
    """
    CertaintyParams(l2=l2, steps=steps, lr=lr, dp_epsilon=dp_epsilon, dp_delta=dp_delta)
    if own.dim() != 2 or public.dim() != 2 or own.shape[1] != public.shape[1]:
        raise ValueError(f"own and public features must be (n, d) and (m, d), got "
                         f"{tuple(own.shape)} and {tuple(public.shape)}")
    if len(own) == 0 or len(public) == 0:
        raise ValueError("the scorer needs at least one own and one public sample")
    own = own.detach().to(torch.float64)
    public = public.detach().to(torch.float64)
    theta = torch.zeros(own.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=lr, max_iter=steps, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta, own, public, l2)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = theta.detach().clone()
    if dp_epsilon is not None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(fitted), generator=gen, dtype=torch.float64)
        fitted = fitted + dp_sigma(len(own), l2, dp_epsilon, dp_delta) * noise
    return Scorer(weight=fitted[:-1], bias=float(fitted[-1]))


def certainty_scores(own_x: torch.Tensor, public_x: torch.Tensor, proxy_x: torch.Tensor,
                     params: CertaintyParams, seed: int) -> torch.Tensor:
    """What a client computes and uploads: its certainty scores on the proxy samples.

    Parameters
    ----------
    own_x : torch.Tensor
        ``(n, ...)`` the client's private inputs.
    public_x : torch.Tensor
        ``(m, ...)`` public inputs (the scorer's negatives; may be the proxy set itself).
    proxy_x : torch.Tensor
        ``(N, ...)`` the samples the server weighs teachers on.
    params : CertaintyParams
        The scorer's settings (``Certainty.params`` on the server).
    seed : int
        Seed of the client's DP noise (fix it per client, see the module docstring).

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 scores in [0, 1].
    """
    fmap = fit_feature_map(public_x, params.dim, params.feature_seed)
    scorer = fit_scorer(fmap(own_x), fmap(public_x), l2=params.l2, steps=params.steps,
                        lr=params.lr, seed=seed, dp_epsilon=params.dp_epsilon,
                        dp_delta=params.dp_delta)
    return scorer.scores(fmap(proxy_x)).to(torch.float32)


# ---------------------------------------------------------------------------------- weighting
def certainty_weights(scores: torch.Tensor) -> torch.Tensor:
    """``(K, N)`` certainty scores -> ``(N, K)`` weights ``s_k(x_n) / Σ_j s_j(x_n)``.

    A row whose scores sum to at most :data:`ZERO_TOTAL` is uniform.

    Raises
    ------
    ValueError
        When a score is negative or not finite.
    """
    s = scores.detach().to(torch.float64).T
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("certainty scores must be finite and >= 0")
    total = s.sum(dim=1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[1])
    return torch.where(total > ZERO_TOTAL, s / total.clamp_min(ZERO_TOTAL), uniform)


@WEIGHTINGS.register("certainty")
class Certainty:
    """FedAUX: ``w[n, k] = s_k(x_n) / Σ_j s_j(x_n)`` from the clients' uploaded certainty scores
    (``TeacherContext.certainty``, ``(K, N)``); all-zero rows are uniform.

    The parameters configure the client-side scorer (:class:`CertaintyParams`, exposed as
    ``self.params``); clients compute the scores with :func:`certainty_scores`.

    Parameters
    ----------
    l2 : float (default: 0.01)
        λ of the scorer.
    steps : int (default: 100)
        L-BFGS iterations at most.
    lr : float (default: 1.0)
        L-BFGS step size.
    dim : int or None (default: 64)
        Random-projection dimension; None: none.
    dp_epsilon : float or None (default: None)
        ε in (0, 1) of the scorer's Gaussian noise; None: no noise.
    dp_delta : float (default: 1e-5)
        δ in (0, 1).
    feature_seed : int (default: 0)
        Seed of the shared random projection.
    """

    uses_labels = False
    #: Clients must compute and upload certainty scores (:func:`certainty_scores`).
    client_scores = True

    def __init__(self, l2: float = 0.01, steps: int = 100, lr: float = 1.0,
                 dim: int | None = 64, dp_epsilon: float | None = None,
                 dp_delta: float = 1e-5, feature_seed: int = 0) -> None:
        self.params = CertaintyParams(l2=l2, steps=steps, lr=lr, dim=dim, dp_epsilon=dp_epsilon,
                                      dp_delta=dp_delta, feature_seed=feature_seed)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if ctx.certainty is None:
            raise ValueError("the certainty weighting needs the clients' certainty scores on the "
                             "weighted samples (TeacherContext.certainty, computed by the clients "
                             "with strategies.certainty.certainty_scores)")
        expected = (logits.shape[0], logits.shape[1])
        if tuple(ctx.certainty.shape) != expected:
            raise ValueError(f"certainty scores must be (K, N) = {expected}, "
                             f"got {tuple(ctx.certainty.shape)}")
        return certainty_weights(ctx.certainty).to(logits.dtype)


# ---------------------------------------------------------------------------------- client
#: The train message of a client that also uploads its certainty scores (FedDF + FedAUX).
CERTAINTY_TRAIN = f"{MessageType.TRAIN}.certainty"

#: Seed purpose of a client's scorer noise: fixed per client across rounds, so re-sending the
#: same scores spends no further privacy.
SCORER_SEED = 4711


@client_fn(CERTAINTY_TRAIN)
def train_with_certainty(msg: Message, env: ClientEnv) -> RecordDict:
    """FedAvg's local update, plus this client's certainty scores on the proxy split.

    The scorer's settings are the scenario's ``weighting_params``; the scores depend on the
    client's data and the public split only, so every round sends the same ``(N,)`` float32
    array (counted in the upload) where FedAUX sends it once.
    """
    reply = train(msg, env)
    weighting = make_weighting("certainty",
                               env.world.scenario.strategy.params.get("weighting_params"))
    public = env.world.data.public
    assert public is not None
    scores = certainty_scores(env.data.x, public.x, public.x, weighting.params,
                              seed=seed_for(env.world.scenario.seed, env.cid, SCORER_SEED))
    reply["certainty"] = ArrayRecord({"scores": Array(scores.numpy())})
    return reply


def uploaded_scores(replies: Sequence[Message]) -> torch.Tensor:
    """``(K, N)`` the certainty scores the replying clients uploaded, in reply order."""
    return torch.stack([torch.from_numpy(np.array(
        r.content.array_records["certainty"]["scores"].numpy(), dtype=np.float32))
        for r in replies])
