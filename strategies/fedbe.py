"""FedBE: Making Bayesian Model Ensemble Applicable to Federated Learning.

Chen & Chao, ICLR 2021 (reference code: ``hongyouc/FedBE``: ``main.py``, ``swag.py``
(``SWAG_server``), ``models/Update.py`` (``ServerUpdate``), ``utils/tools.py``
(``merge_logits``) and the FedBE command of ``run.sh``).

Clients train and upload weights exactly as in FedAvg (the base ``"train"`` message and
handler); FedBE only replaces the aggregation. The server, each round, for its one
architecture group:

1. averages the client weights (FedAvg, weighted by ``num-examples``);
2. fits a diagonal Gaussian, per parameter, and samples ``num_samples`` models (reference:
   ``--num_sample_teacher 10``) from a generator seeded by ``seed_for(seed, round, ...)``:

   - ``gaussian: reference`` (default; the reference's ``SWAG_server`` ``"gaussian"`` mode):
     over the clients' *updates* from the round's global model ``w0``, each normalised per
     tensor, ``d_i = (w_i - w0) / ||w_i - w0||``: ``mu = mean_i d_i`` and
     ``var = max(mean_i d_i² - mu², 1e-5)`` (unweighted over clients); a sample is
     ``w0 + r · (mu + s · sqrt(var) · eps)``, ``eps ~ N(0, I)``, where ``r`` is the clients'
     mean update norm of that tensor and ``s = var_scale = 0.1`` (``--var_scale``);
   - ``gaussian: weights`` (the paper's formula): ``mu = sum_i p_i w_i`` and
     ``var = sum_i p_i (w_i - mu)²`` with ``p_i`` the clients' data shares; a sample is
     ``mu + s · sqrt(var) · eps`` (``var_scale: 1`` is the paper's Gaussian exactly);

   integer buffers (BatchNorm's ``num_batches_tracked``) take FedAvg's values;
3. forms the ensemble in the reference's order ``[FedAvg, samples..., clients...]`` (the
   clients with ``use_clients``, the reference's ``--use_client`` in its FedBE command);
4. averages the teachers' softmax probabilities on the unlabeled proxy set (``data.public``)
   and sharpens the mean, ``p^(1/t) / sum_c p^(1/t)`` with ``t = sharpen = 0.5`` (the
   reference's ``temp_sharpen`` at ``--temp 0.5``; ``sharpen: 1`` keeps the mean);
5. distils the targets into the FedAvg model with SGD (``distill_lr = 1e-3``, momentum 0.9,
   weight decay 1e-5, batches of ``distill_batch_size = 128``, the reference's ``set_opt``)
   for ``distill_steps`` steps, with stochastic weight averaging (``swa: true``, the
   reference's ``--use_SWA``): a running mean of the weights taken after every
   ``swa_freq = 25``-th step past step ``swa_start = 500`` (torchcontrib's automatic mode,
   learning rate unchanged, as the reference); the average is the new global model (the last
   iterate when no average was taken). With BatchNorm, its statistics are recomputed on the
   proxy set after averaging (the reference does it for its ResNets).

Each round records ``teachers`` (ensemble size), ``distill-steps``, ``swa-models`` (weights
averaged), and on the server validation split (``data.val_fraction``) ``val-acc-avg``
(FedAvg), ``val-acc-ensemble`` and ``val-acc-distilled`` (the new global model); FedBE never
falls back to FedAvg (``distill-fallback`` is 0). ``distill_steps: 0`` is FedAvg exactly.

Loss conventions (pinned in ``tests/test_fedbe.py``): ``KL(target ‖ softmax(student))`` at
``T = 1``, ``reduction="batchmean"``, targets computed without gradient (teachers in eval
mode) and detached: FedDF's ``distill_loss("probs", 1.0)``. The reference averages the same
KL over samples *and* classes (``(P * (P.log() - Q.log())).mean()``), ``C`` times smaller:
at one learning rate fedkd's SGD steps are ``C`` times the reference's.

Where fedkd differs: a step budget (``distill_steps = 1000``) instead of the reference's 20
epochs over its server split (about 1,580 steps on CIFAR-10); FedDF's ``distill`` (Adam,
cosine schedule, early stopping) is not used, because FedBE's reference distils with SGD and
averages its iterates. A zero update norm (a tensor no client changed) gives a zero direction
instead of the reference's division by zero. One architecture group only: Gaussian sampling
needs one shared weight space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from fedkd.client import seed_for
from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.ensemble import Teacher, TeacherEnsemble
from fedkd.errors import ScenarioError
from fedkd.train import batch_indices, device_of, evaluate, fit
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, num_examples
from strategies.feddf import DistillResult, ServerData, distill_loss, ensemble_targets, round_stats
from strategies.fedmd import require_public

State = dict[str, torch.Tensor]
GAUSSIANS = ("reference", "weights")
#: The reference's server optimiser besides the learning rate (``ServerUpdate.set_opt``).
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-5
#: The reference's floor of the per-parameter variance (``SWAG_server.compute_var``).
VAR_FLOOR = 1e-5


# ---------------------------------------------------------------------------------- pure parts
def _floating(state: State) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def gaussian_samples(base: State, fedavg: State, clients: Sequence[State],
                     shares: Sequence[float], num: int, var_scale: float,
                     generator: torch.Generator, mode: str = "reference") -> list[State]:
    """``num`` models drawn from a diagonal Gaussian fitted to the client models.

    Parameters
    ----------
    base : State
        The round's global model ``w0`` (``mode="reference"`` centres the updates on it).
    fedavg : State
        The FedAvg model (integer buffers are copied from it).
    clients : Sequence[State]
        The client models.
    shares : Sequence[float]
        The clients' data sizes (``mode="weights"`` weighs by them).
    num, var_scale : int, float
        Samples to draw; multiplier ``s`` of the standard deviation.
    generator : torch.Generator
        Seeded; draws sample by sample, tensor by tensor in state order.
    mode : str
        ``"reference"`` (normalised updates, the reference's default) or ``"weights"``.
    """
    keys = _floating(fedavg)
    if mode == "reference":
        mean, std, offset, scale = _update_gaussian(base, clients, keys)
    elif mode == "weights":
        mean, std = _weight_gaussian(clients, shares, keys)
        offset, scale = {k: torch.zeros(()) for k in keys}, {k: torch.ones(()) for k in keys}
    else:
        raise ScenarioError("strategy.params.gaussian", mode, " | ".join(GAUSSIANS))
    out = []
    for _ in range(num):
        sample = dict(fedavg)
        for k in keys:
            eps = torch.randn(mean[k].shape, generator=generator, dtype=torch.float64)
            draw = offset[k] + scale[k] * (mean[k] + var_scale * std[k] * eps)
            sample[k] = draw.to(fedavg[k].dtype)
        out.append(sample)
    return out


def _update_gaussian(base: State, clients: Sequence[State], keys: list[str],
                     ) -> tuple[State, State, State, State]:
    """Mean and std of the per-tensor normalised updates; ``w0`` and the mean update norm."""
    mean, std, offset, scale = {}, {}, {}, {}
    for k in keys:
        w0 = base[k].to(torch.float64)
        upd = torch.stack([c[k].to(torch.float64) - w0 for c in clients])
        norms = upd.flatten(1).norm(dim=1).view(-1, *([1] * w0.dim()))
        dirs = torch.where(norms > 0, upd / norms.clamp_min(1e-300), torch.zeros_like(upd))
        mean[k] = dirs.mean(dim=0)
        std[k] = ((dirs ** 2).mean(dim=0) - mean[k] ** 2).clamp_min(VAR_FLOOR).sqrt()
        offset[k], scale[k] = w0, norms.mean()
    return mean, std, offset, scale


def _weight_gaussian(clients: Sequence[State], shares: Sequence[float], keys: list[str],
                     ) -> tuple[State, State]:
    """Data-share-weighted mean and std of the client weights."""
    p = torch.tensor(shares, dtype=torch.float64)
    p = p / p.sum()
    mean, std = {}, {}
    for k in keys:
        w = torch.stack([c[k].to(torch.float64) for c in clients])
        pw = p.view(-1, *([1] * (w.dim() - 1)))
        mean[k] = (pw * w).sum(dim=0)
        std[k] = (pw * (w - mean[k]) ** 2).sum(dim=0).sqrt()
    return mean, std


def sharpen(probs: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """``p^(1/t) / sum_c p^(1/t)`` per row, each power floored at 1e-8 (reference
    ``temp_sharpen``); ``t = 1`` returns the rows unchanged, ``t < 1`` sharpens."""
    if temperature == 1.0:
        return probs
    powered = probs.pow(1.0 / temperature).clamp_min(1e-8)
    return powered / powered.sum(dim=-1, keepdim=True)


class AveragedSGD(torch.optim.SGD):
    """SGD that keeps a running mean of its parameters (stochastic weight averaging).

    After its ``n``-th step (counted from 1) with ``n > start`` and ``n % freq == 0`` the
    parameters join the mean, as torchcontrib's SWA in automatic mode (Izmailov et al. 2018).
    ``start=None`` never averages. :meth:`swap` loads the mean into the parameters.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float,
                 weight_decay: float, start: int | None, freq: int) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.start, self.freq = start, freq
        self.steps = 0
        self.averaged = 0
        self.mean = [torch.zeros_like(p) for g in self.param_groups for p in g["params"]]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """An SGD step, then maybe an update of the running mean."""
        loss = super().step(closure)
        self.steps += 1
        if self.start is not None and self.steps > self.start and self.steps % self.freq == 0:
            self.averaged += 1
            with torch.no_grad():
                for m, p in zip(self.mean, self._params(), strict=True):
                    m.add_((p - m) / self.averaged)
        return loss

    def swap(self) -> int:
        """Load the running mean into the parameters (if any); the number of models averaged."""
        if self.averaged:
            with torch.no_grad():
                for m, p in zip(self.mean, self._params(), strict=True):
                    p.copy_(m)
        return self.averaged

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


