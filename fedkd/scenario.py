"""Scenario: the YAML a researcher writes, parsed once into frozen dataclasses.

Every field is typed; the parser checks unknown keys, types and ranges and raises a
:class:`~fedkd.errors.ScenarioError` naming the key path, the bad value and what is allowed.
``--set a.b.c=value`` overrides are applied to the raw mapping before parsing, with the value
typed by YAML (``0.1`` is a float, ``true`` a bool, ``[1, 2]`` a list).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedkd.errors import ScenarioError


def _check(pred: Callable[[Any], bool], allowed: str) -> dict[str, Any]:
    """Field metadata: a range check and its description."""
    return {"check": (pred, allowed)}


def _positive(v: float) -> bool:
    return v > 0


def _fraction(v: float) -> bool:
    return 0 < v <= 1


def _unit_interval(v: float) -> bool:
    return 0 <= v < 1


@dataclass(frozen=True)
class PublicConfig:
    """Public / proxy data for distillation (a held-out part of train, or another dataset)."""

    fraction: float = field(default=0.0, metadata=_check(_unit_interval, "a number in [0, 1)"))
    labeled: bool = False
    dataset: str | None = None
    size: int | None = field(default=None, metadata=_check(_positive, "an integer > 0"))


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives and how the train set is split.

    ``val_fraction`` is the server's labeled validation split (FedDF early-stops on it);
    ``weight_fraction`` a second labeled server split, disjoint from it, on which label-using
    teacher weightings (``validation``, ``learned``) fit (0: they fit on the validation
    split); ``local_test_fraction`` the share of every client's data held out as its local
    test split (drawn from the client's own distribution, never trained on; 0: none).
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = field(default=0.0, metadata=_check(_unit_interval, "a number in [0, 1)"))
    weight_fraction: float = field(default=0.0,
                                   metadata=_check(_unit_interval, "a number in [0, 1)"))
    local_test_fraction: float = field(default=0.0,
                                       metadata=_check(_unit_interval, "a number in [0, 1)"))
    public: PublicConfig = PublicConfig()
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionConfig:
    """How the client pool is split across clients (a registered partitioner and its params)."""

    name: str = "dirichlet"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model family and the fraction of clients that run it."""

    arch: str = "cnn_small"
    fraction: float = field(default=1.0, metadata=_check(_fraction, "a number in (0, 1]"))
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Local training: SGD with momentum and weight decay, for epochs or a fixed step count."""

    lr: float = field(default=0.05, metadata=_check(_positive, "a number > 0"))
    momentum: float = field(default=0.9, metadata=_check(_unit_interval, "a number in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=_check(lambda v: v >= 0, "a number >= 0"))
    epochs: int = field(default=1, metadata=_check(_positive, "an integer > 0"))
    steps: int | None = field(default=None, metadata=_check(_positive, "an integer > 0"))
    batch_size: int = field(default=32, metadata=_check(_positive, "an integer > 0"))


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of device: its share of clients, compute speed, bandwidths and availability."""

    name: str = "device"
    fraction: float = field(default=1.0, metadata=_check(_fraction, "a number in (0, 1]"))
    gflops: float = field(default=10.0, metadata=_check(_positive, "a number > 0"))
    up_mbps: float = field(default=10.0, metadata=_check(_positive, "a number > 0"))
    down_mbps: float = field(default=50.0, metadata=_check(_positive, "a number > 0"))
    availability: float = field(default=1.0, metadata=_check(_fraction, "a number in (0, 1]"))


@dataclass(frozen=True)
class DevicesConfig:
    """Device profiles assigned to clients by fraction, and an optional availability trace."""

    profiles: tuple[DeviceProfile, ...] = (DeviceProfile(),)
    trace: str | None = None


@dataclass(frozen=True)
class ClientsConfig:
    """The client population: how many, who takes part, which models, how they train."""

    num: int = field(default=10, metadata=_check(_positive, "an integer > 0"))
    fraction: float = field(default=1.0, metadata=_check(_fraction, "a number in (0, 1]"))
    min_clients: int = field(default=1, metadata=_check(_positive, "an integer > 0"))
    models: tuple[ModelSpec, ...] = (ModelSpec(),)
    train: TrainConfig = TrainConfig()
    dropout: float = field(default=0.0, metadata=_check(_unit_interval, "a number in [0, 1)"))
    crash: float = field(default=0.0, metadata=_check(_unit_interval, "a number in [0, 1)"))
    devices: DevicesConfig | None = None
    deadline_s: float | None = field(default=None, metadata=_check(_positive, "a number > 0"))


