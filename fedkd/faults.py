"""Failure injection as a Flower ClientApp mod: dropout and crashes, outside every strategy.

- ``clients.dropout``: a sampled client does not take part in the round (it fails before
  training, :class:`ClientDropout`);
- ``clients.crash``: a participant crashes while training: its work is lost and its reply
  is an error (:class:`ClientCrash`).

Both draw from the message's seed, round and client, so the same clients fail on every
engine and actor count. The round aggregates the other replies; the failures are counted in
``metrics.parquet`` (``failures``) and ``clients.parquet`` (``failed``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from fedkd.client import message_config, seed_for

#: Flower's error code for a ClientApp that raised (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``):
#: every failure fedkd reports as a reply (a raised handler, a lost worker, a straggler, a
#: reply past the budget) carries it.
ERROR_CODE_CLIENT = 3

#: Purposes of the random draws (kept apart from each other and from training's).
DROPOUT_DRAW, CRASH_DRAW = 2, 3


class ClientDropout(RuntimeError):
    """The scenario's failure model made a sampled client drop out of a round."""


class ClientCrash(RuntimeError):
    """The scenario's failure model made a participant crash while training."""


#: How the replies of failures the scenario asked for begin (a round in which every client
#: fails for one of these does not stop the run); stragglers come from :mod:`fedkd.clock`,
#: replies past a budget from :class:`fedkd.engine.runner.AccountingGrid`.
SIMULATED = ("ClientDropout:", "ClientCrash:", "Straggler:", "BudgetExceeded:")


def draw(config: ConfigRecord, cid: int, purpose: int) -> float:
    """A uniform number in [0, 1) for this message's seed, round, client and purpose."""
    seed = seed_for(int(config.get("seed", 0)), int(config.get("server-round", 0)), cid,
                    purpose)
    return float(np.random.default_rng(seed).random())


def fault_mod(msg: Message, context: Context,
              call_next: Callable[[Message, Context], Message]) -> Message:
    """Drop out before, or crash during, a train message, as its config asks."""
    kind = msg.metadata.message_type
    if not kind.startswith("train") or msg.has_error():
        return call_next(msg, context)
    config = message_config(msg)
    cid = int(context.node_config.get("partition-id", 0))
    rnd = int(config.get("server-round", 0))
    if draw(config, cid, DROPOUT_DRAW) < float(config.get("dropout", 0.0)):
        raise ClientDropout(f"client {cid} dropped out in round {rnd}")
    reply = call_next(msg, context)
    if draw(config, cid, CRASH_DRAW) < float(config.get("crash", 0.0)):
        raise ClientCrash(f"client {cid} crashed while training in round {rnd}")
    return reply
