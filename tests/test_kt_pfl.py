"""KT-pFL's knowledge-coefficient weighting pinned on toy logits with exact numbers."""

from __future__ import annotations

import io

import pytest
import torch

from fedkd.errors import ScenarioError
from strategies.kt_pfl import (
    KTpFL,
    adaptive_step,
    coefficient_gradient,
    simplex_projection,
)
from strategies.weighting import WEIGHTINGS, TeacherContext, make_weighting, uses_labels

F64 = torch.float64
# 3 teachers (client ids 3, 5, 7), 2 public samples, 3 classes; the student is client 9
LOGITS = torch.tensor([
    [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]],   # client 3: predicts what the student predicts
    [[0.0, 2.0, 0.0], [2.0, 0.0, 0.0]],   # client 5: the other way round
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],   # client 7: flat
], dtype=F64)
STUDENT = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=F64)
CIDS = [3, 5, 7]


def context(cids: list[int] = CIDS, student: int | None = 9,
            student_logits: torch.Tensor | None = STUDENT) -> TeacherContext:
    k = len(cids)
    return TeacherContext(num_examples=torch.ones(k), label_counts=torch.ones(k, 3),
                          cids=torch.tensor(cids), student=student,
                          student_logits=student_logits)


def written_out_loss(c: torch.Tensor, divergence: str, rho: float = 0.7,
                     temperature: float = 1.0) -> torch.Tensor:
    """The coefficient objective of the module docstring, written out independently."""
    s = torch.softmax(LOGITS / temperature, dim=2)
    q = torch.softmax(STUDENT / temperature, dim=1)
    p = (c[:, None, None] * s).sum(dim=0)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()
    d = kl if divergence == "kl" else ((p - q) ** 2).mean()
    return d + rho * ((c - 1 / len(c)) ** 2).mean()


def autograd_step(divergence: str, lr: float) -> torch.Tensor:
    """One step from uniform with the centred autograd gradient of :func:`written_out_loss`."""
    c = torch.full((3,), 1 / 3, dtype=F64, requires_grad=True)
    written_out_loss(c, divergence).backward()
    g = c.grad - c.grad.mean()
    return c.detach() - lr * g


