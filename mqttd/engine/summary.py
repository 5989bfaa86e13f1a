"""The periodic summary line (``logging.summary_interval_s``): connections, messages in and
out per second over the interval, queued, dropped (total) and store commits, from the
engine's counters (:meth:`~mqttd.engine.dispatch.Engine.stats`); rates are counter deltas
over the time between two lines. Runs on the engine's timers (no trio here)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine

log = logging.getLogger("mqttd.summary")


@attrs.define(eq=False)
class Summary:
    engine: Engine
    interval_s: float
    last_at: float = 0.0
    last: dict[str, int] = attrs.Factory(dict)

    def start(self) -> None:
        self.last_at = time.time()
        self.last = self.engine.stats()
        self.engine.call_at(self.last_at + self.interval_s, self.tick)

    def tick(self) -> None:
        """Log the line, and come back in ``interval_s``."""
        now = time.time()
        stats = self.engine.stats()
        fields = self.fields(stats, now - self.last_at)
        self.last, self.last_at = stats, now
        log.info(
            "summary: %d connections, %.1f messages/s in, %.1f messages/s out, %d queued, "
            "%d dropped, %d store commits (%.1f/s)",
            fields["connections"], fields["messages_in_per_s"], fields["messages_out_per_s"],
            fields["queued"], fields["dropped"], fields["store_commits"],
            fields["store_commits_per_s"], extra=fields,
        )
        self.engine.call_at(now + self.interval_s, self.tick)

    def fields(self, stats: dict[str, int], elapsed_s: float) -> dict[str, Any]:
        """The line's values: totals now, and rates since the last line."""
        last = self.last

        def rate(name: str) -> float:
            return round((stats[name] - last.get(name, 0)) / elapsed_s, 2) if elapsed_s > 0 else 0.0

        return {
            "event": "summary",
            "interval_s": round(elapsed_s, 3),
            "connections": stats["connections"],
            "messages_in_per_s": rate("messages_received"),
            "messages_out_per_s": rate("messages_sent"),
            "queued": stats["queued"],
            "inflight": stats["inflight"],
            "dropped": stats["dropped"] + stats["dropped_qos0"],
            "refused": stats["refused"],
            "store_commits": stats["store_commits"],
            "store_commits_per_s": rate("store_commits"),
        }
