"""The wire: what a message's arrays look like while they cross the network.

The scenario's ``comm.down`` codec encodes what the server sends and ``comm.up`` what the
clients send back (:mod:`fedkd.codecs`). Both halves live in the message layer, outside every
strategy:

- server side, :class:`fedkd.engine.runner.AccountingGrid` encodes each outgoing message
  (a content shared by several messages once), counts the encoded bytes, and decodes the
  replies;
- client side, :func:`wire_mod` is a Flower ClientApp mod that decodes the incoming message
  before the handler runs and encodes the reply after it.

An encoded float array ``key`` travels as the arrays ``key::<part>`` of the same record;
integer arrays travel unchanged. An upload whose record and key answer a download of the
same shape (uploaded weights) is encoded against the decoded download (``ref``): top-k then
sparsifies the update, and with ``error_feedback`` the client keeps what it left out in its
state store and adds it to its next upload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedkd.codecs import Codec, Fp32, make_codec
from fedkd.comm import as_numpy
from fedkd.state import StateStore

SEP = "::"
#: Refs of one message: (record name, key) -> the decoded array the receiver holds.
Refs = dict[tuple[str, str], np.ndarray]
DOWN, UP = 1, 2


def _is_float(arr: Array) -> bool:
    return np.dtype(arr.dtype).kind == "f"


@dataclass(frozen=True)
class Wire:
    """The codecs of both directions and the seed of their random choices.

    Parameters
    ----------
    down, up : Codec
        Codecs of server-to-client and client-to-server arrays.
    seed : int
        The scenario seed (stochastic codecs draw from ``[seed, round, direction, node, i]``).
    """

    down: Codec
    up: Codec
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether any direction changes the arrays."""
        return not (isinstance(self.down, Fp32) and isinstance(self.up, Fp32))

    def rng(self, server_round: int, direction: int, node: int, index: int) -> np.random.Generator:
        """The generator of one array's stochastic encoding."""
        return np.random.default_rng([self.seed, server_round, direction, node, index])

    def encode(self, content: RecordDict, codec: Codec, server_round: int, direction: int,
               node: int, refs: Refs | None = None,
               residuals: dict[str, np.ndarray] | None = None) -> RecordDict:
        """A copy of ``content`` whose float arrays are encoded with ``codec``.

        ``residuals`` (``"<record>/<key>" -> array``), when given, is added to each array
        before encoding and updated in place with what the encoding left out.
        """
        if isinstance(codec, Fp32):
            return content
        out = RecordDict()
        index = 0
        for name, record in content.items():
            if not isinstance(record, ArrayRecord):
                out[name] = record
                continue
            arrays: dict[str, Array] = {}
            for key, arr in record.items():
                if not _is_float(arr):
                    arrays[key] = arr
                    continue
                x = as_numpy(arr).astype(np.float32, copy=False)
                slot = f"{name}/{key}"
                if residuals is not None and slot in residuals:
                    x = x + residuals[slot]
                ref = _ref(refs, name, key, x)
                parts = codec.encode(x, self.rng(server_round, direction, node, index), ref)
                index += 1
                if residuals is not None:
                    residuals[slot] = x - codec.decode(parts, ref)
                arrays.update({f"{key}{SEP}{p}": Array(np.ascontiguousarray(v))
                               for p, v in parts.items()})
            out[name] = ArrayRecord(arrays)
        return out

    def decode(self, content: RecordDict, codec: Codec, refs: Refs | None = None) -> RecordDict:
        """A copy of ``content`` with every encoded array decoded (float32)."""
        if isinstance(codec, Fp32):
            return content
        out = RecordDict()
        for name, record in content.items():
            if not isinstance(record, ArrayRecord):
                out[name] = record
                continue
            parts: dict[str, dict[str, np.ndarray]] = {}
            arrays: dict[str, Array] = {}
            for key, arr in record.items():
                if SEP in key:
                    base, part = key.split(SEP, 1)
                    parts.setdefault(base, {})[part] = as_numpy(arr)
                    arrays.setdefault(base, arr)  # keeps the key order
                else:
                    arrays[key] = arr
            for base, p in parts.items():
                ref = refs.get((name, base)) if refs else None
                arrays[base] = Array(codec.decode(p, ref))
            out[name] = ArrayRecord(arrays)
        return out


