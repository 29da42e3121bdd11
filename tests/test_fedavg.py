"""Tests for strategies.fedavg (weighted averaging, groups, aggregation, sampling, messages)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedkd.comm import join_groups, split_groups
from strategies import STRATEGIES, get_strategy
from strategies.fedavg import FedAvg, NodeInfo, weighted_average


def _rec(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k.replace("__", "."): Array(v) for k, v in arrays.items()})


def _np(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


# ----------------------------------------------------------------------------- weighted_average


def test_weighted_average_float32_exact() -> None:
    a = _rec(w=np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
             b=np.array([0.0, -8.0], dtype=np.float32))
    b = _rec(w=np.array([[5.0, 6.0], [7.0, 8.0]], dtype=np.float32),
             b=np.array([4.0, 0.0], dtype=np.float32))
    out = weighted_average([a, b], [1, 3])
    assert list(out) == ["w", "b"]
    w, bias = out["w"].numpy(), out["b"].numpy()
    assert w.dtype == np.float32 and w.shape == (2, 2)
    np.testing.assert_array_equal(w, np.array([[4.0, 5.0], [6.0, 7.0]], dtype=np.float32))
    np.testing.assert_array_equal(bias, np.array([3.0, -2.0], dtype=np.float32))
    # weights need not be normalised
    np.testing.assert_array_equal(weighted_average([a, b], [0.5, 1.5])["w"].numpy(), w)
    np.testing.assert_array_equal(weighted_average([a, b], [1, 0])["w"].numpy(),
                                  a["w"].numpy())


def test_weighted_average_single_record_is_identity() -> None:
    a = _rec(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.array([5], dtype=np.int64))
    out = weighted_average([a], [7])
    np.testing.assert_array_equal(out["w"].numpy(), a["w"].numpy())
    assert out["n"].numpy().tolist() == [5] and out["n"].numpy().dtype == np.int64


def test_weighted_average_integer_buffers_rounded() -> None:
    a = _rec(n=np.array([10, 7, 1, 0], dtype=np.int64), s=np.array([[2]], dtype=np.int32))
    b = _rec(n=np.array([20, 8, 2, 1], dtype=np.int64), s=np.array([[3]], dtype=np.int32))
    out = weighted_average([a, b], [1, 3])
    n = out["n"].numpy()
    assert n.dtype == np.int64
    # exact means 17.5, 7.75, 1.75, 0.75 -> rounded (half to even), not truncated
    np.testing.assert_array_equal(n, np.array([18, 8, 2, 1], dtype=np.int64))
    s = out["s"].numpy()
    assert s.dtype == np.int32 and s.shape == (1, 1) and s[0, 0] == 3  # 2.75
    half = weighted_average([a, b], [1, 1])["s"].numpy()
    assert half[0, 0] == 2  # 2.5 rounds half to even


def test_weighted_average_scalar_float_buffer() -> None:
    a = _rec(t=np.array(1.0, dtype=np.float32))
    b = _rec(t=np.array(3.0, dtype=np.float32))
    t = weighted_average([a, b], [1, 1])["t"].numpy()
    assert t.shape == () and t.dtype == np.float32 and t == 2.0


def test_weighted_average_scalar_int_buffer() -> None:
    # BatchNorm's num_batches_tracked is a 0-d int64 tensor (cnn_medium, resnet8, resnet20)
    a = _rec(n=np.array(2, dtype=np.int64))
    b = _rec(n=np.array(3, dtype=np.int64))
    n = weighted_average([a, b], [1, 3])["n"].numpy()
    assert n.shape == () and n.dtype == np.int64 and n == 3


def test_weighted_average_accumulates_in_float64() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    weights = [1.0, 2.0, 7.0]
    out = weighted_average([_rec(w=x) for x in xs], weights)["w"].numpy()
    assert out.dtype == np.float32
    w = np.array(weights) / 10.0
    expected = (w[0] * xs[0].astype(np.float64) + w[1] * xs[1].astype(np.float64)
                + w[2] * xs[2].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    # a float32 accumulation would differ somewhere, so the check above is meaningful
    w32 = w.astype(np.float32)
    acc32 = np.zeros(1000, dtype=np.float32)
    for wi, x in zip(w32, xs, strict=True):
        acc32 += wi * x
    assert not np.array_equal(acc32, expected)


def test_weighted_average_float64_and_float16_keep_dtype() -> None:
    a = _rec(d=np.array([0.1], dtype=np.float64), h=np.array([1.0], dtype=np.float16))
    b = _rec(d=np.array([0.2], dtype=np.float64), h=np.array([2.0], dtype=np.float16))
    out = weighted_average([a, b], [1, 3])
    assert out["d"].numpy().dtype == np.float64
    assert out["d"].numpy()[0] == 0.25 * 0.1 + 0.75 * 0.2
    assert out["h"].numpy().dtype == np.float16
    assert out["h"].numpy()[0] == np.float16(1.75)


# ----------------------------------------------------------------------------- groups


def test_split_and_join_groups_round_trip() -> None:
    rec = ArrayRecord({
        "cnn_small.conv1.weight": Array(np.ones((2, 1, 3, 3), dtype=np.float32)),
        "cnn_small.conv1.bias": Array(np.zeros(2, dtype=np.float32)),
        "mlp.layers.0.weight": Array(np.full((4, 3), 2.0, dtype=np.float32)),
        "mlp.bn.num_batches_tracked": Array(np.array(3, dtype=np.int64)),
    })
    groups = split_groups(rec)
    assert list(groups) == ["cnn_small", "mlp"]
    assert list(groups["cnn_small"]) == ["conv1.weight", "conv1.bias"]
    assert list(groups["mlp"]) == ["layers.0.weight", "bn.num_batches_tracked"]
    assert groups["mlp"]["bn.num_batches_tracked"].numpy() == 3
    assert groups["cnn_small"]["conv1.weight"].shape == (2, 1, 3, 3)
    joined = join_groups(groups)
    assert list(joined) == list(rec)
    for key in rec:
        assert joined[key].dtype == rec[key].dtype
        np.testing.assert_array_equal(joined[key].numpy(), rec[key].numpy())
    assert split_groups(ArrayRecord()) == {}
    assert len(join_groups({})) == 0


def test_split_groups_interleaved_keys() -> None:
    rec = ArrayRecord({
        "a.x": Array(np.zeros(1, dtype=np.float32)),
        "b.x": Array(np.ones(1, dtype=np.float32)),
        "a.y.z": Array(np.full(1, 2.0, dtype=np.float32)),
    })
    groups = split_groups(rec)
    assert {k: list(v) for k, v in groups.items()} == {"a": ["x", "y.z"], "b": ["x"]}
    assert sorted(join_groups(groups)) == sorted(rec)


# ----------------------------------------------------------------------------- FedAvg


def _nodes(n: int, archs: tuple[str, ...] = ("cnn_small",)) -> list[NodeInfo]:
    """Nodes ordered by partition id, with node ids that are not in partition order."""
    return [NodeInfo(node_id=1000 + (7 * cid) % n, cid=cid, arch=archs[cid % len(archs)],
                     num_examples=10 + cid, label_counts=(5, 5 + cid)) for cid in range(n)]


def _strategy(**kw: float) -> FedAvg:
    strategy = FedAvg(**kw)  # type: ignore[arg-type]
    return strategy


def _instruction(node_id: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=node_id, message_type="train")


def _reply(node_id: int, arrays: ArrayRecord, n: int, loss: float) -> Message:
    return Message(RecordDict({"arrays": arrays,
                               "metrics": MetricRecord({"num-examples": n, "train-loss": loss})}),
                   reply_to=_instruction(node_id))


def _error_reply(node_id: int) -> Message:
    return Message(Error(3, "x"), reply_to=_instruction(node_id))


def test_fedavg_is_registered() -> None:
    assert get_strategy("fedavg") is FedAvg
    assert "fedavg" in STRATEGIES


def test_reply_comes_from_instruction_destination() -> None:
    reply = _reply(42, _rec(w=np.zeros(1, dtype=np.float32)), 1, 0.0)
    assert reply.metadata.src_node_id == 42
    assert not reply.has_error()
    assert _error_reply(42).has_error()


def _two_group_setup() -> tuple[FedAvg, list[NodeInfo]]:
    strategy = _strategy()
    nodes = [NodeInfo(11, 0, "mlp", 10, (10,)), NodeInfo(12, 1, "cnn_small", 30, (30,)),
             NodeInfo(13, 2, "mlp", 30, (30,)), NodeInfo(14, 3, "resnet8", 5, (5,))]
    strategy.nodes = nodes
    strategy.current = {
        "mlp": _rec(fc__weight=np.zeros((2, 2), dtype=np.float32),
                    bn__num_batches_tracked=np.array([0], dtype=np.int64)),
        "cnn_small": _rec(conv__weight=np.zeros(3, dtype=np.float32)),
        "resnet8": _rec(head__bias=np.array([9.0, -9.0], dtype=np.float32)),
    }
    return strategy, nodes


def test_aggregate_train_per_group_exact() -> None:
    strategy, _ = _two_group_setup()
    replies = [
        _reply(11, _rec(fc__weight=np.full((2, 2), 1.0, dtype=np.float32),
                        bn__num_batches_tracked=np.array([4], dtype=np.int64)), 10, 2.0),
        _reply(12, _rec(conv__weight=np.array([1.0, 2.0, 3.0], dtype=np.float32)), 30, 1.0),
        _reply(13, _rec(fc__weight=np.array([[5.0, 9.0], [1.0, -3.0]], dtype=np.float32),
                        bn__num_batches_tracked=np.array([7], dtype=np.int64)), 30, 0.5),
    ]
    arrays, metrics = strategy.aggregate_train(3, replies)
    assert arrays is not None and metrics is not None
    out = _np(arrays)
    assert sorted(out) == ["cnn_small.conv.weight", "mlp.bn.num_batches_tracked",
                           "mlp.fc.weight", "resnet8.head.bias"]
    # mlp: weights 10 and 30 -> 0.25 * a + 0.75 * b
    np.testing.assert_array_equal(out["mlp.fc.weight"],
                                  np.array([[4.0, 7.0], [1.0, -2.0]], dtype=np.float32))
    assert out["mlp.bn.num_batches_tracked"].dtype == np.int64
    assert out["mlp.bn.num_batches_tracked"].tolist() == [6]  # 6.25 rounded
    # cnn_small: one reply, taken as is
    np.testing.assert_array_equal(out["cnn_small.conv.weight"],
                                  np.array([1.0, 2.0, 3.0], dtype=np.float32))
    # resnet8: no reply, keeps its current model
    np.testing.assert_array_equal(out["resnet8.head.bias"],
                                  np.array([9.0, -9.0], dtype=np.float32))
    assert dict(metrics) == {"train-loss": pytest.approx((10 * 2.0 + 30 * 1.0 + 30 * 0.5) / 70,
                                                         rel=1e-12)}
    assert strategy.failures == {3: 0}


def test_aggregate_groups_weights_by_num_examples_not_node_info() -> None:
    strategy, _ = _two_group_setup()
    # NodeInfo says 10 and 30 examples; the replies' num-examples (3 and 1) decide
    replies = [_reply(11, _rec(fc__weight=np.full((2, 2), 4.0, dtype=np.float32),
                               bn__num_batches_tracked=np.array([0], dtype=np.int64)), 3, 0.0),
               _reply(13, _rec(fc__weight=np.full((2, 2), 8.0, dtype=np.float32),
                               bn__num_batches_tracked=np.array([0], dtype=np.int64)), 1, 0.0)]
    groups = strategy.aggregate_groups(replies)
    np.testing.assert_array_equal(groups["mlp"]["fc.weight"].numpy(),
                                  np.full((2, 2), 5.0, dtype=np.float32))
    assert groups["cnn_small"] is strategy.current["cnn_small"]
    assert groups["resnet8"] is strategy.current["resnet8"]


def test_aggregate_train_excludes_and_counts_errors() -> None:
    strategy, _ = _two_group_setup()
    replies = [
        _reply(11, _rec(fc__weight=np.full((2, 2), 2.0, dtype=np.float32),
                        bn__num_batches_tracked=np.array([1], dtype=np.int64)), 10, 3.0),
        _error_reply(12),
        _error_reply(13),
    ]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics is not None
    out = _np(arrays)
    np.testing.assert_array_equal(out["mlp.fc.weight"], np.full((2, 2), 2.0, dtype=np.float32))
    np.testing.assert_array_equal(out["cnn_small.conv.weight"], np.zeros(3, dtype=np.float32))
    assert dict(metrics) == {"train-loss": 3.0}
    assert strategy.failures == {2: 2}


def test_aggregate_train_all_errors() -> None:
    strategy, _ = _two_group_setup()
    assert strategy.aggregate_train(5, [_error_reply(11), _error_reply(14)]) == (None, None)
    assert strategy.aggregate_train(6, []) == (None, None)
    assert strategy.failures == {5: 2, 6: 0}


def test_split_replies() -> None:
    strategy, _ = _two_group_setup()
    good = _reply(11, _rec(w=np.zeros(1, dtype=np.float32)), 1, 0.0)
    ok = strategy.split_replies(1, iter([_error_reply(12), good]))
    assert ok == [good]
    assert strategy.failures[1] == 1


def test_node_lookup() -> None:
    strategy, nodes = _two_group_setup()
    assert strategy.node(13) == nodes[2]


# ----------------------------------------------------------------------------- sampling


def test_sample_reproducible_and_round_dependent() -> None:
    strategy = _strategy(seed=3)
    strategy.nodes = _nodes(10)
    picks = {r: [n.cid for n in strategy.sample(None, r, 0.3, 1)] for r in (1, 2, 3)}
    assert picks == {1: [2, 5, 7], 2: [0, 5, 6], 3: [0, 2, 9]}
    again = _strategy(seed=3)
    again.nodes = _nodes(10)
    assert [n.cid for n in again.sample(None, 2, 0.3, 1)] == picks[2]
    other_seed = _strategy(seed=4)
    other_seed.nodes = _nodes(10)
    assert [[n.cid for n in other_seed.sample(None, r, 0.3, 1)] for r in (1, 2, 3)] \
        != list(picks.values())


@pytest.mark.parametrize(("fraction", "minimum", "count"),
                         [(0.3, 1, 3), (0.35, 1, 3), (0.3, 5, 5), (0.05, 1, 1), (0.05, 0, 0),
                          (1.0, 1, 10), (0.5, 20, 10), (0.99, 1, 9)])
def test_sample_count(fraction: float, minimum: int, count: int) -> None:
    strategy = _strategy(seed=1)
    strategy.nodes = _nodes(10)
    chosen = strategy.sample(None, 4, fraction, minimum)
    assert len(chosen) == count
    assert len({n.cid for n in chosen}) == count


def test_sample_ordered_by_partition_id() -> None:
    strategy = _strategy(seed=0)
    strategy.nodes = _nodes(10)
    for r in range(1, 6):
        chosen = strategy.sample(None, r, 0.5, 1)
        cids = [n.cid for n in chosen]
        assert cids == sorted(cids)
        # node ids are scrambled relative to partition ids, so this is not node-id order
        assert all(isinstance(n, NodeInfo) for n in chosen)
    assert [n.node_id for n in strategy.nodes] != sorted(n.node_id for n in strategy.nodes)


def test_sample_full_participation_is_everyone() -> None:
    strategy = _strategy(seed=9)
    strategy.nodes = _nodes(6)
    assert strategy.sample(None, 1, 1.0, 1) == strategy.nodes


def test_discover_returns_cached_nodes_without_grid() -> None:
    strategy = _strategy()
    strategy.nodes = _nodes(3)
    assert strategy.discover(None) is strategy.nodes  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- messages


def _group_strategy() -> FedAvg:
    strategy = _strategy(seed=0)
    strategy.nodes = _nodes(6, archs=("mlp", "cnn_small"))
    strategy.current = {"mlp": _rec(w=np.ones(2, dtype=np.float32)),
                        "cnn_small": _rec(w=np.zeros(3, dtype=np.float32))}
    return strategy


def test_train_messages_share_content_per_arch() -> None:
    strategy = _group_strategy()
    nodes = strategy.nodes
    msgs = strategy.train_messages(7, nodes, ConfigRecord({"lr": 0.1, "local-epochs": 2}))
    assert [m.metadata.dst_node_id for m in msgs] == [n.node_id for n in nodes]
    for m, n in zip(msgs, nodes, strict=True):
        assert m.metadata.message_type == MessageType.TRAIN == "train"
        assert m.metadata.group_id == "7"
        assert m.content["arrays"] is strategy.current[n.arch]
        assert dict(m.content["config"]) == {"lr": 0.1, "local-epochs": 2, "server-round": 7}
    by_arch: dict[str, list[Message]] = {}
    for m, n in zip(msgs, nodes, strict=True):
        by_arch.setdefault(n.arch, []).append(m)
    assert sorted(by_arch) == ["cnn_small", "mlp"]
    for group in by_arch.values():
        assert len(group) == 3
        assert all(m.content is group[0].content for m in group)
    assert by_arch["mlp"][0].content is not by_arch["cnn_small"][0].content
    # both groups share one config record
    assert by_arch["mlp"][0].content["config"] is by_arch["cnn_small"][0].content["config"]


def test_train_messages_do_not_mutate_config() -> None:
    strategy = _group_strategy()
    config = ConfigRecord({"lr": 0.1})
    strategy.train_messages(1, strategy.nodes[:1], config)
    assert dict(config) == {"lr": 0.1}


def test_configure_train_splits_arrays_and_samples() -> None:
    strategy = _strategy(seed=2, fraction_train=0.5)
    strategy.nodes = _nodes(6, archs=("mlp", "cnn_small"))
    arrays = join_groups({"mlp": _rec(w=np.ones(2, dtype=np.float32)),
                          "cnn_small": _rec(w=np.zeros(3, dtype=np.float32))})
    msgs = list(strategy.configure_train(4, arrays, ConfigRecord({}), None))
    expected = strategy.sample(None, 4, 0.5, 1)
    assert len(msgs) == 3
    assert [m.metadata.dst_node_id for m in msgs] == [n.node_id for n in expected]
    assert sorted(strategy.current) == ["cnn_small", "mlp"]
    for m, n in zip(msgs, expected, strict=True):
        assert list(m.content["arrays"]) == ["w"]
        assert m.content["arrays"]["w"].shape == ((2,) if n.arch == "mlp" else (3,))
        assert m.content["config"]["server-round"] == 4


def test_configure_train_disabled() -> None:
    strategy = _strategy(fraction_train=0.0)
    assert list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), None)) == []


def test_configure_evaluate_disabled_by_default() -> None:
    strategy = _group_strategy()
    assert strategy.fraction_evaluate == 0.0 and strategy.min_evaluate_nodes == 0
    assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord({}), None)) == []


def test_configure_evaluate_samples_nodes() -> None:
    strategy = _strategy(seed=0, fraction_evaluate=0.5)
    strategy.nodes = _nodes(6, archs=("mlp", "cnn_small"))
    arrays = join_groups({"mlp": _rec(w=np.ones(2, dtype=np.float32)),
                          "cnn_small": _rec(w=np.zeros(3, dtype=np.float32))})
    msgs = list(strategy.configure_evaluate(2, arrays, ConfigRecord({}), None))
    assert len(msgs) == 3
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in msgs)
    assert all(m.content["config"]["server-round"] == 2 for m in msgs)
