"""``engine.batched``: a worker's plain FedAvg train messages of one architecture, trained
together.

A worker (the inline engine's process, or one Ray actor for the messages of its batch) first
picks the messages that :func:`fedkd.client.train` would answer, groups them by architecture,
training config and device, and trains each group of two or more with
:func:`fedkd.batched.train_batched`. Then every message of the batch goes through the ClientApp
in order as usual, except that a picked message meets a handler that hands back its prepared
reply (the one :func:`fedkd.client.train_and_reply` builds: ``arrays``, ``num-examples``,
``train-loss``) instead of training. The scenario's ClientApp mods wrap that handler as they
wrap every other, so failure injection and the wire's codecs act exactly as one by one: a
client that drops out still replies with its dropout (its prepared update is discarded), a
crash loses the update, an uplink codec encodes the prepared weights, and a client whose
training diverges replies with the ``FloatingPointError`` it raises one by one.

Everything else runs one by one: other message types (``"train.<action>"`` of other
algorithms, evaluation, queries), a ``"train"`` whose handler a strategy module replaced, a
group of one, and an architecture :func:`fedkd.batched.unbatchable` refuses (BatchNorm,
dropout, buffers) or whose batched step raises (an operation ``torch.func.vmap`` does not
support); such an architecture is logged once and not tried again. The Flower engine
(``engine.name: flower``) hands the ClientApp one message at a time, so it rejects
``engine.batched`` (:func:`fedkd.compose.prepare`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd import client
from fedkd.batched import train_batched, unbatchable
from fedkd.client import ClientEnv, WorldSource
from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.compose import client_mods
from fedkd.scenario import TrainConfig
from fedkd.wire import make_wire

LOG = logging.getLogger("fedkd")

#: What answers a message in a worker: a ClientApp, or the app :meth:`BatchedTrain.prepare`
#: returns.
AppLike = Callable[[Message, Context], Message]


class BatchedTrain:
    """Trains a worker's plain ``"train"`` messages per architecture in one vectorised call.

    Parameters
    ----------
    app : ClientApp
        The run's ClientApp (:func:`fedkd.compose.client_app`), for every other message.
    source : WorldSource
        Where the worker finds its world, state store and scenario.
    """

    def __init__(self, app: AppLike, source: WorldSource) -> None:
        self.app = app
        self.source = source
        scn = source.scenario()
        self.wire = make_wire(scn.comm, scn.seed)
        self.group = scn.engine.batched_group
        self.refused: dict[str, str] = {}
        self._skeletons: dict[tuple[str, str], torch.nn.Module] = {}
        self._ready: dict[int, RecordDict | Exception] = {}
        self._next: RecordDict | Exception | None = None
        self.replay = ClientApp(mods=client_mods(source))
        self.replay.train()(self._hand_back)

    def prepare(self, batch: Sequence[tuple[int, Message]]) -> AppLike:
        """Train the batch's plain train messages together; the app that answers the batch.

        Parameters
        ----------
        batch : Sequence[tuple[int, Message]]
            ``(partition id, message)`` pairs, as :func:`fedkd.engine.inline.run_batch` takes.

        Returns
        -------
        Callable
            A ClientApp stand-in: prepared messages get their prepared reply through the
            run's mods, every other message goes to the run's ClientApp.
        """
        self._ready = {}
        groups: dict[tuple[str, TrainConfig, str], list[tuple[ClientEnv, Message]]] = {}
        for cid, msg in batch:
            env = self._env(cid, msg)
            if env is None:
                continue
            try:
                key = (env.arch, env.train_config, str(env.device))
            except Exception:  # noqa: BLE001 - a bad config: one by one replies with the error
                continue
            groups.setdefault(key, []).append((env, msg))
        for (arch, cfg, _), group in groups.items():
            if len(group) > 1 and arch not in self.refused:
                self._train(arch, cfg, group)
        return self._answer

    # ------------------------------------------------------------------ helpers
    def _env(self, cid: int, msg: Message) -> ClientEnv | None:
        """The client's view of ``msg`` when the plain train handler would answer it."""
        if (msg.metadata.message_type != "train" or msg.has_error()
                or client.CLIENT_FUNCS.get("train") is not client.train
                or "arrays" not in msg.content.array_records):
            return None
        return ClientEnv(cid=cid, world=self.source.world(), store=self.source.store(),
                         config=client.message_config(msg))

    def _skeleton(self, env: ClientEnv) -> torch.nn.Module | None:
        """A model of the client's architecture on its device (None when it cannot batch)."""
        key = (env.arch, str(env.device))
        if key not in self._skeletons:
            model = env.world.new_model(env.arch, seed=0).to(env.device)
            reason = unbatchable(model)
            if reason is not None:
                self._refuse(env.arch, reason)
                return None
            self._skeletons[key] = model
        return self._skeletons[key]

    def _refuse(self, arch: str, reason: str) -> None:
        self.refused[arch] = reason
        LOG.warning("engine.batched: %s trains one client at a time (%s)", arch, reason)

    def _train(self, arch: str, cfg: TrainConfig, group: list[tuple[ClientEnv, Message]],
               ) -> None:
        """Train one group and keep each message's reply (or error) for :meth:`_answer`."""
        envs = [env for env, _ in group]
        msgs = [msg for _, msg in group]
        model = self._skeleton(envs[0])
        if model is None:
            return
        states: dict[int, dict[str, torch.Tensor]] = {}
        for msg in msgs:  # the clients of a group usually share one content: decode it once
            if id(msg.content) not in states:
                content = self.wire.decode(msg.content, self.wire.down)
                states[id(msg.content)] = arrayrecord_to_state_dict(
                    content.array_records["arrays"])
        datas = [(e.data.x, e.data.y) for e in envs]
        try:
            outcomes = train_batched(model, [states[id(m.content)] for m in msgs], datas, cfg,
                                     [e.seed() for e in envs], group=self.group)
        except Exception as exc:  # noqa: BLE001 - an unsupported op: one by one from now on
            self._refuse(arch, f"{type(exc).__name__}: {exc}")
            return
        for env, msg, outcome in zip(envs, msgs, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._ready[id(msg)] = outcome
                continue
            state, result = outcome
            self._ready[id(msg)] = RecordDict({
                "arrays": state_dict_to_arrayrecord(state),
                "metrics": MetricRecord({"num-examples": len(env.data),
                                         "train-loss": result.loss}),
            })

    def _answer(self, msg: Message, context: Context) -> Message:
        """Answer ``msg``: its prepared reply through the run's mods, else the ClientApp."""
        prepared = self._ready.pop(id(msg), None)
        if prepared is None:
            return self.app(msg, context)
        self._next = prepared
        return self.replay(msg, context)

    def _hand_back(self, msg: Message, context: Any) -> Message:
        """The replay app's train handler: the prepared reply, or the prepared error."""
        prepared, self._next = self._next, None
        if isinstance(prepared, Exception):
            raise prepared
        assert prepared is not None
        return Message(prepared, reply_to=msg)
