from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqttd import build_info
from mqttd.broker import Broker, running
from mqttd.config import Config, Http, Limits, Listener, Persistence

# in-process test brokers run without the operations listener (its default port is fixed);
# the tests of that listener turn it on, on port 0
NO_HTTP = Http(enabled=False)


def make_config(data_dir: Path | str | None = None, **limits: object) -> Config:
    """A config listening on 127.0.0.1, port 0 (a free port), with ``limits`` overridden,
    without the operations listener. The store is SQLite in memory unless ``data_dir``
    names a directory for the file."""
    persistence = (
        Persistence(db_file=":memory:") if data_dir is None else Persistence(data_dir=str(data_dir))
    )
    return Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        limits=Limits(**limits),  # type: ignore[arg-type]
        persistence=persistence,
        http=NO_HTTP,
    )


def pytest_report_header() -> str:
    return f"mqttd build: {build_info.describe()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # an extension module built from an older source would be tested instead of the source
    stale = build_info.stale()
    if stale:
        pytest.exit(
            f"compiled modules built from an older source: {', '.join(stale)}; rebuild them "
            "(make test does), or install the pure-Python build (make test-pure)",
            returncode=3,
        )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with running(make_config()) as b:
        yield b
