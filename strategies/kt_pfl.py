"""KT-pFL: a learned knowledge-coefficient matrix that mixes the peers into per-client targets.

Zhang, Guo, Ma, Wang, Xu & Wu, "Parameterized Knowledge Transfer for Personalized Federated
Learning", NeurIPS 2021 (arXiv:2111.02862); reference code ``cugzj/KT-pFL``
(``src/engine_kt_pfl.py``: ``get_models_logits``, ``KT_pFL.collaborative_training``;
``conf/EMNIST_imbalance_10models_T10_*.json``).

The paper
---------
Client ``n`` distils from a *personalised* soft prediction on the public inputs ``x``,
``s̃_n = sum_m c_mn s_m`` with ``s_m = softmax(f_m(x) / T)``, where the knowledge-coefficient
matrix ``c`` is learned together with the models::

    min_{w, c}  sum_n L_n(w_n) + λ sum_n KL(sum_m c_mn s_m ‖ s_n) + ρ ‖c - 1/N‖²

alternately: the clients take the targets ``s̃_n`` as constants and distil (``KL(s̃_n ‖ s_n)``),
the server takes the models as fixed and moves ``c`` by gradient descent on the two terms that
depend on it. The regulariser keeps ``c`` near the uniform ``1/N``.

The reference code (what fedkd reads its defaults from)
-------------------------------------------------------
- ``c`` is an ``N x N`` matrix initialised to ``1/N`` everywhere, the diagonal (a client's
  own prediction) included; each round every row takes **one** gradient step before the
  targets are built from it (update first, then mix).
- The distillation term in the code is **not** the paper's KL but the mean squared error
  ``mean_{n,k} (s_i - sum_j c_ij s_j)²`` (``nn.MSELoss``, mean over samples and classes), and
  the regulariser is ``ρ · mean_j (c_ij - 1/N)²`` (mean over the row), ``ρ = penalty_ratio =
  0.7``; ``s`` are the clients' probabilities at ``Temp = 10``.
- There is no fixed learning rate: the step is ``5^k`` with the integer ``k`` (``|k| <= 5``)
  that brings ``5^k · mean_j |∂/∂c_ij|`` into ``[0.01, 0.05)``, i.e. every step moves the row by
  a mean of 0.01-0.05 whatever the gradient's scale (:func:`adaptive_step`).
- After the step each row is replaced by ``softmax(5 · c_i)`` (a comment there calls this a
  stop-gap for "normalisation"); the targets use these softmaxed rows.

What fedkd does
---------------
The class :class:`KTpFL` is a weighting plug (``strategy.params.weighting: kt_pfl``) that keeps
``c`` on the server and answers for one student at a time. For student ``i`` and the teachers
``P`` present in the batch (``K = |P|``; their ``(K, N, C)`` logits, the student's own
``(N, C)`` logits ``ctx.student_logits``), with ``s_j = softmax(logits_j / T)``,
``q = softmax(student_logits / T)``, ``p = sum_j c_j s_j`` and ``c`` the student's row over
``P``::

    loss(c) = D(p, q) + ρ · mean_j (c_j - 1/K)²
    D = mean_n KL(p_n ‖ q_n)                      (divergence "kl", the paper's)
      = mean_{n,k} (p_nk - q_nk)²                 (divergence "mse", the reference code's)
    ∂D/∂c_j = mean_n sum_k s_jnk (log p_nk - log q_nk + 1)          ("kl")
            = 2 / (N C) · sum_{n,k} s_jnk (p_nk - q_nk)             ("mse")
    ∂R/∂c_j = 2ρ / K · (c_j - 1/K)
    g = ∇loss - mean(∇loss);   c ← Π_Δ(c - η g)       (``steps`` times)

with ``η = lr``, or :func:`adaptive_step` of ``mean |g|`` when ``lr`` is None (the default,
the reference's rule), and ``Π_Δ`` the Euclidean projection onto the probability simplex
(:func:`simplex_projection`).

Which terms of the paper's gradient are kept: all of those in ``c`` -- the objective is a sum
over rows and row ``i`` involves only the teachers' and student ``i``'s predictions on the
public batch, which the server holds, so each call is an exact block-gradient step on the
paper's objective for that row. As in the paper (and its code), the models are held fixed: the
dependence of the next round's predictions on ``c`` is not differentiated. The paper's ``λ``
only rescales the step and ``ρ``; fedkd folds it into ``lr`` and ``rho`` (``rho`` here is the
paper's ``ρ / λ``). The reductions are the reference code's (``ρ`` multiplies a mean over the
row), so its ``ρ = 0.7`` means what it meant there.

Where fedkd differs from the reference, and why
-----------------------------------------------
- *Simplex.* The step is followed by the Euclidean projection onto the simplex instead of
  ``softmax(5 · c)``. The softmax is not idempotent: even at zero gradient it scales a
  near-uniform row's deviations from ``1/N`` by about ``5/N`` each round, flattening rows when
  ``N > 5`` and sharpening them when ``N < 5`` (``[0.7, 0.3]`` becomes ``[0.88, 0.12]``, then
  ``[0.98, 0.02]``), so the coefficients would drift with the number of clients rather than
  with the objective. The projection leaves a row on the simplex alone when the
  gradient vanishes, keeps coefficients non-negative and lets a useless teacher reach zero.
- *Divergence.* ``divergence: kl`` (default) is the paper's term; ``mse`` is the code's.
- *Centred gradient.* Adding a constant to every coordinate does not change the projected
  step, so the gradient's mean is removed before :func:`adaptive_step` measures it (for the KL
  the common ``+1`` per sample would otherwise dominate the measure and shrink every step);
  the reference measures the raw gradient.
- *Partial participation.* The reference has every client in every round. fedkd stores ``c``
  sparsely as non-negative *masses* ``a[i][j]`` (prior 1, no entry stored until updated): a
  row over the present teachers is ``a[i][P] / sum a[i][P]``, an update redistributes mass
  within ``P`` and keeps ``sum a[i][P]``, so the mean mass over every teacher ever seen stays
  1 and a client first seen later -- as teacher or as student -- joins at the uniform prior,
  exactly as the paper's ``1/N`` initialisation. The regulariser pulls toward ``1/K`` over the
  present teachers (the paper's ``1/N`` when everyone is present).
- *The diagonal.* The paper mixes the student's own prediction in (``c_nn``). The plug mixes
  the teachers it is given: under DML's leave-one-out the student is not among them and its
  row spans the other peers only; a strategy that wants the paper's self term passes the
  student among the teachers (its id in ``ctx.cids``). With the diagonal in, the distillation
  term alone is minimised by putting all weight on oneself; only ``ρ`` resists that (as in the
  paper).
- *One shared target* (FedMD's consensus, ``ctx.student`` None): the weights are the mean of
  the present clients' rows, each restricted to the teachers and renormalised -- the mean of
  the personalised targets, since the mixture is linear in ``c``.
- *Defaults.* ``temperature = 10`` and ``rho = 0.7`` (the reference configs' ``Temp`` and
  ``penalty_ratio``), ``steps = 1``, ``lr = None`` (the adaptive step). ``temperature`` only
  shapes the coefficient update; the strategy's distillation temperature is its own (set both
  equal to match the paper).

How a strategy uses it
----------------------
Once per round and per student, with ``ctx`` carrying ``cids`` (the teachers' client ids),
``student`` and ``student_logits``: first ``weighting.update(logits, ctx)`` (one coefficient
update; returns the new ``(K,)`` row), then ``weighting(logits, ctx)`` for the ``(N, K)``
weights of that student's target -- the reference's order, update then mix. Calling the plug
never changes the state, so it may be called again for diagnostics; ``stateful = True`` marks
it. ``state_dict()`` / ``load_state_dict()`` save and restore ``c`` as three flat tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from strategies.weighting import WEIGHTINGS, TeacherContext

#: Coefficient-update divergences: the paper's KL, the reference code's squared error.
DIVERGENCES = ("kl", "mse")


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` onto the probability simplex.

    Parameters
    ----------
    v : torch.Tensor
        ``(K,)`` vector, ``K >= 1``.

    Returns
    -------
    torch.Tensor
        ``argmin_x ‖x - v‖`` over ``x >= 0, sum(x) = 1``: ``max(v - θ, 0)`` with the threshold
        ``θ`` that makes the result sum to 1 (sort-based, Held, Wolfe & Crowder 1974).
    """
    u = torch.sort(v, descending=True).values
    excess = torch.cumsum(u, dim=0) - 1.0
    ranks = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    support = int((u - excess / ranks > 0).nonzero().max())
    theta = excess[support] / (support + 1)
    return (v - theta).clamp_min(0.0)