@dataclass(frozen=True)
class StrategyConfig:
    """The algorithm: a registered strategy name and its constructor keyword arguments."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """Ray resources of one client actor."""

    num_cpus: float = field(default=1.0, metadata=_check(_positive, "a number > 0"))
    num_gpus: float = field(default=0.0, metadata=_check(lambda v: v >= 0, "a number >= 0"))


@dataclass(frozen=True)
class EngineConfig:
    """Which runtime executes the clients and with how many workers.

    ``start_timeout`` is how many seconds the client actors may take to be placed and
    started before the run stops with an error naming ``engine.client_resources``.
    """

    name: Literal["ray", "flower", "inline"] = "ray"
    actors: int = field(default=0, metadata=_check(lambda v: v >= 0, "an integer >= 0"))
    client_resources: Resources = Resources()
    ray_address: str | None = None
    threads: int = field(default=1, metadata=_check(_positive, "an integer > 0"))
    start_timeout: float = field(default=300.0, metadata=_check(_positive, "a number > 0"))
    #: Where clients keep state between rounds (:mod:`fedkd.state`): ``disk`` (the run folder)
    #: or ``actor`` (a Ray actor and the object store: no shared filesystem on a cluster).
    state_store: Literal["disk", "actor"] = "disk"
    #: Train the plain FedAvg ``"train"`` messages of one architecture that a worker holds
    #: in one vectorised step (:mod:`fedkd.engine.batching`; engines ``inline`` and ``ray``).
    batched: bool = False
    #: Most clients in one vectorised step; 0: all of a worker's on a GPU, 16 on the CPU
    #: (:func:`fedkd.batched.train_batched`).
    batched_group: int = field(default=0, metadata=_check(lambda v: v >= 0, "an integer >= 0"))


@dataclass(frozen=True)
class ServerConfig:
    """Server-side work: evaluation batch size, torch threads (0 = all), teacher actors,
    whether teacher ensembles are diagnosed each round (:mod:`fedkd.diagnostics`), and the
    device of server-side models (teacher ensembles, distillation students, FedFTG's
    generator): ``cpu``, ``cuda`` or ``auto`` (CUDA when there is one)."""

    device: str = field(default="cpu", metadata=_check(lambda v: v in ("cpu", "cuda", "auto"),
                                                       "cpu, cuda or auto"))
    #: Rows per forward pass of the central evaluation on a GPU; on the CPU at most
    #: :data:`fedkd.train.CPU_PREDICT_ROWS` (cache-sized, the same logits).
    eval_batch_size: int = field(default=1024, metadata=_check(_positive, "an integer > 0"))
    threads: int = field(default=0, metadata=_check(lambda v: v >= 0, "an integer >= 0"))
    teacher_actors: int = field(default=0, metadata=_check(lambda v: v >= 0, "an integer >= 0"))
    teacher_diagnostics: bool = True


@dataclass(frozen=True)
class CodecConfig:
    """A registered codec (``fedkd list``) and its params, for one direction."""

    codec: str = "fp32"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetConfig:
    """Communication budget: MB (10^6 bytes) per round and per run, and what to do at it."""

    round_mb: float | None = field(default=None, metadata=_check(_positive, "a number > 0"))
    total_mb: float | None = field(default=None, metadata=_check(_positive, "a number > 0"))
    policy: Literal["stop", "sample_fewer"] = "stop"


@dataclass(frozen=True)
class CommConfig:
    """What crosses the network: the codec of each direction and the budget."""

    down: CodecConfig = CodecConfig()
    up: CodecConfig = CodecConfig()
    budget: BudgetConfig = BudgetConfig()


@dataclass(frozen=True)
class OutputConfig:
    """Where runs are written, and the optional experiment trackers beside their Parquet
    records (:mod:`fedkd.trackers`): TensorBoard event files in ``<run>/tensorboard/`` (the
    ``tensorboard`` extra) and an MLflow tracking URI (the ``mlflow`` extra)."""

    dir: str = "runs"
    tensorboard: bool = False
    mlflow_uri: str | None = field(default=None, metadata=_check(
        lambda v: bool(v.strip()), "null or a tracking URI, e.g. http://127.0.0.1:5000 or "
        "sqlite:///mlflow.db"))


@dataclass(frozen=True)
class SweepConfig:
    """Default grid and seeds of ``fedkd sweep`` for this scenario."""

    grid: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scenario:
    """A whole simulation, parsed from YAML."""

    name: str = "scenario"
    seed: int = field(default=0, metadata=_check(lambda v: v >= 0, "an integer >= 0"))
    rounds: int = field(default=10, metadata=_check(_positive, "an integer > 0"))
    eval_every: int = field(default=1, metadata=_check(_positive, "an integer > 0"))
    checkpoint_every: int = field(default=0, metadata=_check(lambda v: v >= 0,
                                                             "an integer >= 0 (0: off)"))
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    clients: ClientsConfig = ClientsConfig()
    strategy: StrategyConfig = StrategyConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    comm: CommConfig = CommConfig()
    output: OutputConfig = OutputConfig()
    sweep: SweepConfig = SweepConfig()


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        blocks = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(blocks) == 1:  # an optional block: its errors
            return _coerce(blocks[0], value, path)
        for arg in args:
            try:
                return _coerce(arg, value, path)
            except ScenarioError:
                continue
        raise ScenarioError(path, value, _type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ScenarioError(path, value, _type_name(tp))
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ScenarioError(path, value, "null")
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ScenarioError(path, value, _type_name(tp))
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{path}.{i}") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ScenarioError(path, value, "a mapping")
        return dict(value)
    accepts = _SCALARS.get(tp)
    if accepts is not None and accepts(value):
        return float(value) if tp is float else value
    raise ScenarioError(path, value, _type_name(tp))


def parse_dataclass(cls: type, raw: Any, path: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a raw mapping, checking keys, types and ranges.

    Parameters
    ----------
    cls : type
        A dataclass type.
    raw : Any
        The mapping read from YAML (``None`` means all defaults).
    path : str
        Key path of ``raw`` in the scenario, for error messages.
    """
    raw = {} if raw is None else raw
    where = path or "scenario"
    if not isinstance(raw, Mapping):
        raise ScenarioError(where, raw, "a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ScenarioError(f"{path}.{key}" if path else str(key), raw[key],
                                f"a known key: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key_path = f"{path}.{name}" if path else name
        value = _coerce(hints[name], raw[name], key_path)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ScenarioError(key_path, raw[name], check[1])
        values[name] = value
    return cls(**values)


def check_kwargs(fn: Callable[..., Any], params: Mapping[str, Any], path: str,
                 skip: Sequence[str] = ()) -> None:
    """Check that ``params`` are keyword arguments ``fn`` accepts, with the annotated types.

    Parameters
    ----------
    fn : Callable
        A registered component (function or class).
    params : Mapping
        Keyword arguments from YAML.
    path : str
        Key path of ``params``, e.g. ``strategy.params``.
    skip : Sequence[str]
        Arguments the framework passes itself (not settable from YAML).
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n, p in sig.parameters.items()
               if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is not p.empty and n not in skip]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations only disable type checks
        hints = {}
    for key, value in params.items():
        if key not in allowed:
            if accepts_any and key not in skip:
                continue
            raise ScenarioError(f"{path}.{key}", value, f"a known key: {sorted(allowed)}")
        if key in hints:
            _coerce(hints[key], value, f"{path}.{key}")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw scenario mapping, in place.

    Raises
    ------
    ScenarioError
        If the assignment has no ``=`` or walks through a value that is not a mapping/list.
    """
    if "=" not in assignment:
        raise ScenarioError("--set", assignment, "KEY.PATH=VALUE")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ScenarioError(f"--set {key}", text, "a YAML value") from None
    except RecursionError:
        raise ScenarioError(f"--set {key}", None, f"YAML nested at most {MAX_DEPTH} levels deep",
                            shown="a value nested too deep to read") from None
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ScenarioError(here, part, f"an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ScenarioError(".".join(parts[:i]), node, "a mapping to set keys in")
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


#: Deepest nesting a scenario may have (the real schema needs 5 levels; YAML nested thousands
#: of levels deep would otherwise exhaust Python's recursion limit).
MAX_DEPTH = 32


def _depth(value: Any) -> int:
    """Nesting depth of YAML data (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, d = stack.pop()
        children = (node.values() if isinstance(node, Mapping)
                    else node if isinstance(node, list) else ())
        for child in children:
            stack.append((child, d + 1))
        deepest = max(deepest, d)
    return deepest


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a scenario file with ``yaml.safe_load`` (never ``yaml.load``).

    Raises
    ------
    ScenarioError
        Naming the file when it is missing, not UTF-8 text, not valid YAML, empty (or only
        comments), not a mapping, or nested deeper than :data:`MAX_DEPTH` levels.
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError("SCENARIO", str(path), "an existing YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(str(path), None, "a UTF-8 text YAML file",
                            shown=f"bytes that are not UTF-8 text (at byte {exc.start})") from None
    if "\x00" in text:
        raise ScenarioError(str(path), None, "a UTF-8 text YAML file", shown="binary data")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "file"
        raise ScenarioError(f"{path} ({where})", "invalid YAML", "valid YAML") from None
    except RecursionError:
        raise ScenarioError(str(path), None, f"YAML nested at most {MAX_DEPTH} levels deep",
                            shown="YAML nested too deep to read") from None
    if raw is None:
        raise ScenarioError(str(path), None, "a YAML mapping of scenario keys, e.g. `rounds: 10`",
                            shown="an empty scenario (no keys)")
    if not isinstance(raw, dict):
        raise ScenarioError(str(path), raw, "a mapping at the top level")
    check_depth(raw, str(path))
    raw.setdefault("name", p.stem)
    return raw


def check_depth(raw: Any, where: str) -> None:
    """Reject data nested deeper than :data:`MAX_DEPTH` levels, naming ``where``."""
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise ScenarioError(where, None, f"YAML nested at most {MAX_DEPTH} levels deep",
                            shown=f"YAML nested {depth} levels deep")


def read_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Load a scenario file, apply ``a.b.c=value`` overrides in order, and parse it.

    Only the scenario's own rules are checked here; :func:`fedkd.compose.load_scenario` also
    checks every registered component name and its params.
    """
    raw = load_raw(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:  # load_raw checked the file itself
        check_depth(raw, f"{path} (with --set)")
    return parse_scenario(raw)


def parse_scenario(raw: Mapping[str, Any]) -> Scenario:
    """Parse a raw scenario mapping: keys, types, ranges and the cross-field rules.

    Registered names (datasets, partitioners, models, strategies) and their params are
    checked by :func:`fedkd.compose.validate`, so configuration does not depend on them.
    """
    scn = parse_dataclass(Scenario, raw)
    check_rules(scn)
    return scn


def _check_shares(path: str, shares: list[float]) -> None:
    """Fractions of the clients (models, devices) must sum to 1."""
    if not shares or abs(sum(shares) - 1.0) > 1e-6:
        raise ScenarioError(path, shares, "fractions that sum to 1")


def check_rules(scn: Scenario) -> None:
    """Cross-field rules that need no registry."""
    d = scn.data
    if d.val_fraction + d.public.fraction >= 1:
        raise ScenarioError("data.public.fraction", d.public.fraction,
                            f"a number below {1 - d.val_fraction:g} "
                            "(val_fraction + public.fraction must leave data for clients)")
    if d.val_fraction + d.public.fraction + d.weight_fraction >= 1:
        raise ScenarioError("data.weight_fraction", d.weight_fraction,
                            f"a number below {1 - d.val_fraction - d.public.fraction:g} "
                            "(val_fraction + public.fraction + weight_fraction must leave data "
                            "for clients)")
    if not scn.clients.models:
        raise ScenarioError("clients.models", [], "at least one model spec")
    _check_shares("clients.models", [m.fraction for m in scn.clients.models])
    devices = scn.clients.devices
    if devices is not None:
        _check_shares("clients.devices.profiles", [p.fraction for p in devices.profiles])
        names = [p.name for p in devices.profiles]
        if len(set(names)) != len(names):
            raise ScenarioError("clients.devices.profiles", names, "distinct names")
    if scn.clients.deadline_s is not None and devices is None:
        raise ScenarioError("clients.deadline_s", scn.clients.deadline_s,
                            "null unless clients.devices gives the devices it is timed on")
    if scn.clients.min_clients > scn.clients.num:
        raise ScenarioError("clients.min_clients", scn.clients.min_clients,
                            f"an integer <= clients.num ({scn.clients.num})")
    for key, values in scn.sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"sweep.grid.{key}", values, "a non-empty list of values")


def to_dict(scn: Scenario) -> dict[str, Any]:
    """The resolved scenario as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(scn))


def dump(scn: Scenario) -> str:
    """The resolved scenario as YAML text."""
    return yaml.safe_dump(to_dict(scn), sort_keys=False)
