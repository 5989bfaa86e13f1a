from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mqttd.broker import Broker, running
from mqttd.config import Config, Limits, Listener


def make_config(**limits: object) -> Config:
    """A config listening on 127.0.0.1, port 0 (a free port), with ``limits`` overridden."""
    return Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with running(make_config()) as b:
        yield b