def rows_sum_to_one(w: torch.Tensor) -> None:
    assert torch.allclose(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


def test_fresh_matrix_gives_uniform_weights() -> None:
    kt = make_weighting("kt_pfl")
    for ctx in (context(), context(student=None)):
        w = kt(LOGITS, ctx)
        assert w.shape == (2, 3) and w.dtype == F64
        assert torch.equal(w, torch.full((2, 3), 1 / 3, dtype=F64))


def test_one_kl_step_pinned() -> None:
    """Expected numbers from :func:`autograd_step` ("kl", lr 0.1): the gradient at uniform is
    ``[0.685234223409759, 2.0461923498945547, 1.4090527540586064]``, centred
    ``[-0.694925552377881, 0.6660325741069146, 0.028892978270966374]``; the step stays inside
    the simplex, so the projection leaves it alone."""
    kt = KTpFL(lr=0.1, rho=0.7, temperature=1.0)
    row = kt.update(LOGITS, context())
    expected = torch.tensor([0.40282588857112145, 0.26673007592264186, 0.3304440355062367],
                            dtype=F64)
    assert torch.allclose(row, expected, rtol=0, atol=1e-14)
    assert torch.allclose(row, autograd_step("kl", 0.1), rtol=0, atol=1e-14)
    grad = coefficient_gradient(torch.full((3,), 1 / 3, dtype=F64),
                                torch.softmax(LOGITS, dim=2), torch.softmax(STUDENT, dim=1),
                                rho=0.7)
    assert grad.tolist() == pytest.approx(
        [0.685234223409759, 2.0461923498945547, 1.4090527540586064], abs=1e-14)
    # the plug now answers with that row; the stored masses keep sum 3 over the three teachers
    assert torch.allclose(kt(LOGITS, context()), expected.expand(2, 3), rtol=0, atol=1e-14)
    assert sum(kt.mass[9].values()) == pytest.approx(3.0, abs=1e-14)


def test_one_mse_step_pinned() -> None:
    """The reference code's squared-error divergence ("mse", lr 0.1): gradient at uniform
    ``[-0.1715006501893522, 0.13720052015148176, 0.0]`` (the flat teacher's is 0), centred
    ``[-0.16006727351006206, 0.1486338968307719, 0.011433376679290147]``."""
    row = KTpFL(lr=0.1, temperature=1.0, divergence="mse").update(LOGITS, context())
    expected = torch.tensor([0.34934006068433954, 0.3184699436502561, 0.3321899956654043],
                            dtype=F64)
    assert torch.allclose(row, expected, rtol=0, atol=1e-14)
    assert torch.allclose(row, autograd_step("mse", 0.1), rtol=0, atol=1e-14)


def test_adaptive_step_is_the_reference_rule() -> None:
    # 5**k with 5**k * g in [0.01, 0.05), |k| <= 5
    cases = {1.0: 0.04, 0.001: 25.0, 0.03: 1.0, 0.05: 0.2, 0.01: 1.0, 1e6: 5.0**-5,
             1e-9: 5.0**5, 0.0: 1.0}
    for g, step in cases.items():
        assert adaptive_step(g) == pytest.approx(step, rel=1e-15), g
    # on the toy case mean |centred gradient| = 0.463283701585254, so the step is 0.04
    row = KTpFL(temperature=1.0).update(LOGITS, context())
    assert torch.allclose(row, autograd_step("kl", 0.04), rtol=0, atol=1e-14)
    assert row.tolist() == pytest.approx(
        [0.36113035542844857, 0.30669203036905673, 0.33217761420249464], abs=1e-14)


def test_update_moves_weight_toward_the_teacher_matching_the_student() -> None:
    kt = KTpFL(temperature=1.0)
    first = kt.update(LOGITS, context())
    assert first[0] > 1 / 3 > first[1]
    for _ in range(30):
        row = kt.update(LOGITS, context())
        assert row.min() >= 0 and row.sum() == pytest.approx(1.0, abs=1e-12)
    assert row[0] > row[2] > row[1]  # agreeing > flat > contradicting
    rows_sum_to_one(kt(LOGITS, context()))


def test_an_all_wrong_teacher_can_reach_zero_but_never_below() -> None:
    # a large step without the pull toward uniform projects onto the agreeing teacher
    row = KTpFL(lr=10.0, rho=0.0, temperature=1.0).update(LOGITS, context())
    assert torch.equal(row, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    # the pull toward uniform keeps it in play
    kt = KTpFL(lr=0.1, rho=5.0, temperature=1.0)
    for _ in range(200):
        row = kt.update(LOGITS, context())
    assert 0 < row[1] < 1 / 3


def test_identical_teachers_keep_equal_coefficients() -> None:
    same = LOGITS[1:2].expand(3, -1, -1).clone()
    kt = KTpFL(temperature=1.0)
    for _ in range(5):
        row = kt.update(same, context())
        assert row[0] == row[1] == row[2]
        assert row.tolist() == pytest.approx([1 / 3] * 3, abs=1e-12)
    twins = torch.stack([LOGITS[1], LOGITS[1], LOGITS[0]])  # clients 3 and 5 identical
    kt = KTpFL(temperature=1.0)
    for _ in range(5):
        row = kt.update(twins, context())
        assert row[0] == row[1] < row[2]


def test_client_seen_later_starts_at_the_prior() -> None:
    kt = KTpFL(temperature=1.0)
    for _ in range(3):
        kt.update(LOGITS, context())
    old = kt(LOGITS, context())[0]
    four = torch.cat([LOGITS, LOGITS[2:]])
    w = kt(four, context(CIDS + [11]))[0]
    assert w[3].item() == pytest.approx(0.25, abs=1e-14)  # the mean mass of the others is 1
    assert torch.allclose(w[:3] / w[:3].sum(), old, rtol=0, atol=1e-14)
    rows_sum_to_one(kt(four, context(CIDS + [11])))
    # a new student starts uniform; updating over a subset leaves the others' mass alone
    assert torch.equal(kt(LOGITS, context(student=13))[0], torch.full((3,), 1 / 3, dtype=F64))
    kt.update(LOGITS[:2], context([3, 5], student=13))
    assert kt.mass[13][3] + kt.mass[13][5] == pytest.approx(2.0, abs=1e-14)
    assert 7 not in kt.mass[13]


def test_calling_never_updates() -> None:
    kt = KTpFL(temperature=1.0)
    kt.update(LOGITS, context())
    before = kt.state_dict()
    first, second = kt(LOGITS, context()), kt(LOGITS, context())
    assert torch.equal(first, second)
    assert all(torch.equal(before[k], v) for k, v in kt.state_dict().items())
    assert KTpFL.stateful is True


def test_shared_target_is_the_mean_of_the_present_rows() -> None:
    kt = KTpFL(temperature=1.0)
    # client 3 among its own teachers (the paper's diagonal): its own prediction is rewarded
    own = kt.update(LOGITS, context(student=3, student_logits=LOGITS[0]))
    assert own[0] > own[2] and own[0] > own[1]
    w = kt(LOGITS, context(student=None))
    uniform = torch.full((3,), 1 / 3, dtype=F64)
    assert torch.allclose(w[0], (own + 2 * uniform) / 3, rtol=0, atol=1e-14)
    rows_sum_to_one(w)


def test_zero_steps_and_a_single_teacher_change_nothing() -> None:
    assert torch.equal(KTpFL(steps=0).update(LOGITS, context()),
                       torch.full((3,), 1 / 3, dtype=F64))
    kt = KTpFL()
    assert torch.equal(kt.update(LOGITS[:1], context([3])), torch.ones(1, dtype=F64))
    assert kt.mass == {}


def test_state_dict_round_trip() -> None:
    kt = KTpFL(temperature=1.0)
    kt.update(LOGITS, context())
    kt.update(LOGITS, context(student=3, student_logits=LOGITS[0]))
    buffer = io.BytesIO()
    torch.save(kt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["student"].tolist() == [3, 3, 3, 9, 9, 9]
    assert state["teacher"].tolist() == [3, 5, 7, 3, 5, 7]
    restored = KTpFL(temperature=1.0)
    restored.load_state_dict(state)
    assert restored.mass == kt.mass
    for ctx in (context(), context(student=3), context(student=None)):
        assert torch.equal(restored(LOGITS, ctx), kt(LOGITS, ctx))
    assert torch.equal(restored.update(LOGITS, context()), kt.update(LOGITS, context()))
    plain = KTpFL()
    plain.load_state_dict({k: v.tolist() for k, v in kt.state_dict().items()})
    assert plain.mass == kt.mass
    with pytest.raises(ValueError, match="same length"):
        plain.load_state_dict({"student": [1], "teacher": [2, 3], "mass": [1.0]})


def test_simplex_projection() -> None:
    assert torch.allclose(simplex_projection(torch.tensor([0.8, 0.5, -0.3], dtype=F64)),
                          torch.tensor([0.65, 0.35, 0.0], dtype=F64), rtol=0, atol=1e-15)
    point = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    assert torch.equal(simplex_projection(point), point)
    assert torch.equal(simplex_projection(point + 3.0), point)  # a common shift is ignored
    assert torch.equal(simplex_projection(torch.tensor([-4.0], dtype=F64)),
                       torch.ones(1, dtype=F64))


def test_registry_builds_it() -> None:
    assert "kt_pfl" in WEIGHTINGS.names()
    kt = make_weighting("kt_pfl", {"lr": 0.5, "rho": 0.1, "temperature": 2.0, "steps": 3,
                                   "divergence": "mse"})
    assert isinstance(kt, KTpFL)
    assert (kt.lr, kt.rho, kt.temperature, kt.steps, kt.divergence) == (0.5, 0.1, 2.0, 3, "mse")
    default = make_weighting("kt_pfl")
    assert (default.lr, default.rho, default.temperature, default.steps,
            default.divergence) == (None, 0.7, 10.0, 1, "kl")
    assert not uses_labels(default)


@pytest.mark.parametrize("params", [{"lr": 0.0}, {"lr": -1.0}, {"rho": -0.1},
                                    {"temperature": 0.0}, {"steps": -1}, {"steps": 1.5},
                                    {"steps": True}, {"divergence": "l1"}])
def test_bad_params_raise(params: dict) -> None:
    with pytest.raises(ValueError):
        KTpFL(**params)
    with pytest.raises(ScenarioError) as exc:
        make_weighting("kt_pfl", params)
    assert exc.value.path.startswith("strategy.params.weighting_params")


def test_unknown_param_and_missing_context_raise() -> None:
    with pytest.raises(ScenarioError) as exc:
        make_weighting("kt_pfl", {"penalty_ratio": 0.7})
    assert exc.value.path == "strategy.params.weighting_params.penalty_ratio"
    kt = KTpFL()
    no_ids = TeacherContext(torch.ones(3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="client ids"):
        kt(LOGITS, no_ids)
    with pytest.raises(ValueError, match="distinct"):
        kt(LOGITS, context([3, 3, 7]))
    with pytest.raises(ValueError, match="student"):
        kt.update(LOGITS, context(student=None))
    with pytest.raises(ValueError, match="student"):
        kt.update(LOGITS, context(student_logits=None))
    with pytest.raises(ValueError, match="2 ids"):
        kt.update(LOGITS, context([3, 5]))
