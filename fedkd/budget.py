"""Communication budgets, as a wrapper around any strategy (the shape of Flower's DP wrappers).

``comm.budget.round_mb`` caps one round's bytes, down and up together; ``total_mb`` caps the
run. Before a round's messages leave, the wrapper prices them: the exact encoded bytes of
what the server sends (the grid encodes them for the wire first) plus an estimate of the
replies, the largest reply each node sent for that message type so far or, before any, the
request's own arrays encoded with ``comm.up`` (a reply that mirrors its request, as weights
do). Then:

- ``policy: stop`` ends the run cleanly, with ``summary.json`` status ``budget_exhausted``,
  when the next round cannot fit;
- ``policy: sample_fewer`` drops a seeded random subset of the round's messages until the
  rest fits (``budget_dropped`` in ``metrics.parquet``), and stops when not even one fits.

Peers on a graph (:mod:`strategies.peers`: ``peer_kd``, ``dpsgd``) are held to the budget
over the graph's edges instead (``edges.parquet``), the bytes a decentralized deployment
would pay; the relay's own messages are not budgeted. Before a round's first message the
strategy prices each link between sampled neighbours and :meth:`Budgeted.fit_edges` keeps
the links that fit (``sample_fewer``: a seeded random subset, ``budget_dropped`` counts the
dropped links) or ends the run (``stop``). A link's price is both senders' payload: their
largest encoded upload so far, before any the float32 size.

Evaluation messages that do not fit are skipped. The estimate is exact for strategies whose
replies mirror their requests (FedAvg and the weight-sharing family) and for any strategy
from its second round on when its replies keep their size. Where a reply is larger than
estimated, the message layer enforces the budget: a reply that would pass it is dropped as if
its client had been told not to upload (an error reply ``BudgetExceeded``, not counted), so a
run never sends more than its budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd.comm import message_bytes

MB = 1e6


class BudgetExhausted(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """The next round does not fit the budget: the run ends cleanly."""


class Budgeted(Strategy):
    """Any strategy, held to a communication budget.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy; everything the budget does not change is delegated to it.
    round_mb, total_mb : float, optional
        Caps of one round and of the run, in MB (10^6 bytes); None: no cap.
    policy : str
        ``"stop"`` or ``"sample_fewer"``.
    seed : int
        Seeds which messages ``sample_fewer`` drops.
    on_edges : bool
        Budget the bytes over a graph's edges (peers on a graph set this): the strategy asks
        :meth:`fit_edges` which of a round's links fit; its messages pass unpriced.
    """

    def __init__(self, strategy: Strategy, round_mb: float | None, total_mb: float | None,
                 policy: str = "stop", seed: int = 0, on_edges: bool = False) -> None:
        if policy not in ("stop", "sample_fewer"):
            raise ValueError(f"policy must be 'stop' or 'sample_fewer', got {policy!r}")
        self.strategy = strategy
        self.round_cap = None if round_mb is None else round_mb * MB
        self.total_cap = None if total_mb is None else total_mb * MB
        self.policy = policy
        self.seed = seed
        self.spent_round = 0
        self.dropped: dict[int, int] = {}
        self.on_edges = on_edges
        self.edge_spent = 0
        if on_edges:
            strategy.edge_budget = self.fit_edges  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the wrapper lacks: node(), teacher_log, bind, ...
        inner = self.__dict__.get("strategy")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # ------------------------------------------------------------------ accounting
    @staticmethod
    def spent(grid: Grid) -> int:
        """Bytes the run has sent so far (fedkd's AccountingGrid keeps the count)."""
        return int(getattr(grid, "spent", 0))

    def left(self, grid: Grid | None) -> float:
        """Bytes left in the run (inf without a total cap)."""
        if self.total_cap is None:
            return float("inf")
        spent = self.edge_spent if self.on_edges else self.spent(grid)  # type: ignore[arg-type]
        return self.total_cap - spent

    def room(self, grid: Grid | None) -> float:
        """Bytes this round may still spend (run cap and round cap)."""
        room = self.left(grid)
        if self.round_cap is not None:
            room = min(room, self.round_cap - self.spent_round)
        return room

    def choose(self, server_round: int, prices: Sequence[int], room: float,
               what: str) -> list[int]:
        """Indices of the priced items that fit ``room`` (all, a seeded subset, or
        :class:`BudgetExhausted` by the policy)."""
        if sum(prices) <= room:
            return list(range(len(prices)))
        if self.policy == "stop":
            raise BudgetExhausted(f"round {server_round} needs {sum(prices) / MB:.3f} MB; "
                                  f"{max(room, 0) / MB:.3f} MB left")
        order = np.random.default_rng([self.seed, server_round, 99]).permutation(len(prices))
        keep: list[int] = []
        total = 0
        for i in order:
            if total + prices[i] <= room:
                keep.append(int(i))
                total += prices[i]
        if not keep:
            raise BudgetExhausted(f"round {server_round}: not one {what} fits the "
                                  f"{max(room, 0) / MB:.3f} MB left")
        self.dropped[server_round] = len(prices) - len(keep)
        return sorted(keep)

    def fit_edges(self, server_round: int, prices: list[int]) -> list[int]:
        """The links of a round's graph that fit the budget (indices into ``prices``, each a
        link's bytes both ways); spends them."""
        self.spent_round = 0
        keep = self.choose(server_round, prices, self.room(None), "link")
        spent = sum(prices[i] for i in keep)
        self.spent_round += spent
        self.edge_spent += spent
        return keep

    def price(self, msgs: list[Message], grid: Grid) -> list[int]:
        """Bytes of each message and its expected reply (encoding the messages for the wire)."""
        encode = getattr(grid, "encode", None)
        if encode is not None:
            msgs[:] = encode(msgs)
        seen = getattr(grid, "reply_sizes", {})
        estimate = getattr(grid, "reply_estimate", lambda m: message_bytes(m.content))
        prices = []
        for m in msgs:
            up = seen.get((m.metadata.message_type, m.metadata.dst_node_id))
            prices.append(message_bytes(m.content) + (estimate(m) if up is None else up))
        return prices

    def fit(self, server_round: int, msgs: list[Message], grid: Grid,
            optional: bool) -> list[Message]:
        """The messages that fit the budget (all, some, or none)."""
        if not msgs or self.on_edges:
            return msgs
        prices = self.price(msgs, grid)
        room = self.room(grid)
        set_limit = getattr(grid, "set_limit", None)
        if set_limit is not None:  # the message layer drops a reply that would pass it
            set_limit(self.spent(grid) + room)
        if sum(prices) <= room:
            self.spent_round += sum(prices)
            return msgs
        if optional:
            return []
        keep = self.choose(server_round, prices, room, "client")
        self.spent_round += sum(prices[i] for i in keep)
        return [msgs[i] for i in keep]

    # ------------------------------------------------------------------ Strategy hooks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The inner strategy's messages that fit the budget."""
        if not self.on_edges:  # on a graph, fit_edges starts the round
            self.spent_round = 0
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self.fit(server_round, msgs, grid, optional=False)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The inner strategy's evaluation messages, or none if they do not fit."""
        msgs = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        return self.fit(server_round, msgs, grid, optional=True)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Delegate."""
        self.strategy.summary()

    def round_metrics(self, server_round: int, grid: Grid) -> dict[str, float]:
        """``budget_left_mb`` (and ``budget_dropped``) after a round."""
        out = {"budget_left_mb": self.left(grid) / MB}
        if self.policy == "sample_fewer":
            out["budget_dropped"] = float(self.dropped.get(server_round, 0))
        return out
