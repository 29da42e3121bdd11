"""FedFTG / DENSE: data-free fine-tuning of the global model on the server.

Zhang, Shen, Ding, Tao, Duan, "Fine-tuning Global Model via Data-Free Knowledge Distillation
for Non-IID Federated Learning", CVPR 2022 (FedFTG); and Zhang, Chen, Li, Lyu, Wu, Ding, Shen,
Wu, "DENSE: Data-Free One-Shot Federated Learning", NeurIPS 2022 (reference code
zj-jayzhang/DENSE: ``loop_df_fl.py``, ``helpers/synthesizers.py``).

Clients train and upload weights exactly as in FedAvg (the base ``"train"`` handler). After
FedAvg per architecture group (the :meth:`fuse` hook) the server synthesises inputs from the
ensemble of the received client models and distils that ensemble into every group's
averaged model, ``rounds_inner`` times per round. Two synthesis loops (``mode``):

``dense`` (default): DENSE's ``AdvSynthesizer``. Each inner iteration re-initialises an
    unconditional generator ``G(z)`` (:func:`fedkd.synthesis.reset_generator`), optimises it
    *and* the latent ``z`` with Adam for ``gen_steps`` steps towards labels drawn uniformly
    (sorted, as the reference), keeps the lowest-loss batch in an image pool (at most
    ``pool_size`` batches, oldest dropped; the reference keeps all) and distils the students
    for one pass over the shuffled pool (``batch_size`` per step). The default because it
    kept up with FedAvg on non-IID Fashion-MNIST with a BatchNorm model where ``fedftg`` fell
    behind (README "Results");
``fedftg``: FedFTG's persistent conditional generator ``G(z, y)`` (kept with its
    Adam state across rounds). Each inner iteration trains ``G`` for ``gen_steps`` steps on
    fresh ``(z, y)``, ``y`` drawn from the union of the round's clients' label distribution
    ``p(y) ∝ Σ_k n_k(y)``, then fine-tunes each student for ``ft_steps`` steps on fresh
    generated batches.

The generator objective of both (:func:`fedkd.synthesis.synthesis_loss`)::

    loss_G = λ_ce · CE(ens(x), y) + λ_bn · L_bn(x) + λ_adv · L_adv(student(x), ens(x))
             + λ_div · L_div(z, x)

with ``L_bn`` DeepInversion's BatchNorm-statistics loss summed over every BatchNorm layer of
every teacher (0 for teachers without BatchNorm: the prior needs BN models such as
``cnn_medium`` or ``resnet8``), ``L_adv`` DENSE's masked adversarial term (``adv_mask``:
``disagree`` keeps samples where student and ensemble disagree, DENSE's code; ``agree``
keeps those where they agree, which bounds the term as a sample stops being pushed once it
became hard; ``adv_clip`` caps each sample's KL) and ``L_div`` FedGen/FedFTG's diversity
loss. The generator ends in a sigmoid mapped onto the data's per-channel value range, so its
images are bounded like real ones.

Conventions:

- ``ens(x) = Σ_k w[n, k] · logits_k(x)`` (weighted logits), with FedFTG's class-count weights
  ``w[y, k] = n_k(y) / n(y)`` looked up by the label ``x`` was generated for
  (``label_weighting``, fedftg's default) or any registered weighting (dense's default:
  ``uniform``, DENSE's ``Ensemble_A``). Weights are computed on detached logits.
- Teachers are the received client models in eval mode (BatchNorm running statistics fixed,
  parameters frozen; gradients flow through them into ``x``, ``z`` and ``G``).
- Distillation: :func:`fedkd.distill.kd_kl`, ``KL(ens ‖ student)``, ``batchmean``, times
  ``T²`` (DENSE's ``KLDiv``), students in train mode as DENSE's ``kd_train``
  (``freeze_bn=True`` keeps the students' BatchNorm statistics instead).
- Defaults per mode. ``fedftg``: Adam ``ft_lr = 1e-3`` (better on quickstart than SGD),
  ``T = 1``, ``adv_mask = agree``, ``λ_div = 1``, labels from ``p(y)``. ``dense``: DENSE's
  README setting — students SGD ``lr 0.01`` momentum 0.9 (``loop_df_fl.py``), ``T = 20``,
  ``λ_ce = λ_bn = λ_adv = 1``, ``adv_mask = disagree``, ``λ_div = 0``, ``gen_steps = 30``.
  Generator Adam ``gen_lr = 1e-3``, betas ``(0.5, 0.999)`` in both.

Where fedkd differs from the references, and why:

- no data augmentation of generated images (DENSE crops and flips them with kornia);
- DENSE is one-shot (one round, a fresh student); in a multi-round federation the student is
  the round's FedAvg model and the pool persists across rounds, bounded by ``pool_size``;
- ``rollback=True`` (off by default, as in both papers) keeps FedAvg's model of a group when
  fine-tuning lowers its accuracy on the server validation split, like FedDF's safeguard;
- the generator's value range is the data's normalised ``[0, 1]`` pixel range.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from fedkd.client import seed_for
from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.diagnostics import Batches
from fedkd.distill import kd_kl, weighted_logits
from fedkd.ensemble import Teacher, TeacherEnsemble
from fedkd.errors import ScenarioError
from fedkd.synthesis import (
    BatchNormPrior,
    Generator,
    SynthesisWeights,
    reset_generator,
    synthesis_loss,
    value_range,
)
from fedkd.train import evaluate, fit, predict
from strategies import STRATEGIES
from strategies.fedavg import FedAvg
from strategies.weighting import (
    TeacherContext,
    Weighting,
    check_supported,
    check_weighting_split,
    class_weights,
    make_weighting,
    uses_labels,
    weighting_split,
)

MODES = ("fedftg", "dense")

#: Defaults that depend on ``mode`` (a parameter left at None takes its mode's value).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedftg": {"gen_steps": 5, "ft_lr": 1e-3, "ft_optimizer": "adam", "temperature": 1.0,
               "lambda_div": 1.0, "adv_mask": "agree", "label_weighting": True},
    "dense": {"gen_steps": 30, "ft_lr": 0.01, "ft_optimizer": "sgd", "temperature": 20.0,
              "lambda_div": 0.0, "adv_mask": "disagree", "label_weighting": False},
}


def label_distribution(label_counts: torch.Tensor) -> torch.Tensor:
    """``p(y) ∝ Σ_k n_k(y)``: the union of the teachers' label distributions, ``(C,)``."""
    total = label_counts.to(torch.float64).sum(dim=0)
    return total / total.sum()


