from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _quiet_broker_logs() -> Iterator[None]:
    """Fuzzing makes the broker log a warning per refused client: keep them out of the way
    (errors are kept: the fuzzer counts them as findings)."""
    loggers = [logging.getLogger(name) for name in ("mqttd", "persistence")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # errors still reach tools.fuzz.ErrorLog: findings
    yield
    # the fuzzer's runners also stop propagation: later tests log through the root again
    for logger, (level, propagate) in zip(loggers, saved, strict=True):
        logger.setLevel(level)
        logger.propagate = propagate