def _ref(refs: Refs | None, name: str, key: str, x: np.ndarray) -> np.ndarray | None:
    ref = refs.get((name, key)) if refs else None
    return ref if ref is not None and ref.shape == x.shape else None


def float_refs(content: RecordDict) -> Refs:
    """The float arrays of a (decoded) content, as refs for encoding its reply."""
    return {(name, key): as_numpy(arr) for name, record in content.array_records.items()
            for key, arr in record.items() if _is_float(arr)}


def server_round_of(msg: Message) -> int:
    """The round a message belongs to (its group id, as fedkd's strategies set it)."""
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def wire_mod(wire: Wire, store: Callable[[], StateStore]) -> Callable[..., Message]:
    """The client half of the wire as a Flower ClientApp mod.

    Decodes the incoming message (``comm.down``), runs the handler, and encodes its reply
    (``comm.up``) against the decoded download, with error feedback kept in the client's
    state store when the up codec asks for it.
    """

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message],
            ) -> Message:
        if msg.has_error():
            return call_next(msg, context)
        content = wire.decode(msg.content, wire.down)
        msg.content = content
        reply = call_next(msg, context)
        if reply.has_error() or isinstance(wire.up, Fp32):
            return reply
        cid = int(context.node_config.get("partition-id", 0))
        feedback = bool(getattr(wire.up, "error_feedback", False))
        residuals = _load_residuals(store(), cid) if feedback else None
        reply.content = wire.encode(reply.content, wire.up, server_round_of(msg), UP, cid,
                                    refs=float_refs(content), residuals=residuals)
        if residuals is not None:
            store().save(cid, "wire-residual",
                         {k: torch.from_numpy(v) for k, v in residuals.items()})
        return reply

    return mod


def _load_residuals(store: StateStore, cid: int) -> dict[str, np.ndarray]:
    state = store.load(cid, "wire-residual")
    return {} if state is None else {k: v.numpy() for k, v in state.items()}


def make_wire(comm: Any, seed: int) -> Wire:
    """The wire of a scenario's ``comm`` block (codecs validated with their key paths)."""
    return Wire(down=make_codec(comm.down.codec, comm.down.params, "comm.down"),
                up=make_codec(comm.up.codec, comm.up.params, "comm.up"), seed=seed)


def encode_cached(wire: Wire, msgs: list[Message],
                  ) -> tuple[list[Message], dict[int, Refs]]:
    """Encode outgoing messages with ``comm.down``; a content shared by several messages is
    encoded once. Returns the messages and, per destination node, the refs its reply is
    decoded against (the decoded download)."""
    encoded: dict[int, tuple[RecordDict, Refs]] = {}
    refs: dict[int, Refs] = {}
    originals = [m.content for m in msgs]  # alive while ids key the cache
    for m in msgs:
        key = id(m.content)
        if key not in encoded:
            enc = wire.encode(m.content, wire.down, server_round_of(m), DOWN, 0)
            encoded[key] = (enc, float_refs(wire.decode(enc, wire.down)))
        enc, ref = encoded[key]
        refs[m.metadata.dst_node_id] = ref
        m.content = enc
    del originals
    return msgs, refs


def decode_replies(wire: Wire, replies: list[Message], refs: Mapping[int, Refs],
                   ) -> list[Message]:
    """Decode replies with ``comm.up`` against what each node was sent."""
    for r in replies:
        if not r.has_error():
            r.content = wire.decode(r.content, wire.up, refs.get(r.metadata.src_node_id))
    return replies
