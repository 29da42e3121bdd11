"""Tests for fedkd.comm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd.comm import (
    ByteLedger,
    array_bytes,
    arrayrecord_to_state_dict,
    message_bytes,
    state_dict_to_arrayrecord,
)
from fedkd.models import build_model

NPY_HEADER = 128  # .npy v1.0 header of a small array, padded to a multiple of 64 bytes


def test_array_bytes_known_sizes() -> None:
    rec = ArrayRecord()
    rec["f32"] = Array(np.zeros(10, dtype=np.float32))
    assert array_bytes(rec) == NPY_HEADER + 40
    rec["i64"] = Array(np.arange(3, dtype=np.int64))
    assert array_bytes(rec) == 2 * NPY_HEADER + 40 + 24
    rec["f16"] = Array(np.ones((4, 5), dtype=np.float16))
    assert array_bytes(rec) == 3 * NPY_HEADER + 40 + 24 + 40
    assert array_bytes(ArrayRecord()) == 0


def test_array_bytes_raw_payload() -> None:
    data = np.arange(6, dtype=np.float64).tobytes()
    rec = ArrayRecord({"raw": Array(dtype="float64", shape=(6,), stype="raw", data=data)})
    assert array_bytes(rec) == 48


def test_message_bytes_counts_array_records_only() -> None:
    a = ArrayRecord({"w": Array(np.zeros((2, 5), dtype=np.float32))})
    b = ArrayRecord({"x": Array(np.zeros(3, dtype=np.int64)), "y": Array(np.zeros(1, np.uint8))})
    content = RecordDict(
        {
            "model": a,
            "logits": b,
            "metrics": MetricRecord({"loss": 0.5, "n": 10}),
            "config": ConfigRecord({"lr": 0.1}),
        }
    )
    assert message_bytes(content) == (NPY_HEADER + 40) + (NPY_HEADER + 24) + (NPY_HEADER + 1)
    assert message_bytes(content) == array_bytes(a) + array_bytes(b)
    assert message_bytes(RecordDict()) == 0


def test_ledger_totals() -> None:
    ledger = ByteLedger()
    ledger.add(1, 0, "down", 100)
    ledger.add(1, 0, "up", 10)
    ledger.add(1, 2, "down", 100)
    ledger.add(1, 2, "up", 30)
    ledger.add(1, 2, "up", 5)
    ledger.add(2, 1, "down", 7)
    assert ledger.round_totals(1) == (200, 45)
    assert ledger.round_totals(2) == (7, 0)
    assert ledger.round_totals(3) == (0, 0)
    assert ledger.per_client(1) == {0: (100, 10), 2: (100, 35)}
    assert ledger.per_client(2) == {1: (7, 0)}
    assert ledger.cumulative() == (207, 45)


def test_ledger_rejects_bad_input() -> None:
    ledger = ByteLedger()
    with pytest.raises(ValueError):
        ledger.add(1, 0, "sideways", 1)
    with pytest.raises(ValueError):
        ledger.add(1, 0, "up", -1)


def test_state_dict_round_trip_exact() -> None:
    model = build_model("resnet8", (3, 32, 32), 10, seed=0)
    model(torch.randn(4, 3, 32, 32))  # updates running stats and num_batches_tracked
    sd = model.state_dict()
    rec = state_dict_to_arrayrecord(sd)
    assert list(rec.keys()) == list(sd.keys())
    back = arrayrecord_to_state_dict(rec)
    assert list(back.keys()) == list(sd.keys())
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    assert any(v.dtype == torch.int64 for v in back.values())
    fresh = build_model("resnet8", (3, 32, 32), 10, seed=1)
    fresh.load_state_dict(back)
    back["head.weight"].add_(1.0)  # tensors are writable


def test_state_dict_mixed_dtypes() -> None:
    sd = {
        "a": torch.arange(5, dtype=torch.int64),
        "b": torch.randn(2, 3).half(),
        "c": torch.tensor(3, dtype=torch.int32),
        "d": torch.tensor([True, False]),
        "e": torch.randn(4, dtype=torch.float64).t(),
    }
    back = arrayrecord_to_state_dict(state_dict_to_arrayrecord(sd))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_prefixes() -> None:
    student = {"w": torch.ones(2), "b": torch.zeros(1)}
    gen = {"w": torch.full((3,), 2.0)}
    rec = state_dict_to_arrayrecord(student, prefix="student")
    for key, arr in state_dict_to_arrayrecord(gen, prefix="gen").items():
        rec[key] = arr
    assert sorted(rec.keys()) == ["gen.w", "student.b", "student.w"]
    s_back = arrayrecord_to_state_dict(rec, prefix="student")
    g_back = arrayrecord_to_state_dict(rec, prefix="gen")
    assert sorted(s_back) == ["b", "w"] and torch.equal(s_back["w"], student["w"])
    assert list(g_back) == ["w"] and torch.equal(g_back["w"], gen["w"])
    assert arrayrecord_to_state_dict(rec, prefix="stud") == {}
    assert sorted(arrayrecord_to_state_dict(rec)) == ["gen.w", "student.b", "student.w"]


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5, dtype=np.int64),
    np.array([True, False]), np.array(2.5, dtype=np.float64), np.zeros((0, 3), np.float32),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))])
def test_as_numpy_equals_flowers_decoding(value: np.ndarray) -> None:
    from flwr.app import Array

    from fedkd.comm import as_numpy

    arr = Array(value)
    fast, slow = as_numpy(arr), arr.numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)
