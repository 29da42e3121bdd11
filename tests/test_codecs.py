"""Codecs: round trips within their stated error, exact byte counts, the wire around messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedkd.codecs import CODECS, make_codec
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.wire import DOWN, UP, Wire, decode_replies, encode_cached, float_refs, wire_mod

X = np.random.default_rng(0).normal(size=1000).astype(np.float32)
LOGITS = np.random.default_rng(1).normal(size=(50, 10)).astype(np.float32)
NPY_HEADER = 128  # bytes of a NumPy-serialized Array's header, for these small shapes


def sent_bytes(parts: dict[str, np.ndarray]) -> int:
    return sum(len(Array(np.ascontiguousarray(v)).data) for v in parts.values())


@pytest.mark.parametrize(("name", "params", "payload", "max_err"), [
    ("fp32", {}, 4000, 0.0),
    ("fp16", {}, 2000, float(np.abs(X).max()) * 2.0 ** -11),
    ("bf16", {}, 2000, float(np.abs(X).max()) * 2.0 ** -9),
    ("int8", {}, 1000 + 8, (X.max() - X.min()) / 255 / 2 + 1e-6),
])
def test_dense_codecs_round_trip_and_bytes(name: str, params: dict, payload: int,
                                           max_err: float) -> None:
    codec = make_codec(name, params, "comm.up")
    parts = codec.encode(X, np.random.default_rng(0))
    assert sent_bytes(parts) == payload + NPY_HEADER * len(parts)
    out = codec.decode(parts)
    assert out.dtype == np.float32 and out.shape == X.shape
    assert float(np.abs(out - X).max()) <= max_err


def test_bf16_rounds_to_nearest_even() -> None:
    codec = make_codec("bf16", {}, "comm.up")
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5], dtype=np.float32)
    assert codec.decode(codec.encode(x, np.random.default_rng(0))).tolist() == [
        1.0, 1.0, 1.0 + 2 ** -6, -2.5]  # ties to even: 1+2^-8 -> 1, 1+3*2^-8 -> 1+2^-6


def test_topk_keeps_largest_and_sparsifies_the_update() -> None:
    codec = make_codec("topk", {"fraction": 0.1}, "comm.up")
    parts = codec.encode(X, np.random.default_rng(0))
    assert sent_bytes(parts) == 100 * 4 + 100 * 4 + 4 + 3 * NPY_HEADER
    out = codec.decode(parts)
    kept = np.flatnonzero(out)
    assert len(kept) == 100 and np.array_equal(out[kept], X[kept])
    assert np.abs(X[kept]).min() >= np.abs(np.delete(X, kept)).max()
    ref = X - np.where(np.arange(1000) % 10 == 0, 5.0, 0.01).astype(np.float32)
    delta = codec.decode(codec.encode(X, np.random.default_rng(0), ref), ref)
    # the update X - ref is 5.0 on every 10th entry: exactly what top-10% keeps
    assert np.allclose(delta[::10], X[::10]) and np.allclose(np.delete(delta, slice(0, None, 10)),
                                                               np.delete(ref, slice(0, None, 10)))


def test_qsgd_is_unbiased_seeded_and_bounded() -> None:
    codec = make_codec("qsgd", {"levels": 4}, "comm.up")
    x = X[:20]
    one = codec.encode(x, np.random.default_rng(7))
    assert np.array_equal(one["q"], codec.encode(x, np.random.default_rng(7))["q"])
    norm = float(np.linalg.norm(x))
    assert float(np.abs(codec.decode(one) - x).max()) <= norm / 4 + 1e-5  # one level
    mean = np.mean([codec.decode(codec.encode(x, np.random.default_rng(s)))
                    for s in range(4000)], axis=0)
    assert np.allclose(mean, x, atol=0.05 * norm)
    assert sent_bytes(one) == 20 + 4 + 2 * NPY_HEADER


def test_logit_codecs() -> None:
    top = make_codec("logit_topk", {"k": 3}, "comm.up")
    parts = top.encode(LOGITS, np.random.default_rng(0))
    assert sent_bytes(parts) == 50 * 3 * 2 + 50 * 3 * 4 + 8 + 3 * NPY_HEADER
    out = top.decode(parts)
    assert np.array_equal(np.sort(out, 1)[:, -3:], np.sort(LOGITS, 1)[:, -3:])
    assert np.array_equal(out.argmax(1), LOGITS.argmax(1))
    assert np.all(np.sort(out, 1)[:, :7] == np.sort(LOGITS, 1)[:, 7:8])  # rest at the 3rd
    soft = make_codec("soft_label", {"bits": 8}, "comm.up")
    parts = soft.encode(LOGITS, np.random.default_rng(0))
    assert sent_bytes(parts) == 500 + NPY_HEADER
    p = torch.softmax(torch.from_numpy(LOGITS), 1).numpy()
    q = torch.softmax(torch.from_numpy(soft.decode(parts)), 1).numpy()
    assert float(np.abs(p - q).max()) <= 1 / 255 + 1e-3
    weights = np.ones(7, np.float32)  # not a 2-D payload: sent as fp32
    assert np.array_equal(soft.decode(soft.encode(weights, np.random.default_rng(0))), weights)


def test_bad_codec_names_the_key() -> None:
    with pytest.raises(ScenarioError) as info:
        make_codec("zip", {}, "comm.up")
    assert info.value.path == "comm.up.codec" and "'topk'" in info.value.allowed
    with pytest.raises(ScenarioError) as info:
        make_codec("topk", {"fraction": 2}, "comm.up")
    assert info.value.path == "comm.up.params"
    assert CODECS.names() == ["bf16", "fp16", "fp32", "int8", "logit_topk", "qsgd",
                              "soft_label", "topk"]


def _content(w: np.ndarray) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": Array(w),
                                              "n": Array(np.array([3], np.int64))}),
                       "config": ConfigRecord({"server-round": 1})})


def test_wire_encodes_a_shared_content_once_and_decodes_replies_against_it() -> None:
    wire = Wire(make_codec("fp16", {}, "d"), make_codec("topk", {"fraction": 0.1,
                                                                "error_feedback": False}, "u"))
    shared = _content(X)
    msgs = [Message(shared, dst_node_id=n, message_type="train", group_id="1") for n in (5, 6)]
    msgs, refs = encode_cached(wire, msgs)
    assert msgs[0].content is msgs[1].content  # encoded once
    rec = msgs[0].content["arrays"]
    assert sorted(rec.keys()) == ["n", "w::v"] and rec["n"].numpy().tolist() == [3]
    decoded_down = X.astype(np.float16).astype(np.float32)
    assert np.array_equal(refs[5][("arrays", "w")], decoded_down)
    # a client uploads weights that moved by +1 on 5 entries: top-k sends exactly those
    moved = decoded_down.copy()
    moved[:5] += 1.0
    up = wire.encode(_content(moved), wire.up, 1, UP, 0, refs=refs[5])
    assert sorted(up["arrays"].keys()) == ["n", "w::idx", "w::shape", "w::val"]
    reply = Message(up, reply_to=msgs[0])
    (back,) = decode_replies(wire, [reply], {reply.metadata.src_node_id: refs[5]})
    assert np.allclose(back.content["arrays"]["w"].numpy(), moved)


def test_wire_mod_decodes_encodes_and_keeps_the_residual(tmp_path: Path) -> None:
    wire = Wire(make_codec("fp32", {}, "d"), make_codec("topk", {"fraction": 0.5}, "u"))
    store = StateStore(str(tmp_path))
    mod = wire_mod(wire, lambda: store)
    ctx = Context(run_id=1, node_id=9, node_config={"partition-id": 2}, state=RecordDict(),
                  run_config={})
    start = np.zeros(4, np.float32)
    update = np.array([4.0, 3.0, 2.0, 1.0], np.float32)

    def handler(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy() + update
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    sent = []
    for rnd in (1, 2):
        msg = Message(_content(start), dst_node_id=9, message_type="train", group_id=str(rnd))
        reply = mod(msg, ctx, handler)
        sent.append(wire.decode(reply.content, wire.up, float_refs(msg.content)))
    first = sent[0]["arrays"]["w"].numpy()
    second = sent[1]["arrays"]["w"].numpy()
    assert first.tolist() == [4.0, 3.0, 0.0, 0.0]  # top half of the update
    # round 2 adds what round 1 left out (2, 1) to the same update: 4, 3, 4, 2 -> keeps 4, 4
    assert second.tolist() == [4.0, 0.0, 4.0, 0.0]
    residual = store.load(2, "wire-residual")
    assert residual is not None and residual["arrays/w"].tolist() == [0.0, 3.0, 0.0, 2.0]


def test_wire_seeds_stochastic_codecs_by_round_and_node() -> None:
    wire = Wire(make_codec("qsgd", {"levels": 2}, "d"), make_codec("qsgd", {"levels": 2}, "u"),
                seed=3)
    a = wire.encode(_content(X), wire.up, 1, UP, 4)["arrays"]["w::q"].numpy()
    b = wire.encode(_content(X), wire.up, 1, UP, 4)["arrays"]["w::q"].numpy()
    c = wire.encode(_content(X), wire.up, 1, UP, 5)["arrays"]["w::q"].numpy()
    d = wire.encode(_content(X), wire.down, 1, DOWN, 4)["arrays"]["w::q"].numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)