def adaptive_step(mean_abs_grad: float) -> float:
    """The reference code's step size: ``5**k`` with the integer ``k`` in ``[-5, 5]`` that
    brings ``5**k * mean_abs_grad`` into ``[0.01, 0.05)`` (the nearest end of the range when
    no ``|k| <= 5`` does); 1 for a zero gradient.

    Parameters
    ----------
    mean_abs_grad : float
        Mean absolute gradient over the row.
    """
    if mean_abs_grad <= 0:
        return 1.0
    k = 0
    while k > -5 and mean_abs_grad * 5.0**k >= 0.05:
        k -= 1
    while k < 5 and mean_abs_grad * 5.0**k < 0.01:
        k += 1
    return 5.0**k


def coefficient_gradient(coef: torch.Tensor, teacher_probs: torch.Tensor,
                         student_probs: torch.Tensor, rho: float,
                         divergence: str = "kl") -> torch.Tensor:
    """Gradient in ``c`` of ``D(sum_j c_j s_j, q) + ρ · mean_j (c_j - 1/K)²`` (module docstring).

    Parameters
    ----------
    coef : torch.Tensor
        ``(K,)`` coefficients ``c`` of the student's row over the K teachers.
    teacher_probs : torch.Tensor
        ``(K, N, C)`` teachers' soft predictions ``s``.
    student_probs : torch.Tensor
        ``(N, C)`` the student's own soft predictions ``q``.
    rho : float
        Weight of the pull toward uniform.
    divergence : str
        ``"kl"``: ``D = mean_n KL(p_n ‖ q_n)``; ``"mse"``: ``D = mean_{n,k} (p_nk - q_nk)²``.

    Returns
    -------
    torch.Tensor
        ``(K,)`` gradient (not centred).
    """
    k, n, c = teacher_probs.shape
    mix = torch.einsum("k,knc->nc", coef, teacher_probs)
    if divergence == "kl":
        tiny = torch.finfo(mix.dtype).tiny
        score = mix.clamp_min(tiny).log() - student_probs.clamp_min(tiny).log() + 1.0
        grad = torch.einsum("knc,nc->k", teacher_probs, score) / n
    else:
        grad = 2.0 * torch.einsum("knc,nc->k", teacher_probs, mix - student_probs) / (n * c)
    return grad + 2.0 * rho / k * (coef - 1.0 / k)


