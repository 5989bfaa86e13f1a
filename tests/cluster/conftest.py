from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.natsharness import NatsCluster, nats_servers


@pytest.fixture
async def nats1(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """One nats-server with JetStream."""
    async with nats_servers(tmp_path, 1) as cluster:
        yield cluster


@pytest.fixture
async def nats3(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three nats-servers in a JetStream cluster, meta leader elected."""
    async with nats_servers(tmp_path, 3) as cluster:
        yield cluster
