"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Messages need a Flower task identity; set one and restore the previous state after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as a client actor trains: small models train faster and do not fight
    other processes for cores. Modules opt in with ``pytestmark``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
