"""Tests for fedkd.scenario: parsing, overrides, validation errors and the YAML round trip."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkd.compose import from_dict, load_scenario
from fedkd.errors import ScenarioError
from fedkd.scenario import (
    ClientsConfig,
    DataConfig,
    EngineConfig,
    ModelSpec,
    PartitionConfig,
    PublicConfig,
    Resources,
    Scenario,
    ServerConfig,
    StrategyConfig,
    TrainConfig,
    apply_override,
    check_kwargs,
    dump,
    load_raw,
    to_dict,
)

FULL: dict[str, Any] = {
    "name": "full",
    "seed": 7,
    "rounds": 3,
    "eval_every": 2,
    "data": {
        "name": "synthetic",
        "root": "/tmp/data",
        "download": True,
        "val_fraction": 0.1,
        "public": {"fraction": 0.2, "labeled": True, "dataset": "digits", "size": 500},
        "params": {},
    },
    "partition": {"name": "shards", "params": {"classes_per_client": 3}},
    "clients": {
        "num": 8,
        "fraction": 0.5,
        "min_clients": 2,
        "models": [
            {"arch": "mlp", "fraction": 0.25, "params": {"hidden": [64, 32]}},
            {"arch": "resnet8", "fraction": 0.75, "params": {"norm": "group"}},
        ],
        "train": {"lr": 0.1, "momentum": 0.0, "weight_decay": 5e-4, "epochs": 2,
                  "steps": 10, "batch_size": 16},
        "dropout": 0.25,
    },
    "strategy": {"name": "fedavg", "params": {"fraction_evaluate": 0.0}},
    "engine": {"name": "flower", "actors": 4, "client_resources": {"num_cpus": 2,
               "num_gpus": 0.5}, "ray_address": "auto", "threads": 2},
    "server": {"eval_batch_size": 256, "teacher_actors": 1},
    "output": {"dir": "out"},
}


def _error(raw: dict[str, Any]) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        from_dict(raw)
    return info.value


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- parsing


def test_empty_mapping_gives_defaults() -> None:
    scn = from_dict({})
    assert scn == Scenario()
    assert scn.name == "scenario"
    assert scn.seed == 0
    assert scn.rounds == 10
    assert scn.data == DataConfig(name="digits", root=None, download=False, val_fraction=0.0,
                                  public=PublicConfig(), params={})
    assert scn.partition == PartitionConfig(name="dirichlet", params={})
    assert scn.clients.models == (ModelSpec(arch="cnn_small", fraction=1.0, params={}),)
    assert scn.clients.train == TrainConfig(lr=0.05, momentum=0.9, weight_decay=0.0, epochs=1,
                                            steps=None, batch_size=32)
    assert scn.strategy == StrategyConfig(name="fedavg", params={})
    assert scn.engine == EngineConfig(name="ray", actors=0, client_resources=Resources(1.0, 0.0),
                                      ray_address=None, threads=1)


def test_new_data_fractions_default_to_off() -> None:
    data = from_dict({}).data
    assert data.weight_fraction == 0.0 and data.local_test_fraction == 0.0
    scn = from_dict({"data": {"val_fraction": 0.1, "weight_fraction": 0.05,
                              "local_test_fraction": 0.2}})
    assert (scn.data.weight_fraction, scn.data.local_test_fraction) == (0.05, 0.2)
    assert from_dict(to_dict(scn)) == scn


def test_none_sections_mean_defaults() -> None:
    assert from_dict({"data": None, "clients": None}) == Scenario()


def test_full_mapping_parses_to_nested_dataclasses() -> None:
    scn = from_dict(copy.deepcopy(FULL))
    assert scn.name == "full" and scn.seed == 7 and scn.rounds == 3 and scn.eval_every == 2
    assert scn.data == DataConfig(
        name="synthetic", root="/tmp/data", download=True, val_fraction=0.1,
        public=PublicConfig(fraction=0.2, labeled=True, dataset="digits", size=500), params={})
    assert scn.partition == PartitionConfig("shards", {"classes_per_client": 3})
    assert isinstance(scn.clients, ClientsConfig)
    assert scn.clients.num == 8 and scn.clients.fraction == 0.5 and scn.clients.min_clients == 2
    assert scn.clients.dropout == 0.25
    assert scn.clients.models == (
        ModelSpec("mlp", 0.25, {"hidden": [64, 32]}),
        ModelSpec("resnet8", 0.75, {"norm": "group"}),
    )
    assert isinstance(scn.clients.models, tuple)
    assert scn.clients.train == TrainConfig(0.1, 0.0, 5e-4, 2, 10, 16)
    assert scn.strategy == StrategyConfig("fedavg", {"fraction_evaluate": 0.0})
    assert scn.engine == EngineConfig("flower", 4, Resources(2.0, 0.5), "auto", 2)
    assert scn.server == ServerConfig(eval_batch_size=256, teacher_actors=1)
    assert scn.output.dir == "out"


def test_ints_become_floats_for_float_fields() -> None:
    scn = from_dict({"clients": {"fraction": 1, "train": {"lr": 1}},
                     "engine": {"client_resources": {"num_cpus": 2}}})
    assert type(scn.clients.fraction) is float and scn.clients.fraction == 1.0
    assert type(scn.clients.train.lr) is float
    assert type(scn.engine.client_resources.num_cpus) is float


def test_dataclasses_are_frozen() -> None:
    scn = from_dict(copy.deepcopy(FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        scn.rounds = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        scn.clients.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        scn.clients.models[0].arch = "cnn_small"  # type: ignore[misc]


def test_model_list_becomes_tuple_of_modelspec() -> None:
    scn = from_dict({"clients": {"models": [{"arch": "mlp", "fraction": 0.5},
                                            {"arch": "cnn_small", "fraction": 0.5}]}})
    assert scn.clients.models == (ModelSpec("mlp", 0.5), ModelSpec("cnn_small", 0.5))
    assert all(type(m) is ModelSpec for m in scn.clients.models)


# ----------------------------------------------------------------------------- overrides


def test_override_values_are_typed_by_yaml() -> None:
    raw: dict[str, Any] = {"clients": {"models": [{"arch": "cnn_small"}]}}
    apply_override(raw, "rounds=5")
    apply_override(raw, "clients.fraction=0.4")
    apply_override(raw, "data.download=true")
    apply_override(raw, "clients.models.0.arch=mlp")
    apply_override(raw, "strategy.params.x=1")
    apply_override(raw, "data.root=")
    apply_override(raw, "name=exp 1")
    assert raw == {
        "rounds": 5,
        "clients": {"fraction": 0.4, "models": [{"arch": "mlp"}]},
        "data": {"download": True, "root": None},
        "strategy": {"params": {"x": 1}},
        "name": "exp 1",
    }
    assert type(raw["rounds"]) is int
    assert type(raw["clients"]["fraction"]) is float
    assert raw["data"]["download"] is True


def test_override_value_may_contain_equals_and_lists() -> None:
    raw: dict[str, Any] = {}
    apply_override(raw, "clients.models.0=x")  # creates a mapping, not a list
    apply_override(raw, "data.params.tag=a=b")
    apply_override(raw, "partition.params.sizes=[1, 2]")
    assert raw == {"clients": {"models": {"0": "x"}}, "data": {"params": {"tag": "a=b"}},
                   "partition": {"params": {"sizes": [1, 2]}}}


def test_override_replaces_whole_list_item() -> None:
    raw: dict[str, Any] = {"clients": {"models": [{"arch": "mlp"}, {"arch": "cnn_small"}]}}
    apply_override(raw, "clients.models.1={arch: resnet8, fraction: 0.5}")
    assert raw["clients"]["models"][1] == {"arch": "resnet8", "fraction": 0.5}


def test_override_without_equals() -> None:
    with pytest.raises(ScenarioError) as info:
        apply_override({}, "rounds")
    assert info.value.path == "--set"
    assert info.value.value == "rounds"
    assert "KEY.PATH=VALUE" in str(info.value)


def test_override_index_past_list() -> None:
    raw: dict[str, Any] = {"clients": {"models": [{"arch": "mlp"}]}}
    with pytest.raises(ScenarioError) as info:
        apply_override(raw, "clients.models.1.arch=cnn_small")
    assert info.value.path == "clients.models.1"
    assert str(info.value) == "clients.models.1: got '1'; allowed: an index below 1"
    with pytest.raises(ScenarioError) as info:
        apply_override(raw, "clients.models.first.arch=cnn_small")
    assert info.value.path == "clients.models.first"
    assert raw == {"clients": {"models": [{"arch": "mlp"}]}}


def test_override_through_a_scalar() -> None:
    raw: dict[str, Any] = {"rounds": 10}
    with pytest.raises(ScenarioError) as info:
        apply_override(raw, "rounds.x=1")
    assert info.value.path == "rounds"
    assert info.value.value == 10


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ({"bogus": 1}, "bogus",
         "bogus: got 1; allowed: a known key: ['checkpoint_every', 'clients', 'comm', 'data', "
         "'engine', 'eval_every', 'name', 'output', 'partition', 'rounds', 'seed', 'server', "
         "'strategy', 'sweep']"),
        ({"clients": {"nmu": 3}}, "clients.nmu",
         "clients.nmu: got 3; allowed: a known key: ['crash', 'deadline_s', 'devices', "
         "'dropout', 'fraction', 'min_clients', 'models', 'num', 'train']"),
        ({"clients": {"deadline_s": 60}}, "clients.deadline_s",
         "clients.deadline_s: got 60.0; allowed: null unless clients.devices gives the devices "
         "it is timed on"),
        ({"clients": {"devices": {"profiles": [{"name": "a", "fraction": 0.5}]}}},
         "clients.devices.profiles", "clients.devices.profiles: got [0.5]; allowed: fractions "
         "that sum to 1"),
        ({"clients": {"devices": {"profiles": [{"gflops": 0}]}}},
         "clients.devices.profiles.0.gflops", None),
        ({"comm": {"up": {"codec": "zip"}}}, "comm.up.codec", None),
        ({"comm": {"down": {"codec": "topk", "params": {"fraction": 0}}}}, "comm.down.params",
         None),
        ({"comm": {"budget": {"policy": "drop"}}}, "comm.budget.policy", None),
        ({"comm": {"budget": {"total_mb": -1}}}, "comm.budget.total_mb", None),
        ({"clients": {"train": {"lrr": 0.1}}}, "clients.train.lrr", None),
        ({"rounds": "ten"}, "rounds", "rounds: got 'ten'; allowed: an integer"),
        ({"rounds": True}, "rounds", "rounds: got True; allowed: an integer"),
        ({"rounds": 2.0}, "rounds", "rounds: got 2.0; allowed: an integer"),
        ({"data": {"download": 1}}, "data.download",
         "data.download: got 1; allowed: true or false"),
        ({"clients": {"fraction": "x"}}, "clients.fraction",
         "clients.fraction: got 'x'; allowed: a number"),
        ({"clients": {"fraction": True}}, "clients.fraction",
         "clients.fraction: got True; allowed: a number"),
        ({"clients": {"train": {"steps": "many"}}}, "clients.train.steps",
         "clients.train.steps: got 'many'; allowed: an integer or null"),
        ({"clients": 3}, "clients", "clients: got 3; allowed: a mapping"),
        ({"clients": {"models": {"arch": "mlp"}}}, "clients.models", None),
        ({"clients": {"models": [{"arch": "mlp", "frac": 1.0}]}}, "clients.models.0.frac", None),
        ({"clients": {"fraction": 1.5}}, "clients.fraction",
         "clients.fraction: got 1.5; allowed: a number in (0, 1]"),
        ({"clients": {"fraction": 0}}, "clients.fraction",
         "clients.fraction: got 0; allowed: a number in (0, 1]"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction",
         "data.val_fraction: got 1.0; allowed: a number in [0, 1)"),
        ({"data": {"val_fraction": -0.1}}, "data.val_fraction", None),
        ({"data": {"local_test_fraction": 1.0}}, "data.local_test_fraction",
         "data.local_test_fraction: got 1.0; allowed: a number in [0, 1)"),
        ({"data": {"local_test_fraction": "x"}}, "data.local_test_fraction", None),
        ({"data": {"weight_fraction": -0.1}}, "data.weight_fraction",
         "data.weight_fraction: got -0.1; allowed: a number in [0, 1)"),
        ({"data": {"val_fraction": 0.5, "public": {"fraction": 0.25}, "weight_fraction": 0.25}},
         "data.weight_fraction",
         "data.weight_fraction: got 0.25; allowed: a number below 0.25 (val_fraction + "
         "public.fraction + weight_fraction must leave data for clients)"),
        ({"rounds": 0}, "rounds", "rounds: got 0; allowed: an integer > 0"),
        ({"clients": {"train": {"steps": 0}}}, "clients.train.steps",
         "clients.train.steps: got 0; allowed: an integer > 0"),
        ({"clients": {"train": {"weight_decay": -1}}}, "clients.train.weight_decay",
         "clients.train.weight_decay: got -1; allowed: a number >= 0"),
        ({"engine": {"name": "spark"}}, "engine.name",
         "engine.name: got 'spark'; allowed: 'ray' or 'flower' or 'inline'"),
        ({"clients": {"models": [{"arch": "mlp", "fraction": 0.5},
                                 {"arch": "cnn_small", "fraction": 0.3}]}}, "clients.models",
         "clients.models: got [0.5, 0.3]; allowed: fractions that sum to 1"),
        ({"clients": {"models": []}}, "clients.models",
         "clients.models: got []; allowed: at least one model spec"),
        ({"clients": {"models": [{"arch": "mlp", "fraction": 0}]}}, "clients.models.0.fraction",
         "clients.models.0.fraction: got 0; allowed: a number in (0, 1]"),
        ({"clients": {"models": [{"arch": "vgg"}]}}, "clients.models.0.arch",
         "clients.models.0.arch: got 'vgg'; allowed: one of ['cnn_medium', 'cnn_small', "
         "'mlp', 'resnet20', 'resnet8']"),
        ({"clients": {"models": [{"arch": "cnn_small", "params": {"width": 2}}]}},
         "clients.models.0.params.width",
         "clients.models.0.params.width: got 2; allowed: a known key: []"),
        ({"clients": {"models": [{"arch": "resnet8", "params": {"norm": 1}}]}},
         "clients.models.0.params.norm",
         "clients.models.0.params.norm: got 1; allowed: a string"),
        ({"clients": {"models": [{"arch": "mlp", "params": {"num_classes": 3}}]}},
         "clients.models.0.params.num_classes", None),
        ({"data": {"name": "mnist"}}, "data.name",
         "data.name: got 'mnist'; allowed: one of ['cifar10', 'cifar100', 'digits', "
         "'fashion_mnist', 'synthetic']"),
        ({"data": {"public": {"dataset": "imagenet"}}}, "data.public.dataset", None),
        ({"data": {"params": {"test_fraction": "x"}}}, "data.params.test_fraction",
         "data.params.test_fraction: got 'x'; allowed: a number"),
        ({"data": {"params": {"seed": 1}}}, "data.params.seed", None),
        ({"data": {"val_fraction": 0.5, "public": {"fraction": 0.5}}}, "data.public.fraction",
         "data.public.fraction: got 0.5; allowed: a number below 0.5 (val_fraction + "
         "public.fraction must leave data for clients)"),
        ({"strategy": {"name": "no_such_strategy"}}, "strategy.name", None),
        ({"strategy": {"name": "fed-avg"}}, "strategy.name", None),
        ({"strategy": {"params": {"bogus": 1}}}, "strategy.params.bogus",
         "strategy.params.bogus: got 1; allowed: a known key: ['fraction_evaluate']"),
        ({"strategy": {"params": {"seed": 1}}}, "strategy.params.seed", None),
        ({"strategy": {"params": {"fraction_evaluate": "half"}}},
         "strategy.params.fraction_evaluate",
         "strategy.params.fraction_evaluate: got 'half'; allowed: a number"),
        ({"partition": {"name": "zipf"}}, "partition.name",
         "partition.name: got 'zipf'; allowed: one of ['dirichlet', 'iid', 'quantity', "
         "'shards']"),
        ({"partition": {"name": "shards", "params": {"alpha": 0.1}}}, "partition.params.alpha",
         "partition.params.alpha: got 0.1; allowed: a known key: ['classes_per_client']"),
        ({"partition": {"params": {"num_clients": 4}}}, "partition.params.num_clients",
         "partition.params.num_clients: got 4; allowed: a known key: ['alpha', 'min_size']"),
        ({"partition": {"params": {"alpha": "x"}}}, "partition.params.alpha",
         "partition.params.alpha: got 'x'; allowed: a number"),
        ({"clients": {"num": 3, "min_clients": 5}}, "clients.min_clients",
         "clients.min_clients: got 5; allowed: an integer <= clients.num (3)"),
    ],
)
def test_scenario_errors(raw: dict[str, Any], path: str, message: str | None) -> None:
    err = _error(raw)
    assert err.path == path
    if message is not None:
        assert str(err) == message
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}: got ")


def test_unknown_strategy_lists_registered_names() -> None:
    err = _error({"strategy": {"name": "no_such_strategy"}})
    assert err.value == "no_such_strategy"
    assert err.allowed.startswith("one of [")
    assert "'fedavg'" in err.allowed


# ----------------------------------------------------------------------------- files


def test_load_scenario_from_yaml_with_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, yaml.safe_dump(FULL))
    assert load_scenario(path) == from_dict(copy.deepcopy(FULL))
    scn = load_scenario(path, ["rounds=5", "clients.models.1.params.norm=batch",
                               "strategy.params.fraction_evaluate=0.5"])
    assert scn.rounds == 5
    assert scn.clients.models[1] == ModelSpec("resnet8", 0.75, {"norm": "batch"})
    assert scn.strategy.params == {"fraction_evaluate": 0.5}


def test_overrides_apply_in_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: 2\n")
    assert load_scenario(path, ["rounds=3", "rounds=4"]).rounds == 4


def test_load_scenario_name_defaults_to_file_stem(tmp_path: Path) -> None:
    assert load_scenario(_write(tmp_path, "rounds: 2\n", "my_exp.yaml")).name == "my_exp"
    assert load_scenario(_write(tmp_path, "name: given\n", "other.yaml")).name == "given"


#: Files that are no scenario: (content, phrase the one-line error must contain).
BAD_FILES = [
    (b"", "got an empty scenario (no keys)"),
    (b"# only a comment\n\n", "got an empty scenario (no keys)"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "got bytes that are not UTF-8 text (at byte 0)"),
    (b"rounds: 2\n\x00\x00\x01", "got binary data; allowed: a UTF-8 text YAML file"),
    (b"a: " + b"[" * 5000 + b"]" * 5000, "got YAML nested too deep to read"),
    (b"a:\n" + b"".join(b"  " * i + b"k%d:\n" % i for i in range(1, 3000)),
     "got YAML nested too deep to read"),
    (b"a: " + b"[" * 40 + b"]" * 40, "got YAML nested 40 levels deep"),
    (b"- rounds\n", "got ['rounds']; allowed: a mapping at the top level"),
]


@pytest.mark.parametrize(("content", "phrase"), BAD_FILES)
def test_bad_scenario_files_are_one_line(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: got "), message
    assert phrase in message and "\n" not in message


def test_deep_override_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: 2\n")
    for value, phrase in (("[" * 5000 + "]" * 5000, "nested too deep"),
                          ("[" * 40 + "]" * 40, "nested 42 levels deep")):
        with pytest.raises(ScenarioError) as info:
            load_scenario(path, [f"strategy.params.x={value}"])
        assert phrase in str(info.value) and "\n" not in str(info.value)


def test_load_scenario_override_is_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: 2\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, ["clients.fraction=1.5"])
    assert info.value.path == "clients.fraction"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, ["strategy.params.bogus=1"])
    assert info.value.path == "strategy.params.bogus"


def test_load_scenario_errors_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: 2\nclients:\n  nmu: 4\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.path == "clients.nmu"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(missing)
    assert info.value.path == "SCENARIO"
    assert info.value.value == str(missing)
    assert str(info.value) == f"SCENARIO: got {str(missing)!r}; allowed: an existing YAML file"
    with pytest.raises(ScenarioError):
        load_scenario(tmp_path)  # a directory is not a file


def test_invalid_yaml_is_one_line_scenario_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: 2\nclients: [1, 2\nseed: 1\n", "bad.yaml")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert err.path.startswith(f"{path} (line ")
    assert err.value == "invalid YAML"
    assert "\n" not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        load_raw(path := _write(tmp_path, "- 1\n- 2\n"))
    assert info.value.path == str(path)
    assert info.value.value == [1, 2]


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ScenarioError) as info:
        load_raw(path)
    assert info.value.value == "invalid YAML"


# ----------------------------------------------------------------------------- check_kwargs


def _toy(labels: list[int], seed: int, alpha: float = 0.5, k: int = 2, name: str = "a",
         flag: bool = False, *, limit: int | None = None) -> None:
    """A registered-component lookalike with annotated defaults."""


def _toy_any(labels: list[int], seed: int = 0, alpha: float = 0.5, **extra: Any) -> None:
    """Accepts extra keyword arguments."""


def test_check_kwargs_accepts_valid_params() -> None:
    check_kwargs(_toy, {"alpha": 1, "k": 3, "name": "b", "flag": True, "limit": None}, "p")
    check_kwargs(_toy, {"limit": 5}, "p")
    check_kwargs(_toy, {}, "p")


def test_check_kwargs_unknown_key_lists_allowed() -> None:
    with pytest.raises(ScenarioError) as info:
        check_kwargs(_toy, {"beta": 1}, "partition.params")
    assert info.value.path == "partition.params.beta"
    assert str(info.value) == ("partition.params.beta: got 1; allowed: a known key: "
                               "['alpha', 'flag', 'k', 'limit', 'name']")
    # arguments without defaults and skipped ones are not settable
    for key in ("labels", "seed"):
        with pytest.raises(ScenarioError):
            check_kwargs(_toy, {key: 1}, "p")
    with pytest.raises(ScenarioError) as info:
        check_kwargs(_toy, {"k": 1}, "p", skip=("k",))
    assert info.value.allowed == "a known key: ['alpha', 'flag', 'limit', 'name']"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("alpha", "x", "a number"),
        ("alpha", True, "a number"),
        ("k", 2.5, "an integer"),
        ("k", False, "an integer"),
        ("name", 3, "a string"),
        ("flag", "yes", "true or false"),
        ("limit", 1.0, "an integer or null"),
    ],
)
def test_check_kwargs_rejects_wrong_types(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ScenarioError) as info:
        check_kwargs(_toy, {key: value}, "x.params")
    assert info.value.path == f"x.params.{key}"
    assert info.value.value == value
    assert info.value.allowed == allowed


def test_check_kwargs_var_keyword() -> None:
    check_kwargs(_toy_any, {"anything": 1, "alpha": 0.1}, "p")
    with pytest.raises(ScenarioError) as info:
        check_kwargs(_toy_any, {"alpha": "x"}, "p")
    assert info.value.path == "p.alpha"
    with pytest.raises(ScenarioError) as info:
        check_kwargs(_toy_any, {"seed": 1}, "p", skip=("seed",))
    assert info.value.path == "p.seed"


def test_check_kwargs_on_a_class() -> None:
    class Toy:
        def __init__(self, a: int, b: float = 1.0) -> None:
            self.a, self.b = a, b

    check_kwargs(Toy, {"b": 2}, "strategy.params")
    with pytest.raises(ScenarioError) as info:
        check_kwargs(Toy, {"a": 1}, "strategy.params")
    assert info.value.allowed == "a known key: ['b']"


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("raw", [{}, FULL])
def test_dump_round_trip(raw: dict[str, Any]) -> None:
    scn = from_dict(copy.deepcopy(raw))
    text = dump(scn)
    again = from_dict(yaml.safe_load(text))
    assert again == scn
    assert dump(again) == text


def test_to_dict_is_plain_data() -> None:
    scn = from_dict(copy.deepcopy(FULL))
    d = to_dict(scn)
    assert list(d) == ["name", "seed", "rounds", "eval_every", "checkpoint_every", "data",
                       "partition", "clients", "strategy", "engine", "server", "comm", "output",
                       "sweep"]
    assert d["clients"]["models"] == [
        {"arch": "mlp", "fraction": 0.25, "params": {"hidden": [64, 32]}},
        {"arch": "resnet8", "fraction": 0.75, "params": {"norm": "group"}},
    ]
    assert d["engine"]["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert d["data"]["public"] == {"fraction": 0.2, "labeled": True, "dataset": "digits",
                                   "size": 500}
    # to_dict copies: mutating the result leaves the scenario alone
    d["strategy"]["params"]["fraction_evaluate"] = 1.0
    assert scn.strategy.params == {"fraction_evaluate": 0.0}


@pytest.mark.parametrize("name", ["quickstart", "noniid_fashion", "noniid_cifar"])
def test_shipped_scenarios_parse(name: str) -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scenarios" / f"{name}.yaml"
    scn = load_scenario(path)
    assert scn.name == name
    assert scn.clients.num in (10, 20)
    shipped = {  # what README says of each shipped scenario
        "quickstart": ("digits", 10, "dirichlet", 0.5, 1.0, 20, "cnn_small"),
        "noniid_fashion": ("fashion_mnist", 20, "dirichlet", 0.1, 0.4, None, None),
        "noniid_cifar": ("cifar10", 20, "dirichlet", 0.1, 0.4, 100, "resnet8"),
    }[name]
    got = (scn.data.name, scn.clients.num, scn.partition.name,
           scn.partition.params.get("alpha"), scn.clients.fraction, scn.rounds,
           scn.clients.models[0].arch)
    assert [g for g, w in zip(got, shipped, strict=True) if w is not None] == [
        w for w in shipped if w is not None]
    if name == "noniid_cifar":
        assert scn.data.public.dataset == "cifar100" and scn.data.download