@WEIGHTINGS.register("kt_pfl")
class KTpFL:
    """KT-pFL's learned knowledge coefficients: student ``i``'s target weighs teacher ``j`` by
    ``c_ij``, one row per student on the simplex, uniform at first, moved by :meth:`update`
    (see the module docstring for the rule and where it departs from the paper).

    Parameters
    ----------
    lr : float, optional
        Step size on ``c`` (default: None, the reference's :func:`adaptive_step`).
    rho : float
        ``ρ``, the pull of each row toward uniform (default: 0.7, ``penalty_ratio``).
    temperature : float
        ``T`` of the soft predictions in the update (default: 10.0, the configs' ``Temp``).
    steps : int
        Gradient steps per :meth:`update` (default: 1, the reference's one per round).
    divergence : str
        ``"kl"`` (default, the paper's) or ``"mse"`` (the reference code's).
    """

    stateful = True

    def __init__(self, lr: float | None = None, rho: float = 0.7, temperature: float = 10.0,
                 steps: int = 1, divergence: str = "kl") -> None:
        if lr is not None and not lr > 0:
            raise ValueError("lr must be > 0 (or null for the adaptive step)")
        if not rho >= 0:
            raise ValueError("rho must be >= 0")
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError("steps must be an integer >= 0")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(DIVERGENCES)}")
        self.lr = lr
        self.rho = rho
        self.temperature = temperature
        self.steps = steps
        self.divergence = divergence
        #: mass[student][teacher]; an absent entry has the prior mass 1.
        self.mass: dict[int, dict[int, float]] = {}

    def row(self, student: int, teachers: Sequence[int]) -> torch.Tensor:
        """``(K,)`` float64 coefficients of ``student``'s row over ``teachers`` (sums to 1)."""
        stored = self.mass.get(int(student), {})
        a = torch.tensor([stored.get(int(t), 1.0) for t in teachers], dtype=torch.float64)
        total = a.sum()
        if len(a) and total > 0:
            return a / total
        return torch.full((len(a),), 1.0 / max(len(a), 1), dtype=torch.float64)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, K)`` weights: ``ctx.student``'s row over the teachers ``ctx.cids``, or, when
        ``ctx.student`` is None, the mean of the rows of the present clients ``ctx.cids``.
        Leaves the coefficients unchanged."""
        teachers = _teacher_ids(ctx)
        if ctx.student is not None:
            w = self.row(ctx.student, teachers)
        elif teachers:
            w = torch.stack([self.row(i, teachers) for i in teachers]).mean(dim=0)
        else:
            w = torch.zeros(0, dtype=torch.float64)
        n = logits.shape[1]
        return w.unsqueeze(0).expand(n, -1).clone().to(device=logits.device, dtype=logits.dtype)

    def update(self, logits: torch.Tensor, ctx: TeacherContext) -> torch.Tensor:
        """One coefficient update of ``ctx.student``'s row over the teachers ``ctx.cids``.

        Parameters
        ----------
        logits : torch.Tensor
            ``(K, N, C)`` the teachers' logits on the public batch.
        ctx : TeacherContext
            With ``cids`` (the teachers' client ids), ``student`` (the student's client id)
            and ``student_logits`` (its ``(N, C)`` logits on the same batch).

        Returns
        -------
        torch.Tensor
            ``(K,)`` float64: the student's new row over the teachers.
        """
        teachers = _teacher_ids(ctx)
        if ctx.student is None or ctx.student_logits is None:
            raise ValueError("the kt_pfl update needs the student's client id and logits "
                             "(TeacherContext.student and .student_logits)")
        if logits.shape[0] != len(teachers):
            raise ValueError(f"{logits.shape[0]} teachers' logits for {len(teachers)} ids")
        coef = self.row(ctx.student, teachers)
        if len(teachers) < 2 or self.steps == 0:
            return coef
        t = self.temperature
        probs = torch.softmax(logits.detach().to("cpu", torch.float64) / t, dim=2)
        own = torch.softmax(ctx.student_logits.detach().to("cpu", torch.float64) / t, dim=1)
        for _ in range(self.steps):
            grad = coefficient_gradient(coef, probs, own, self.rho, self.divergence)
            grad = grad - grad.mean()
            step = self.lr if self.lr is not None else adaptive_step(float(grad.abs().mean()))
            coef = simplex_projection(coef - step * grad)
        stored = self.mass.setdefault(int(ctx.student), {})
        total = sum(stored.get(j, 1.0) for j in teachers)
        for j, cj in zip(teachers, coef.tolist(), strict=True):
            stored[j] = total * cj
        return coef

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored coefficients as flat tensors ``student``, ``teacher`` (int64) and
        ``mass`` (float64), sorted by (student, teacher)."""
        entries = sorted((i, j, a) for i, row in self.mass.items() for j, a in row.items())
        return {"student": torch.tensor([e[0] for e in entries], dtype=torch.int64),
                "teacher": torch.tensor([e[1] for e in entries], dtype=torch.int64),
                "mass": torch.tensor([e[2] for e in entries], dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors or lists)."""
        student, teacher = (torch.as_tensor(state[k], dtype=torch.int64).tolist()
                            for k in ("student", "teacher"))
        mass = torch.as_tensor(state["mass"], dtype=torch.float64).tolist()
        if not len(student) == len(teacher) == len(mass):
            raise ValueError("student, teacher and mass must have the same length")
        self.mass = {}
        for i, j, a in zip(student, teacher, mass, strict=True):
            self.mass.setdefault(int(i), {})[int(j)] = float(a)


def _teacher_ids(ctx: TeacherContext) -> list[int]:
    """The teachers' client ids, checked to be given and distinct."""
    if ctx.cids is None:
        raise ValueError("the kt_pfl weighting needs the teachers' client ids "
                         "(TeacherContext.cids)")
    ids = [int(c) for c in ctx.cids.tolist()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"teacher client ids must be distinct, got {ids}")
    return ids
