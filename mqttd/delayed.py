"""Delayed publish: a PUBLISH to ``$delayed/<seconds>/<topic>`` (EMQX's syntax) is published
to ``<topic>`` ``<seconds>`` later, as if then, with its QoS, RETAIN flag and properties.

The queue is a subscriber of ``$delayed/#`` in the subscription trie (like a share group):
ordinary topics pay nothing for it, and a delayed message is "routed" to it like to any
subscriber, so it is stored (table ``delayed``) in the commit its PUBACK / PUBREC waits for,
and survives a restart and a ``kill -9``. At the due time it is published and removed from
the store in one commit.

Limits: a delay above ``max_delay_s`` or one that is not a whole number of seconds is
refused (dropped, counted and logged: the publisher's acknowledgement cannot say so, as the
queue is reached by routing); with ``max_messages`` held, a further delayed message is
refused as a full queue is (MQTT 5 publishers get 0x97 Quota exceeded and the message is
routed to no one; 3.1.1 publishers cannot be told). The ACL applies to ``<topic>`` (the
engine checks it), not to the ``$delayed/...`` name. A message whose expiry interval passes
while it waits is dropped and counted. Sans-IO: timers through the host's ``call_at``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from mqttd import v5
from mqttd.codec.packets import Publish
from mqttd.config import Delayed as DelayedConfig
from persistence import ops

if TYPE_CHECKING:
    from mqttd.outqueue import DropCounters
    from mqttd.trie import SubscriptionTrie
    from persistence.journal import Journal
    from persistence.store import DelayedRow

log = logging.getLogger(__name__)

DELAYED_PREFIX = "$delayed/"
FILTER = "$delayed/#"
_KEY = "\x00delayed"  # its key in the trie (no client id can hold U+0000)
LOG_INTERVAL_S = 60.0


class Host(Protocol):
    writer: Journal | None

    def publish(self, message: Publish) -> int: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> None: ...


def parse(topic: str) -> tuple[int, str] | None:
    """``$delayed/<seconds>/<topic>`` -> (seconds, topic); None when malformed."""
    seconds, sep, target = topic[len(DELAYED_PREFIX):].partition("/")
    if not sep or not target or not seconds.isdigit() or not seconds.isascii():
        return None
    return int(seconds), target


@attrs.define(eq=False)
class DelayedQueue:
    host: Host
    config: DelayedConfig
    drops: DropCounters  # a full queue is refused as a full session queue is
    held: dict[int, tuple[float, Publish]] = attrs.Factory(dict)  # id -> (due, message)
    next_id: int = 1
    # counters
    accepted: int = 0
    published: int = 0
    expired: int = 0
    refused_invalid: int = 0  # not a whole number of seconds, or no topic
    refused_too_long: int = 0  # over max_delay_s
    refused_full: int = 0  # max_messages held
    _next_log: float = 0.0

    def install(self, trie: SubscriptionTrie) -> int:
        """Subscribe to ``$delayed/#`` (when enabled); how many entries that adds to the
        trie (which are not client subscriptions)."""
        if not self.config.enabled:
            return 0
        trie.add(FILTER, _KEY, self, 2)
        return 1

    def acl_topic(self, topic: str) -> str:
        """The topic the ACL judges a PUBLISH to ``topic`` by: the target of a delayed one."""
        if self.config.enabled and topic.startswith(DELAYED_PREFIX):
            parsed = parse(topic)
            if parsed is not None:
                return parsed[1]
        return topic

    def handles(self, topic: str) -> bool:
        """Whether a PUBLISH to ``topic`` is a delayed one (its RETAIN flag is the target's)."""
        return self.config.enabled and topic.startswith(DELAYED_PREFIX)

    # -- the router's target -----------------------------------------------------------

    def deliver(self, message: Publish, qos: int, retain: bool, parts: Any,
                share: Any = None, sub_ids: Any = None) -> None:
        parsed = parse(message.topic)
        if parsed is None:
            self.refused_invalid += 1
            self._refused(message, "the delay is not a whole number of seconds")
            return
        delay_s, target = parsed
        if delay_s > self.config.max_delay_s:
            self.refused_too_long += 1
            self._refused(message, f"the delay is over delayed.max_delay_s "
                                   f"({self.config.max_delay_s})")
            return
        if self.over_budget(1, 0):
            self.count_refused()
            self._refused(message, f"delayed.max_messages ({self.config.max_messages}) held")
            return
        due = time.time() + delay_s
        delayed = attrs.evolve(message, topic=target, dup=False, packet_id=0)
        delayed_id = self.next_id
        self.next_id = delayed_id + 1
        writer = self.host.writer
        if writer is not None:
            writer.submit(ops.AddDelayed(
                delayed_id, due, target, message.payload, message.qos, message.retain,
                v5.stored_properties(message), message.expires_at,
            ))
        self.accepted += 1
        self._hold(delayed_id, due, delayed)

    def _hold(self, delayed_id: int, due: float, message: Publish) -> None:
        self.held[delayed_id] = (due, message)
        if self.over_budget(1, 0):
            self.drops.full.add(self)
        self.host.call_at(due, lambda: self._due(delayed_id))

    def _due(self, delayed_id: int) -> None:
        entry = self.held.pop(delayed_id, None)
        if entry is None:
            return
        message = entry[1]
        writer = self.host.writer
        if writer is not None:
            writer.submit(ops.RemoveDelayed(delayed_id))
        if v5.expired(message):
            self.expired += 1
            return
        self.published += 1
        self.host.publish(message)

    # -- as a full queue (engine.publish.queue_refuses) ----------------------------------

    def over_budget(self, extra_messages: int = 0, extra_bytes: int = 0) -> bool:
        limit = self.config.max_messages
        return 0 <= limit < len(self.held) + extra_messages

    def count_refused(self) -> None:
        self.refused_full += 1
        self.drops.refused += 1

    def _refused(self, message: Publish, why: str) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL_S
            log.warning("delayed publish to %r refused: %s (%d refused so far)", message.topic,
                        why, self.refused_invalid + self.refused_too_long + self.refused_full)

    # -- restart and stats -------------------------------------------------------------

    def restore(self, rows: list[DelayedRow]) -> None:
        for row in rows:
            message = v5.restored_message(row.topic, row.payload, row.qos, row.retain,
                                          row.properties, row.expires_at)
            self._hold(row.delayed_id, row.due_at, message)
            self.next_id = max(self.next_id, row.delayed_id + 1)

    def stats(self) -> dict[str, int]:
        return {
            "delayed_held": len(self.held),
            "delayed_accepted": self.accepted,
            "delayed_published": self.published,
            "delayed_expired": self.expired,
            "delayed_refused": self.refused_invalid + self.refused_too_long + self.refused_full,
        }
