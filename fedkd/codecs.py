"""Compression codecs for what crosses the network, applied in the message layer.

A codec turns one float array into a few smaller arrays (its *parts*) and back. The message
layer (:mod:`fedkd.comm_layer`) encodes every float array of a message before it is sent and
decodes it on receipt, so the receiver trains on the decoded, lossy values and the byte
accounting counts the encoded parts exactly. Integer arrays (BatchNorm counters, label
counts) always travel as they are.

- ``fp32``: no compression.
- ``fp16``, ``bf16``: half precision (bf16 rounds to nearest even, stored as ``uint16``).
- ``int8``: per-tensor affine quantisation, ``x ≈ scale * (q - zero)``; error ≤ scale / 2.
- ``topk``: the ``fraction`` of entries largest in magnitude (indices ``uint32`` + values).
  For an upload that answers a download of the same key (uploaded weights), it sparsifies
  the *update*, the difference from the model received; with ``error_feedback`` the client
  adds what it left out last time before choosing (Stich, Cordonnier, Jaggi, NeurIPS 2018;
  the residual persists in the client state store).
- ``qsgd``: stochastic quantisation to ``levels`` levels of ``|x| / ||x||₂`` with the sign,
  unbiased, seeded (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017).
- ``logit_topk``: for 2-D payloads (logits, soft labels, prototypes): the ``k`` largest
  entries of each row; the others decode to the row's smallest kept value (so a softmax
  gives them the least weight).
- ``soft_label``: CFD-style quantised soft labels (Sattler, Marban, Rischke, Samek, 2020):
  each row's ``softmax`` quantised to ``bits`` bits per class; decoded as log-probabilities
  (whose softmax is the quantised distribution).

Codecs for 2-D payloads send other arrays (weights of other shapes) as ``fp32``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedkd.errors import ScenarioError
from fedkd.registry import Registry
from fedkd.scenario import check_kwargs

Parts = dict[str, np.ndarray]


class Codec(Protocol):
    """Encodes one float array into named parts and decodes them back."""

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """Parts of ``x`` (``ref``: the array the receiver already holds for this key)."""
        ...

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """The float32 array the parts stand for."""
        ...


CODECS: Registry[Callable[..., Codec]] = Registry("codec")


def _shape(parts: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(int(d) for d in parts["shape"])


def _shape_part(x: np.ndarray) -> np.ndarray:
    return np.asarray(x.shape, dtype=np.int32)


@CODECS.register("fp32")
@dataclass(frozen=True)
class Fp32:
    """No compression."""

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """``x`` as float32."""
        return {"v": np.asarray(x, dtype=np.float32)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """The float32 values."""
        return np.asarray(parts["v"], dtype=np.float32)


@CODECS.register("fp16")
@dataclass(frozen=True)
class Fp16:
    """IEEE half precision (relative error ≤ 2⁻¹¹ in its normal range)."""

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """``x`` as float16."""
        return {"v": np.asarray(x, dtype=np.float16)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """Back to float32."""
        return parts["v"].astype(np.float32)


@CODECS.register("bf16")
@dataclass(frozen=True)
class Bf16:
    """bfloat16: float32's exponent, 8 bits of mantissa (relative error ≤ 2⁻⁹)."""

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """The upper 16 bits of each float32, rounded to nearest even."""
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return {"v": rounded.astype(np.uint16)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """The 16 bits back in the upper half of a float32."""
        return (parts["v"].astype(np.uint32) << 16).view(np.float32)


@CODECS.register("int8")
@dataclass(frozen=True)
class Int8:
    """Per-tensor affine quantisation to 256 levels between the tensor's min and max."""

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """``q = round((x - min) / scale)`` as uint8, with ``min`` and ``scale``."""
        x = np.asarray(x, dtype=np.float32)
        lo = float(x.min()) if x.size else 0.0
        hi = float(x.max()) if x.size else 0.0
        scale = (hi - lo) / 255.0 or 1.0
        q = np.clip(np.rint((x - lo) / scale), 0, 255).astype(np.uint8)
        return {"q": q, "affine": np.asarray([lo, scale], dtype=np.float32)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """``min + scale * q``."""
        lo, scale = (float(v) for v in parts["affine"])
        return (lo + scale * parts["q"].astype(np.float32)).astype(np.float32)


@CODECS.register("topk")
@dataclass(frozen=True)
class TopK:
    """The ``fraction`` of entries largest in magnitude; of the update when ``ref`` is known.

    Parameters
    ----------
    fraction : float
        Share of entries kept, in (0, 1] (at least one entry).
    error_feedback : bool
        Clients add the residual left out of their previous upload before choosing.
    """

    fraction: float = 0.1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def keep(self, size: int) -> int:
        """Entries kept of an array of ``size``."""
        return min(size, max(1, int(round(self.fraction * size))))

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """Indices and values of the largest entries of ``x`` (or of ``x - ref``)."""
        x = np.asarray(x, dtype=np.float32)
        flat = (x - ref if ref is not None else x).ravel()
        k = self.keep(flat.size)
        idx = np.argpartition(-np.abs(flat), k - 1)[:k] if k < flat.size else np.arange(k)
        idx = np.sort(idx).astype(np.uint32)
        return {"idx": idx, "val": flat[idx].astype(np.float32), "shape": _shape_part(x)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """A dense array with the kept entries (added to ``ref`` when known)."""
        shape = _shape(parts)
        out = np.zeros(int(np.prod(shape)), dtype=np.float32)
        out[parts["idx"].astype(np.int64)] = parts["val"]
        out = out.reshape(shape)
        return out + ref.astype(np.float32) if ref is not None else out


@CODECS.register("qsgd")
@dataclass(frozen=True)
class Qsgd:
    """QSGD: ``x ≈ ||x||₂ · sign(x) · ξ / s`` with ``ξ`` the seeded stochastic rounding of
    ``s |x| / ||x||₂`` (unbiased), ``s = levels``.

    Parameters
    ----------
    levels : int
        Quantisation levels ``s`` (1 to 127); the codes travel as int8.
    """

    levels: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= 127:
            raise ValueError(f"levels must be in [1, 127], got {self.levels}")

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """Signed levels (int8) and the norm (float32)."""
        x = np.asarray(x, dtype=np.float32)
        norm = float(np.linalg.norm(x.astype(np.float64)))
        if norm == 0.0:
            return {"q": np.zeros(x.shape, dtype=np.int8), "norm": np.zeros(1, np.float32)}
        scaled = np.abs(x.astype(np.float64)) / norm * self.levels
        low = np.floor(scaled)
        level = low + (rng.random(x.shape) < scaled - low)
        q = (np.sign(x) * level).astype(np.int8)
        return {"q": q, "norm": np.asarray([norm], dtype=np.float32)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """``norm · q / levels``."""
        return (float(parts["norm"][0]) * parts["q"].astype(np.float32)
                / self.levels).astype(np.float32)


def _rows(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1


@CODECS.register("logit_topk")
@dataclass(frozen=True)
class LogitTopK:
    """The ``k`` largest entries of each row of a 2-D payload (other arrays as fp32).

    Parameters
    ----------
    k : int
        Entries kept per row.
    """

    k: int = 3

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """Per row: column indices (uint16) and values of the ``k`` largest entries."""
        x = np.asarray(x, dtype=np.float32)
        if not _rows(x) or self.k >= x.shape[1]:
            return Fp32().encode(x, rng)
        idx = np.sort(np.argpartition(-x, self.k - 1, axis=1)[:, :self.k], axis=1)
        return {"idx": idx.astype(np.uint16), "val": np.take_along_axis(x, idx, axis=1),
                "shape": _shape_part(x)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """Kept entries in place; the rest at the row's smallest kept value."""
        if "v" in parts:
            return Fp32().decode(parts)
        val = parts["val"]
        out = np.repeat(val.min(axis=1, keepdims=True), _shape(parts)[1], axis=1)
        np.put_along_axis(out, parts["idx"].astype(np.int64), val, axis=1)
        return out.astype(np.float32)


@CODECS.register("soft_label")
@dataclass(frozen=True)
class SoftLabel:
    """CFD-style quantised soft labels: each row's softmax on ``2^bits - 1`` steps.

    Parameters
    ----------
    bits : int
        Bits per class probability (1 to 8).
    """

    bits: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in [1, 8], got {self.bits}")

    def encode(self, x: np.ndarray, rng: np.random.Generator,
               ref: np.ndarray | None = None) -> Parts:
        """``round(softmax(row) · (2^bits - 1))`` as uint8."""
        x = np.asarray(x, dtype=np.float32)
        if not _rows(x):
            return Fp32().encode(x, rng)
        z = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return {"p": np.rint(p * (2 ** self.bits - 1)).astype(np.uint8)}

    def decode(self, parts: Mapping[str, np.ndarray],
               ref: np.ndarray | None = None) -> np.ndarray:
        """Log of the quantised, renormalised probabilities (empty classes at log 1e-6)."""
        if "v" in parts:
            return Fp32().decode(parts)
        q = parts["p"].astype(np.float64)
        total = q.sum(axis=1, keepdims=True)
        p = np.where(total > 0, q / np.where(total > 0, total, 1), 1.0 / q.shape[1])
        return np.log(np.maximum(p, 1e-6)).astype(np.float32)


def make_codec(name: str, params: Mapping[str, Any] | None, path: str) -> Codec:
    """Instantiate the codec registered as ``name``; bad params name ``<path>.params``."""
    cls = CODECS.get(name, f"{path}.codec")
    params = dict(params or {})
    check_kwargs(cls, params, f"{path}.params")
    try:
        return cls(**params)
    except ValueError as exc:
        raise ScenarioError(f"{path}.params", params, str(exc)) from None