def swa_distill(student: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, steps: int,
                batch_size: int, lr: float, seed: int, swa_start: int | None,
                swa_freq: int) -> tuple[int, int]:
    """Distil ``targets`` on ``x`` into ``student`` with SGD and optional weight averaging.

    Returns
    -------
    tuple[int, int]
        Steps run and models averaged (0: the last iterate is kept).
    """
    opt = AveragedSGD(student.parameters(), lr=lr, momentum=MOMENTUM,
                      weight_decay=WEIGHT_DECAY, start=swa_start, freq=swa_freq)
    batches = batch_indices(len(x), batch_size, torch.Generator().manual_seed(seed),
                            steps=steps)
    dev = device_of(student)  # the server's device; x and targets may stay on the CPU
    ran = fit(student, opt, batches,
              lambda idx: loss_fn(student(x[idx].to(dev)), targets[idx].to(dev))).steps
    averaged = opt.swap()
    if averaged and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for m in student.modules()):
        torch.optim.swa_utils.update_bn([x[i:i + batch_size].to(dev)
                                         for i in range(0, len(x), batch_size)], student)
    return ran, averaged


# ---------------------------------------------------------------------------------- strategy
@STRATEGIES.register("fedbe")
class FedBE(FedAvg):
    """FedAvg, then a Bayesian model ensemble (FedAvg, Gaussian samples, clients) distilled
    on proxy data into the global model.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    num_samples : int
        Models sampled from the Gaussian per round (reference: 10).
    gaussian : str
        ``"reference"`` (normalised client updates) or ``"weights"`` (the paper's Gaussian
        over client weights).
    var_scale : float
        Multiplier of the sampled standard deviation (reference: 0.1).
    use_clients : bool
        Whether the client models join the ensemble (reference FedBE: yes).
    sharpen : float
        Temperature of the target sharpening ``p^(1/t)`` (reference: 0.5; 1 disables).
    distill_steps : int
        SGD steps of the server distillation per round (0: FedAvg).
    distill_batch_size : int
        Proxy samples per step (reference: 128).
    distill_lr : float
        SGD learning rate (reference: 1e-3).
    swa : bool
        Stochastic weight averaging of the distillation iterates (reference: on).
    swa_start, swa_freq : int
        Averaging starts after step ``swa_start`` and takes every ``swa_freq``-th step
        (reference: 500 and 25).
    """

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 num_samples: int = 10, gaussian: str = "reference", var_scale: float = 0.1,
                 use_clients: bool = True, sharpen: float = 0.5, distill_steps: int = 1000,
                 distill_batch_size: int = 128, distill_lr: float = 1e-3, swa: bool = True,
                 swa_start: int = 500, swa_freq: int = 25) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        _check_params(num_samples=num_samples, gaussian=gaussian, var_scale=var_scale,
                      sharpen=sharpen, distill_steps=distill_steps,
                      distill_batch_size=distill_batch_size, distill_lr=distill_lr,
                      swa_start=swa_start, swa_freq=swa_freq)
        self.num_samples = num_samples
        self.gaussian = gaussian
        self.var_scale = var_scale
        self.use_clients = use_clients
        self.sharpen = sharpen
        self.distill_steps = distill_steps
        self.distill_batch_size = distill_batch_size
        self.distill_lr = distill_lr
        self.swa = swa
        self.swa_start = swa_start
        self.swa_freq = swa_freq
        self.server: ServerData | None = None
        self.distill_log: dict[int, dict[str, float]] = {}

    def bind(self, world: World) -> None:
        """Bind the world; FedBE needs a proxy split and one architecture."""
        if len(world.groups) != 1:
            raise ScenarioError("clients.models", list(world.groups),
                                "one architecture: FedBE samples models from a Gaussian "
                                "over the clients' weights, which needs one weight space")
        require_public(world, "fedbe")
        super().bind(world)
        self.server = ServerData.of_world(world)

    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """Distil the ensemble {FedAvg, Gaussian samples, clients} into the FedAvg model."""
        if self.distill_steps == 0:
            return groups
        ((arch, rec),) = groups.items()
        server = self._server()
        ensemble = self.teachers(server_round, arch, rec, replies)
        x = server.proxy.x if server.val is None else torch.cat([server.proxy.x, server.val.x])
        logits = ensemble.logits(x)
        n = len(server.proxy)
        uniform = torch.full((n, len(ensemble)), 1.0 / len(ensemble))
        self.diagnose(server_round, ensemble, logits, n)
        targets = sharpen(ensemble_targets(logits[:, :n], uniform, "probs", 1.0), self.sharpen)
        student = server.space.build(arch, arrayrecord_to_state_dict(rec))
        before = self._val_acc(student)
        steps, averaged = swa_distill(
            student, server.proxy.x, targets, distill_loss("probs", 1.0),
            steps=self.distill_steps, batch_size=self.distill_batch_size, lr=self.distill_lr,
            seed=seed_for(self.seed, server_round, 303),
            swa_start=self.swa_start if self.swa else None, swa_freq=self.swa_freq)
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        result = DistillResult(state, steps, steps, before, self._val_acc(student))
        stats = round_stats({arch: result}, server.share)
        stats.update({"teachers": len(ensemble), "swa-models": averaged})
        if server.val is not None:
            probs = torch.softmax(logits[:, n:], dim=2).mean(dim=0)
            stats["val-acc-ensemble"] = float((probs.argmax(1) == server.val.y).float().mean())
        for key, value in stats.items():
            metrics[key] = value
        self.distill_log[server_round] = stats
        return {arch: state_dict_to_arrayrecord(state)}

    def diagnose(self, server_round: int, ensemble: TeacherEnsemble, logits: torch.Tensor,
                 n: int) -> None:
        """Record the uniform ensemble on the proxy set (and the validation split, the rest of
        ``logits``). Server-made teachers are recorded with ids below -1: -2 the FedAvg
        model, -3, -4, ... the Gaussian samples."""
        server = self._server()
        ids = [t.cid if t.cid >= 0 else -2 - i for i, t in enumerate(ensemble.teachers)]
        k = len(ids)
        truth = server.proxy.y if server.proxy_truth else None
        self.teacher_log.record(server_round, ids, logits[:, :n],
                                torch.full((n, k), 1.0 / k), truth)
        if self.teacher_log.enabled and server.val is not None:
            v = logits.shape[1] - n
            self.teacher_log.record(server_round, ids, logits[:, n:],
                                    torch.full((v, k), 1.0 / k), server.val.y,
                                    source="val", per_class=False)

    def teachers(self, server_round: int, arch: str, fedavg: ArrayRecord,
                 replies: Sequence[Message]) -> TeacherEnsemble:
        """The round's ensemble, in the reference's order: FedAvg, samples, clients.

        Server-made teachers have client id -1.
        """
        server = self._server()
        avg = arrayrecord_to_state_dict(fedavg)
        clients = [arrayrecord_to_state_dict(r.content.array_records["arrays"]) for r in replies]
        samples = gaussian_samples(
            arrayrecord_to_state_dict(self.current[arch]), avg, clients,
            [num_examples(r, self.weighted_by_key) for r in replies], self.num_samples,
            self.var_scale, torch.Generator().manual_seed(seed_for(self.seed, server_round, 202)),
            self.gaussian)
        teachers = [Teacher(-1, arch, s) for s in [avg, *samples]]
        if self.use_clients:
            teachers += [Teacher(self.node(r.metadata.src_node_id).cid, arch, s)
                         for r, s in zip(replies, clients, strict=True)]
        return TeacherEnsemble(server.space, teachers, actors=server.teacher_actors,
                               batch_size=server.eval_batch_size)

    def _val_acc(self, model: nn.Module) -> float:
        val = self._server().val
        return float("nan") if val is None else evaluate(model, val.x, val.y)[1]

    def _server(self) -> ServerData:
        if self.server is None:
            raise RuntimeError("FedBE needs proxy data: call bind(world)")
        return self.server


def _check_params(**p: Any) -> None:
    """Reject out-of-range constructor values with the YAML key path."""
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "num_samples": (lambda v: v >= 0, "an integer >= 0 (reference: 10)"),
        "gaussian": (lambda v: v in GAUSSIANS, " | ".join(GAUSSIANS)),
        "var_scale": (lambda v: v >= 0, "a number >= 0 (reference: 0.1)"),
        "sharpen": (lambda v: v > 0, "a number > 0 (reference: 0.5; 1 disables)"),
        "distill_steps": (lambda v: v >= 0, "an integer >= 0"),
        "distill_batch_size": (lambda v: v > 0, "an integer > 0"),
        "distill_lr": (lambda v: v > 0, "a number > 0"),
        "swa_start": (lambda v: v >= 0, "an integer >= 0"),
        "swa_freq": (lambda v: v > 0, "an integer > 0"),
    }
    for name, (ok, allowed) in rules.items():
        if not ok(p[name]):
            raise ScenarioError(f"strategy.params.{name}", p[name], allowed)
