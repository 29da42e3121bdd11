"""The Flower ClientApp every engine runs, and the registry of client-side functions.

One ``ClientApp`` serves every algorithm: its handlers are registered per Flower message type
(``"train"``, ``"train.fedgen"``, ``"query.hello"``, ...) with :func:`client_fn`, so a strategy
selects the client-side work by the message type it sends, exactly as in a plain Flower app.
The client finds its data through :class:`WorldSource` (the resolved scenario and the run
folder), built once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.data.base import TensorSplit
from fedkd.scenario import Scenario, TrainConfig, parse_scenario
from fedkd.state import ActorStateStore, StateStore
from fedkd.train import evaluate, keep_freed_memory, predict, scores, train_supervised
from fedkd.world import World, cached_world

ClientFn = Callable[[Message, "ClientEnv"], RecordDict]
CLIENT_FUNCS: dict[str, ClientFn] = {}


def client_fn(message_type: str) -> Callable[[ClientFn], ClientFn]:
    """Register the client-side handler of a Flower message type (``category[.action]``)."""

    def decorator(fn: ClientFn) -> ClientFn:
        CLIENT_FUNCS[message_type] = fn
        return fn

    return decorator


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from integers (scenario seed, round, client, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def train_config_record(cfg: TrainConfig, seed: int, dropout: float = 0.0,
                        crash: float = 0.0) -> ConfigRecord:
    """Local-training hyper-parameters as the ConfigRecord a strategy sends each round."""
    return ConfigRecord({
        "lr": cfg.lr, "momentum": cfg.momentum, "weight-decay": cfg.weight_decay,
        "epochs": cfg.epochs, "steps": cfg.steps or 0, "batch-size": cfg.batch_size,
        "seed": seed, "dropout": dropout, "crash": crash,
    })


def message_config(msg: Message) -> ConfigRecord:
    """The ``"config"`` record of an instruction message (empty when it has none).

    Looked up directly: ``RecordDict.config_records`` builds a filtered copy of every record
    on each access, which cost a few microseconds a message on the engines' hot path.
    """
    record = msg.content.get("config") if msg.has_content() else None
    return record if isinstance(record, ConfigRecord) else ConfigRecord()


def train_config_from(cfg: ConfigRecord) -> TrainConfig:
    """The inverse of :func:`train_config_record`."""
    steps = int(cfg.get("steps", 0))
    return TrainConfig(lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                       weight_decay=float(cfg["weight-decay"]), epochs=int(cfg["epochs"]),
                       steps=steps or None, batch_size=int(cfg["batch-size"]))


@dataclass(frozen=True)
class WorldSource:
    """How a client process finds the world: the resolved scenario and the run folder."""

    scenario_yaml: str
    run_dir: str
    threads: int = 1
    state_store: str = "disk"

    def scenario(self) -> Scenario:
        """The resolved scenario (validated by the driver before the run started)."""
        return parse_scenario(yaml.safe_load(self.scenario_yaml))

    def world(self) -> World:
        """The world, built once per process (which also pins torch's thread count and keeps
        freed tensor memory in the process, :func:`fedkd.train.keep_freed_memory`: this runs
        first in every process that serves clients, on every engine)."""
        world = _WORLDS.get(self.scenario_yaml)
        if world is None:
            torch.set_num_threads(self.threads)
            keep_freed_memory()
            world = _WORLDS[self.scenario_yaml] = cached_world(self.scenario())
        return world

    def store(self) -> StateStore | ActorStateStore:
        """The run's per-client state store (``engine.state_store``, :mod:`fedkd.state`),
        made once per process."""
        key = (self.state_store, self.run_dir)
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = (ActorStateStore(self.run_dir) if self.state_store == "actor"
                                    else StateStore(f"{self.run_dir}/state"))
        return store


_WORLDS: dict[str, World] = {}
_STORES: dict[tuple[str, str], StateStore | ActorStateStore] = {}


@dataclass(frozen=True)
class ClientEnv:
    """What a client-side handler sees: who it is, its data, the round's config."""

    cid: int
    world: World
    store: StateStore
    config: ConfigRecord

    @property
    def server_round(self) -> int:
        """The round this message belongs to."""
        return int(self.config.get("server-round", 0))

    @property
    def arch(self) -> str:
        """This client's model architecture."""
        return self.world.archs[self.cid]

    @cached_property
    def data(self) -> TensorSplit:
        """This client's private training data."""
        return self.world.client_data(self.cid)

    @property
    def local_test(self) -> TensorSplit:
        """This client's local test split (empty unless ``data.local_test_fraction > 0``)."""
        return self.world.local_test_data(self.cid)

    @property
    def device(self) -> torch.device:
        """Where this client trains: a GPU when the scenario gives clients GPUs and one exists."""
        gpus = self.world.scenario.engine.client_resources.num_gpus
        return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")

    def seed(self, purpose: int = 0) -> int:
        """Seed for this client, round and purpose."""
        return seed_for(int(self.config.get("seed", 0)), self.server_round, self.cid, purpose)

    def model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """This client's architecture loaded with ``state`` (a fresh seeded init if None)."""
        if state is None:
            return self.world.new_model(self.arch, seed=self.seed(1)).to(self.device)
        # one reusable model per architecture of this world (two worlds in one process may
        # give one architecture different input shapes)
        skeletons = self.world.__dict__.setdefault("_skeletons", {})
        if self.arch not in skeletons:
            skeletons[self.arch] = self.world.new_model(self.arch, seed=0).to(self.device)
        model = skeletons[self.arch]
        model.load_state_dict(state)
        return model

    def model_from(self, record: ArrayRecord) -> torch.nn.Module:
        """This client's architecture loaded with the arrays of a message."""
        return self.model(arrayrecord_to_state_dict(record))

    def private_model(self, key: str = "model") -> tuple[torch.nn.Module, bool]:
        """This client's persistent model and whether it existed (else a seeded fresh init).

        The init seed depends on the scenario seed and the client only, not on the round;
        with ``common-init`` in the config every client of an architecture starts from its
        group's global initial model (:meth:`fedkd.world.World.init_seed`), as decentralized
        SGD's peers do.
        """
        seed = (self.world.init_seed(self.arch) if int(self.config.get("common-init", 0))
                else seed_for(int(self.config.get("seed", 0)), self.cid, 7))
        model = self.world.new_model(self.arch, seed=seed).to(self.device)
        state = self.store.load(self.cid, key)
        if state is not None:
            model.load_state_dict(state)
        return model, state is not None

    def save_private(self, model: torch.nn.Module, key: str = "model") -> None:
        """Persist this client's model in the state store."""
        self.store.save(self.cid, key, model.state_dict())

    @property
    def train_config(self) -> TrainConfig:
        """Local-training hyper-parameters sent by the strategy."""
        return train_config_from(self.config)