@contextmanager
def frozen(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Temporarily stop parameter gradients of ``modules`` (inputs still get gradients)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Round:
    """One round's server-side state: teachers, students, label sampler, weight tally."""

    def __init__(self, strategy: FedFTG, teachers: list[nn.Module], ctx: TeacherContext,
                 students: dict[str, nn.Module], seed: int) -> None:
        self.s = strategy
        self.teachers = teachers
        self.ctx = ctx
        self.students = students
        self.prior = BatchNormPrior(teachers)
        self.p_y = label_distribution(ctx.label_counts)
        self.class_w = class_weights(ctx.label_counts)
        self.rng = torch.Generator().manual_seed(seed)
        self.weight_sum = torch.zeros(len(teachers), dtype=torch.float64)
        self.weight_n = 0
        self.batches = Batches() if strategy.teacher_log.enabled else None
        self.terms = {"gen-ce": 0.0, "gen-bn": 0.0, "gen-adv": 0.0}
        self.term_n = 0

    @property
    def device(self) -> torch.device:
        return self.s.device

    def noise(self, n: int) -> torch.Tensor:
        """``(n, noise_dim)`` standard normal noise from the round's generator."""
        return torch.randn(n, self.s.noise_dim, generator=self.rng).to(self.device)

    def labels(self, n: int) -> torch.Tensor:
        """Labels from ``p(y)`` (fedftg) or uniform and sorted (dense, as the reference)."""
        if self.s.mode == "dense":
            y = torch.randint(len(self.p_y), (n,), generator=self.rng).sort().values
        else:
            y = torch.multinomial(self.p_y, n, replacement=True, generator=self.rng)
        return y.to(self.device)

    def ensemble(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weighted ensemble logits of the teachers on ``x`` generated for labels ``y``.

        Differentiable in ``x``; class-count weights are looked up by the generated label.
        """
        logits = torch.stack([t(x) for t in self.teachers])
        if self.s.label_weighting:
            w = self.class_w.to(self.device)[y]
        else:
            w = self.s.weigh(logits.detach().cpu(), self.ctx, y.cpu()).to(self.device)
        w = w.to(logits.dtype)
        self.weight_sum += w.detach().to(torch.float64).sum(dim=0).cpu()
        self.weight_n += len(x)
        if self.batches is not None:
            self.batches.add(logits, w, y)
        return weighted_logits(logits, w)

    def generator_loss(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The synthesis objective on generated ``x`` (teachers hooked for the BN prior)."""
        with self.prior:
            ens = self.ensemble(x, y)
        out = synthesis_loss(ens, y, [m(x) for m in self.students.values()],
                             self.prior.loss.to(self.device), z, x, self.s.synthesis)
        for key, value in (("gen-ce", out.ce), ("gen-bn", out.bn), ("gen-adv", out.adv)):
            self.terms[key] += value
        self.term_n += 1
        return out.total

    def distill(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over groups of ``kd_kl(student(x), ens(x), T)``."""
        with torch.no_grad():
            ens = self.ensemble(x, y)
        return torch.stack([kd_kl(m(x), ens, self.s.temperature)
                            for m in self.students.values()]).sum()


@STRATEGIES.register("fedftg")
class FedFTG(FedAvg):
    """FedAvg followed by data-free server fine-tuning on synthesised hard samples.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    mode : str
        ``"dense"`` (DENSE's synthesizer, default) or ``"fedftg"`` (persistent conditional
        generator).
    noise_dim : int
        Width of the generator noise (and label embedding).
    gen_width : int
        Base channel count of the generator (DENSE uses 64 on 32x32; 32 keeps the server
        step cheap on CPU).
    rounds_inner : int
        Iterations of (synthesis, distillation) per round.
    gen_steps : int, optional
        Generator steps per inner iteration (fedftg 5, dense 30).
    ft_steps : int
        Fine-tuning steps of every student per inner iteration (fedftg; dense distils one
        pass over its pool).
    batch_size : int
        Generated samples per step (the synthesis batch; dense's distillation batch too).
    gen_lr : float
        Generator Adam learning rate.
    ft_lr : float, optional
        Student learning rate (fedftg 1e-3 with Adam, dense 0.01 with SGD).
    ft_optimizer : str, optional
        ``"adam"`` or ``"sgd"`` (momentum 0.9).
    lambda_ce, lambda_bn, lambda_adv, lambda_div : float
        Weights of the generator's CE, BatchNorm-statistics, adversarial and diversity terms
        (``lambda_div`` fedftg 1, dense 0).
    adv_mask : str, optional
        ``"disagree"`` (dense), ``"agree"`` (fedftg) or ``"none"``.
    adv_clip : float, optional
        Cap of each sample's adversarial KL (off by default).
    temperature : float, optional
        Distillation temperature (fedftg 1, dense 20 as DENSE's README).
    pool_size : int
        Dense: batches kept in the image pool.
    freeze_bn : bool
        Keep the students' BatchNorm running statistics while they are distilled.
    rollback : bool
        Keep FedAvg's model of a group when fine-tuning lowers its validation accuracy
        (needs ``data.val_fraction > 0``).
    label_weighting : bool, optional
        Class-count teacher weights ``n_k(y)/n(y)`` (fedftg's default); else ``weighting``
        (dense's default: uniform, DENSE's ``Ensemble_A``).
    weighting : str
        Registered weighting used when ``label_weighting`` is false; ``validation`` and
        ``learned`` fit on the weighting split (:func:`strategies.weighting.weighting_split`).
    weighting_params : dict, optional
        Its parameters.
    device : str, optional
        Where the server synthesises and distils: ``"cpu"`` or ``"cuda"``; by default the
        scenario's ``server.device``.
    """

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 mode: str = "dense", noise_dim: int = 64, gen_width: int = 32,
                 rounds_inner: int = 5, gen_steps: int | None = None, ft_steps: int = 10,
                 batch_size: int = 64, gen_lr: float = 1e-3, ft_lr: float | None = None,
                 ft_optimizer: str | None = None, lambda_ce: float = 1.0,
                 lambda_bn: float = 1.0, lambda_adv: float = 1.0,
                 lambda_div: float | None = None, adv_mask: str | None = None,
                 adv_clip: float | None = None, temperature: float | None = None,
                 pool_size: int = 20, freeze_bn: bool = False, rollback: bool = False,
                 label_weighting: bool | None = None, weighting: str = "uniform",
                 weighting_params: dict | None = None, device: str | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        if mode not in MODES:
            raise ScenarioError("strategy.params.mode", mode, f"one of {list(MODES)}")
        d = MODE_DEFAULTS[mode]
        pick = lambda name, value: d[name] if value is None else value  # noqa: E731
        self.mode = mode
        self.gen_steps, self.ft_lr = pick("gen_steps", gen_steps), pick("ft_lr", ft_lr)
        self.ft_optimizer = pick("ft_optimizer", ft_optimizer)
        self.temperature = pick("temperature", temperature)
        if self.ft_optimizer not in ("sgd", "adam"):
            raise ScenarioError("strategy.params.ft_optimizer", self.ft_optimizer,
                                "sgd or adam")
        for name, value in (("noise_dim", noise_dim), ("gen_width", gen_width),
                            ("batch_size", batch_size), ("pool_size", pool_size),
                            ("gen_lr", gen_lr), ("ft_lr", self.ft_lr),
                            ("temperature", self.temperature)):
            if value <= 0:
                raise ScenarioError(f"strategy.params.{name}", value, "a number > 0")
        for name, value in (("rounds_inner", rounds_inner), ("gen_steps", self.gen_steps),
                            ("ft_steps", ft_steps)):
            if value < 0:
                raise ScenarioError(f"strategy.params.{name}", value, "an integer >= 0")
        if device is not None and device not in ("cpu", "cuda"):
            raise ScenarioError("strategy.params.device", device, "cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise ScenarioError("strategy.params.device", device,
                                "cpu on a machine without CUDA")
        self.synthesis = SynthesisWeights(
            ce=lambda_ce, bn=lambda_bn, adv=lambda_adv, div=pick("lambda_div", lambda_div),
            adv_mask=pick("adv_mask", adv_mask), adv_clip=adv_clip)
        self.noise_dim, self.gen_width = noise_dim, gen_width
        self.rounds_inner, self.ft_steps = rounds_inner, ft_steps
        self.batch_size, self.gen_lr, self.pool_size = batch_size, gen_lr, pool_size
        self.freeze_bn, self.rollback = freeze_bn, rollback
        self.label_weighting = pick("label_weighting", label_weighting)
        self.weighting, self.weighting_params = weighting, weighting_params
        self.weigh: Weighting = make_weighting(weighting, weighting_params)
        self.device = torch.device(device or "cpu")
        self.device_asked = device
        self.pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._generator: Generator | None = None
        self._gen_opt: torch.optim.Optimizer | None = None

    def bind(self, world: Any) -> None:
        """Check what the mode needs of the world, then bind it."""
        check_supported(self.weigh, self.weighting, "fedftg")
        if not self.label_weighting:
            check_weighting_split(self.weigh, self.weighting, weighting_split(world.data)[0],
                                  world.scenario.data.weight_fraction)
        if self.rollback and (world.data.val is None or len(world.data.val) == 0):
            raise ScenarioError("data.val_fraction", world.scenario.data.val_fraction,
                                "a fraction > 0: rollback compares on the server validation "
                                "split (or set strategy.params.rollback: false)")
        if self.device_asked is None:
            self.device = world.server_device
        super().bind(world)

    # ------------------------------------------------------------------ generator
    def new_generator(self, conditional: bool) -> Generator:
        """A generator for the world's images, seeded from ``seed``, on the server device."""
        if self.world is None:
            raise RuntimeError("FedFTG needs bind(world) before training")
        data = self.world.data
        low, high = value_range(data.test.x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(self.seed, 0, 0, 11))
            gen = Generator(self.noise_dim, data.input_shape, low, high,
                            num_classes=data.num_classes if conditional else 0,
                            width=self.gen_width)
        return gen.to(self.device)

    @property
    def generator(self) -> Generator:
        """The generator (built on first use): persistent in fedftg, re-initialised in dense."""
        if self._generator is None:
            self._generator = self.new_generator(conditional=self.mode == "fedftg")
            if self.mode == "fedftg":  # dense optimises a fresh Adam per synthesis
                self._gen_opt = torch.optim.Adam(self._generator.parameters(),
                                                 lr=self.gen_lr, betas=(0.5, 0.999))
        return self._generator

    def student_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The students' fine-tuning optimizer (one over all groups; losses are separable)."""
        if self.ft_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.ft_lr)
        return torch.optim.SGD(params, lr=self.ft_lr, momentum=0.9)

    # ------------------------------------------------------------------ aggregation
    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """Data-free fine-tuning of the averaged groups; adds the round's losses to metrics."""
        groups, extra = self.finetune(server_round, replies, groups)
        for key, value in extra.items():
            metrics[key] = value
        return groups

    def finetune(self, server_round: int, replies: Sequence[Message],
                 groups: dict[str, ArrayRecord]) -> tuple[dict[str, ArrayRecord], dict]:
        """Synthesise and fine-tune every replying group's student (rolled back if asked)."""
        rnd = self._setup_round(server_round, replies, groups)
        students = nn.ModuleDict(rnd.students)
        ft_opt = self.student_optimizer(students.parameters())
        gen_loss = ft_loss = 0.0
        for it in range(self.rounds_inner):
            if self.mode == "dense":
                g, f = self._dense_iteration(rnd, students, ft_opt, server_round, it)
            else:
                g, f = self._fedftg_iteration(rnd, students, ft_opt)
            gen_loss, ft_loss = gen_loss + g, ft_loss + f
        cids = [self.node(r.metadata.src_node_id).cid for r in replies]
        kept = rnd.batches.tensors() if rnd.batches is not None else None
        if kept is not None:
            self.teacher_log.record(server_round, cids, *kept, ensemble="logits",
                                    source="generated")
        else:
            self.teacher_log.weights(server_round, cids,
                                     rnd.weight_sum / max(rnd.weight_n, 1), "generated")
        out, kept = dict(groups), 0
        for arch, model in rnd.students.items():
            if self.rollback and not self._improves(model, groups[arch], arch):
                kept += 1
                continue
            out[arch] = state_dict_to_arrayrecord(
                {k: v.cpu() for k, v in model.state_dict().items()})
        n = max(self.rounds_inner, 1)
        stats = {"gen-loss": gen_loss / n, "ft-loss": ft_loss / n,
                 **{k: v / max(rnd.term_n, 1) for k, v in rnd.terms.items()}}
        if self.rollback:
            stats["rolled-back"] = float(kept)
        return out, stats

    def _train_students(self, students: nn.ModuleDict, opt: torch.optim.Optimizer,
                        batches: Iterator[torch.Tensor], step: Any) -> float:
        """Fit the students; with ``freeze_bn`` their BatchNorm layers stay in eval mode."""
        if not self.freeze_bn:
            return fit(students, opt, batches, step).loss

        def frozen_step(idx: torch.Tensor) -> torch.Tensor:
            for m in students.modules():
                if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                    m.eval()
            return step(idx)

        return fit(students, opt, batches, frozen_step).loss

    def _fedftg_iteration(self, rnd: _Round, students: nn.ModuleDict,
                          ft_opt: torch.optim.Optimizer) -> tuple[float, float]:
        """Train the persistent generator, then fine-tune on fresh generated batches."""
        generator, gen_opt = self.generator, self._gen_opt
        steps = torch.arange(self.batch_size)

        def generator_step(_idx: torch.Tensor) -> torch.Tensor:
            z, y = rnd.noise(self.batch_size), rnd.labels(self.batch_size)
            return rnd.generator_loss(z, y, generator(z, y))

        def finetune_step(_idx: torch.Tensor) -> torch.Tensor:
            z, y = rnd.noise(self.batch_size), rnd.labels(self.batch_size)
            with torch.no_grad():
                x = generator(z, y)
            return rnd.distill(x, y)

        students.eval()
        with frozen(students.values()):
            gen = fit(generator, gen_opt, iter([steps] * self.gen_steps), generator_step).loss
        ft = self._train_students(students, ft_opt, iter([steps] * self.ft_steps),
                                  finetune_step)
        return gen, ft / len(students)

    def _dense_iteration(self, rnd: _Round, students: nn.ModuleDict,
                         ft_opt: torch.optim.Optimizer, server_round: int,
                         it: int) -> tuple[float, float]:
        """DENSE: synthesise one batch with a fresh generator and latent, pool it, distil."""
        generator = self.generator
        reset_generator(generator, seed_for(self.seed, server_round, it, 14))
        z = rnd.noise(self.batch_size).requires_grad_(True)
        y = rnd.labels(self.batch_size)
        opt = torch.optim.Adam([*generator.parameters(), z], lr=self.gen_lr, betas=(0.5, 0.999))
        best: tuple[float, torch.Tensor | None] = (float("inf"), None)
        gen_loss = 0.0
        students.eval()
        generator.train()
        with frozen(students.values()):
            for _ in range(self.gen_steps):
                opt.zero_grad(set_to_none=True)
                x = generator(z)
                loss = rnd.generator_loss(z, y, x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"synthesis diverged: loss {float(loss)}")
                if best[1] is None or float(loss.detach()) < best[0]:
                    best = (float(loss.detach()), x.detach())
                loss.backward()
                opt.step()
                gen_loss += float(loss.detach())
        if best[1] is not None:
            self.pool = [*self.pool, (best[1].cpu(), y.cpu())][-self.pool_size:]
        if not self.pool:
            return 0.0, 0.0
        images = torch.cat([x for x, _ in self.pool]).to(self.device)
        labels = torch.cat([t for _, t in self.pool]).to(self.device)
        order = torch.randperm(len(images), generator=rnd.rng).to(self.device)
        ft = self._train_students(students, ft_opt, iter(order.split(self.batch_size)),
                                  lambda idx: rnd.distill(images[idx], labels[idx]))
        return gen_loss / max(self.gen_steps, 1), ft / len(students)

    def _improves(self, model: nn.Module, averaged: ArrayRecord, arch: str) -> bool:
        """Whether ``model`` is at least as accurate as FedAvg's on the validation split."""
        assert self.world is not None
        val = self.world.data.val
        base = self.world.model_space().build(arch, arrayrecord_to_state_dict(averaged))
        return evaluate(model, val.x, val.y)[1] >= evaluate(base, val.x, val.y)[1]

    def _setup_round(self, server_round: int, replies: Sequence[Message],
                     groups: dict[str, ArrayRecord]) -> _Round:
        """Teachers (frozen, eval mode), their context and the students of the round."""
        if self.world is None:
            raise RuntimeError("FedFTG needs bind(world) before training")
        space = self.world.model_space()
        infos = [self.node(r.metadata.src_node_id) for r in replies]
        teachers = TeacherEnsemble(space, [
            Teacher(i.cid, i.arch, arrayrecord_to_state_dict(r.content.array_records["arrays"]))
            for i, r in zip(infos, replies, strict=True)]).modules()
        for t in teachers:
            t.eval().requires_grad_(False).to(self.device)
        ctx = TeacherContext(
            num_examples=torch.tensor([float(i.num_examples) for i in infos]),
            label_counts=torch.tensor([list(i.label_counts) for i in infos], dtype=torch.float64))
        if uses_labels(self.weigh) and not self.label_weighting:
            split, _ = weighting_split(self.world.data)
            assert split is not None  # checked in bind
            ctx = TeacherContext(ctx.num_examples, ctx.label_counts,
                                 val_logits=torch.stack([predict(t, split.x) for t in teachers]),
                                 val_labels=split.y)
        archs = dict.fromkeys(i.arch for i in infos)
        students = {a: space.build(a, arrayrecord_to_state_dict(groups[a])).to(self.device)
                    for a in archs}
        return _Round(self, teachers, ctx, students, seed_for(self.seed, server_round, 0, 13))
