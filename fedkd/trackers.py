"""Optional experiment trackers beside the Parquet records: TensorBoard and MLflow.

Each tracker receives every finished round's numeric metrics (the ``metrics.parquet`` row)
through one small interface, :class:`Tracker`, and :func:`build_trackers` makes the ones a
scenario's ``output`` block asks for:

- ``output.tensorboard: true`` writes TensorBoard event files into ``<run_dir>/tensorboard/``
  (``torch.utils.tensorboard``; needs the ``tensorboard`` extra).
- ``output.mlflow_uri: <uri>`` logs the resolved scenario, flattened to dotted keys, as the
  params of one MLflow run (experiment: the scenario's name, run: the run folder's name) and
  every round's metrics at step ``round`` (needs the ``mlflow`` extra).

Neither package is part of the default install. A scenario that turns a tracker on without
its package fails before the first round with a one-line :class:`~fedkd.errors.ScenarioError`
naming the key and the extra to install.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from fedkd.errors import ScenarioError
from fedkd.scenario import OutputConfig, Scenario, to_dict

#: Longest parameter value sent to MLflow (older tracking servers refuse longer ones).
MLFLOW_PARAM_MAX = 500

#: fedkd's run status -> MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "budget_exhausted": "FINISHED",
                 "interrupted": "KILLED"}


class Tracker(Protocol):
    """Where each finished round's metrics go besides the Parquet records."""

    def log_round(self, round: int, metrics: Mapping[str, Any]) -> None:
        """Record one finished round's metrics (non-numeric and missing values are skipped)."""

    def close(self, status: str = "completed") -> None:
        """Flush and release; ``status`` is how the run ended (``completed``, ``failed``...)."""


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite int/float values of a metrics row, as floats, without ``round``.

    Parameters
    ----------
    metrics : Mapping[str, Any]
        A ``metrics.parquet`` row.

    Returns
    -------
    dict[str, float]
        Key -> value for every finite number (booleans, ``None``, NaN and strings dropped).
    """
    out = {}
    for key, value in metrics.items():
        if key == "round" or isinstance(value, bool | np.bool_):
            continue
        if isinstance(value, int | float | np.number) and math.isfinite(value):
            out[key] = float(value)
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as dotted keys (``clients.models.0.arch``) with text values.

    Parameters
    ----------
    value : Any
        Plain data, e.g. :func:`fedkd.scenario.to_dict` of a scenario.
    prefix : str
        Key path of ``value``.

    Returns
    -------
    dict[str, str]
        Leaf path -> value (strings as they are, anything else as JSON: ``true``, ``null``,
        ``0.1``; empty mappings and lists as ``{}`` / ``[]``).
    """
    if isinstance(value, Mapping) and value:
        items: Iterator[tuple[Any, Any]] = iter(value.items())
    elif isinstance(value, list | tuple) and value:
        items = iter(enumerate(value))
    else:
        return {prefix: value if isinstance(value, str) else json.dumps(value, default=str)}
    out: dict[str, str] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _require(module: str, key: str, value: Any, extra: str) -> ModuleType:
    """Import ``module`` or stop with a one-line error naming ``key`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ScenarioError(key, value, f"{'false' if value is True else 'null'} unless the "
                            f"{extra} package is installed: pip install -e '.[{extra}]'"
                            ) from None


def check_trackers(output: OutputConfig) -> None:
    """Stop with a :class:`ScenarioError` when a tracker is on but its package is missing.

    Parameters
    ----------
    output : OutputConfig
        The scenario's ``output`` block.

    Raises
    ------
    ScenarioError
        Naming ``output.tensorboard`` or ``output.mlflow_uri`` and the extra to install.
    """
    if output.tensorboard:
        _require("torch.utils.tensorboard", "output.tensorboard", True, "tensorboard")
    if output.mlflow_uri is not None:
        _require("mlflow", "output.mlflow_uri", output.mlflow_uri, "mlflow")


class TensorBoardTracker:
    """TensorBoard event files: one scalar per metric and round (step = round).

    Parameters
    ----------
    log_dir : Path
        Folder of the event files.
    purge_step : int, optional
        On a resumed run, the first round run again: events from it on are hidden.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        module = _require("torch.utils.tensorboard", "output.tensorboard", True, "tensorboard")
        self.writer = module.SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_round(self, round: int, metrics: Mapping[str, Any]) -> None:
        """Write the round's numeric metrics and flush, so a live TensorBoard sees them."""
        for key, value in numeric_metrics(metrics).items():
            self.writer.add_scalar(key, value, global_step=round)
        self.writer.flush()

    def close(self, status: str = "completed") -> None:
        """Close the event file."""
        self.writer.close()


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker:
    """One MLflow run: the scenario as params, every round's metrics at step ``round``.

    Uses an ``MlflowClient`` bound to ``uri`` (no global MLflow state is touched).

    Parameters
    ----------
    uri : str
        Tracking URI (a server, ``http://127.0.0.1:5000``, or a database, ``sqlite:///mlflow.db``).
    experiment : str
        Experiment name (created when missing).
    run_name : str
        Name of the MLflow run.
    params : Mapping[str, str]
        Run parameters (values longer than :data:`MLFLOW_PARAM_MAX` are cut).
    tags : Mapping[str, str], optional
        Run tags.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: Mapping[str, str],
                 tags: Mapping[str, str] | None = None) -> None:
        _require("mlflow", "output.mlflow_uri", uri, "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(experiment)
            except MlflowException:  # another run created it meanwhile
                experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags=dict(tags or {})).info.run_id
        logged = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in params.items()]
        for batch in _batches(logged, 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=list(batch))

    def log_round(self, round: int, metrics: Mapping[str, Any]) -> None:
        """Log the round's numeric metrics at step ``round``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged = [Metric(k, v, now, round) for k, v in numeric_metrics(metrics).items()]
        for batch in _batches(logged, 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=list(batch))

    def close(self, status: str = "completed") -> None:
        """End the MLflow run with the status matching fedkd's (:data:`MLFLOW_STATUS`)."""
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def build_trackers(scn: Scenario, run_dir: Path, resume_round: int = 0) -> list[Tracker]:
    """The trackers ``scn.output`` turns on (none by default).

    Parameters
    ----------
    scn : Scenario
        The resolved scenario.
    run_dir : Path
        The run folder (TensorBoard writes into ``<run_dir>/tensorboard/``; MLflow names its
        run after the folder).
    resume_round : int
        The checkpoint round of a resumed run (0: a new run).

    Returns
    -------
    list[Tracker]
        The trackers, in the order TensorBoard, MLflow.

    Raises
    ------
    ScenarioError
        When a tracker is on and its package is missing (checked for all before any starts).
    """
    check_trackers(scn.output)
    trackers: list[Tracker] = []
    if scn.output.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard",
                                           purge_step=resume_round + 1 if resume_round else None))
    if scn.output.mlflow_uri is not None:
        trackers.append(MlflowTracker(
            scn.output.mlflow_uri, experiment=scn.name, run_name=run_dir.name,
            params=flatten(to_dict(scn)),
            tags={"fedkd.strategy": scn.strategy.name, "fedkd.run_dir": str(run_dir)}))
    return trackers