def make_client_app(source: WorldSource, mods: Sequence[Any] = ()) -> ClientApp:
    """Build the ClientApp serving every registered client function.

    The handlers of a strategy exist once its module is imported:
    :func:`fedkd.compose.client_app` does that for the scenario's strategy.

    Parameters
    ----------
    source : WorldSource
        Where each process finds its world and state store.
    mods : Sequence
        Flower ClientApp mods wrapped around every handler (e.g. the wire's codecs).
    """
    app = ClientApp(mods=list(mods))

    def dispatch(msg: Message, context: Context) -> Message:
        kind = msg.metadata.message_type
        if kind not in CLIENT_FUNCS:
            raise ValueError(f"no client function for message type {kind!r}")
        env = ClientEnv(cid=int(context.node_config["partition-id"]), world=source.world(),
                        store=source.store(), config=message_config(msg))
        return Message(CLIENT_FUNCS[kind](msg, env), reply_to=msg)

    for kind in ("train", "evaluate", "query"):
        getattr(app, kind)()(dispatch)
    for kind in CLIENT_FUNCS:
        if "." in kind:
            category, action = kind.split(".", 1)
            getattr(app, category)(action)(dispatch)
    return app


@client_fn("query.hello")
def hello(msg: Message, env: ClientEnv) -> RecordDict:
    """Handshake: who this node is (partition id, architecture, data size, label counts)."""
    counts = env.world.counts[env.cid]
    return RecordDict({
        "metrics": MetricRecord({"partition-id": env.cid, "num-examples": len(env.data),
                                 "label-counts": [int(c) for c in counts]}),
        "info": ConfigRecord({"arch": env.arch}),
    })


@client_fn("query.ping")
def ping(msg: Message, env: ClientEnv) -> RecordDict:
    """Do nothing and reply with an empty record (engine health checks and benchmarks)."""
    return RecordDict()


def train_and_reply(model: torch.nn.Module, env: ClientEnv,
                    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    ) -> RecordDict:
    """Local SGD on this client's data (plus ``extra_loss``); the weights and metrics reply."""
    data = env.data
    result = train_supervised(model, data.x, data.y, env.train_config, seed=env.seed(),
                              extra_loss=extra_loss)
    return RecordDict({
        "arrays": state_dict_to_arrayrecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(data), "train-loss": result.loss}),
    })


@client_fn("train")
def train(msg: Message, env: ClientEnv) -> RecordDict:
    """FedAvg local update: load the received weights, run local SGD, send weights back."""
    return train_and_reply(env.model_from(msg.content.array_records["arrays"]), env)


def local_test_metrics(model: torch.nn.Module, env: ClientEnv) -> dict[str, float | int]:
    """``local-acc``, ``local-loss`` and ``local-num-examples`` of ``model`` on this client's
    local test split; empty when it has none."""
    local = env.local_test
    if len(local) == 0:
        return {}
    loss, acc = evaluate(model, local.x, local.y)
    return {"local-acc": acc, "local-loss": loss, "local-num-examples": len(local)}


@client_fn("evaluate.private")
def evaluate_private(msg: Message, env: ClientEnv) -> RecordDict:
    """Evaluate this client's persistent model (``state-key``) on the global test set
    (``eval-acc``, ``eval-loss``) and, when it holds one, on its local test split
    (``local-acc``, ``local-loss``, ``local-num-examples``); with ``test-predictions`` in the
    config also its predicted class of every test sample (``test-pred``, a measurement for
    the peers' consensus: metrics, not arrays, so no byte is counted)."""
    model, _ = env.private_model(str(env.config.get("state-key", "model")))
    test = env.world.data.test
    logits = predict(model, test.x)
    loss, acc = scores(logits, test.y)
    extra = ({"test-pred": logits.argmax(1).tolist()}
             if int(env.config.get("test-predictions", 0)) else {})
    return RecordDict({"metrics": MetricRecord({"num-examples": len(test), "eval-loss": loss,
                                                "eval-acc": acc, **extra,
                                                **local_test_metrics(model, env)})})


@client_fn("evaluate")
def evaluate_local(msg: Message, env: ClientEnv) -> RecordDict:
    """Evaluate the received weights on this client's local test split, or on its training
    data when it has none (``data.local_test_fraction`` 0)."""
    model = env.model_from(msg.content.array_records["arrays"])
    data = env.local_test if len(env.local_test) else env.data
    loss, acc = evaluate(model, data.x, data.y)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(data),
                                                "eval-loss": loss, "eval-acc": acc})})
