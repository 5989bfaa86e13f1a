"""Synchronous routing of one message to the sessions subscribed to its topic.

The subscription trie stores, per client, the object to deliver to (a ``Session``,
or anything else with the same ``deliver`` method: the seam where a bridge or a
cluster link plugs in) and the granted QoS. ``route`` runs inside the publisher's
reader task with no ``await``: the message is encoded at most once per QoS and the
bytes are shared by every subscriber.
"""

from __future__ import annotations

from typing import Protocol

from mqttd.codec.packets import Publish
from mqttd.session import PartsCache, new_parts_cache
from mqttd.trie import SubscriptionTrie


class Subscriber(Protocol):
    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: PartsCache | None
    ) -> None: ...


class Router:
    def __init__(self, trie: SubscriptionTrie | None = None) -> None:
        self.trie = trie if trie is not None else SubscriptionTrie()
        self.messages_routed = 0
        self.messages_unmatched = 0
        self.deliveries = 0

    def route(self, message: Publish) -> int:
        """Deliver ``message`` to every matching subscriber at min(publish QoS, granted
        QoS), once per client however many of its filters match. Returns how many."""
        self.messages_routed += 1
        targets = self.trie.match(message.topic)
        if not targets:
            self.messages_unmatched += 1
            return 0
        parts: PartsCache = new_parts_cache()
        publish_qos = message.qos
        for subscriber, granted in targets:
            subscriber.deliver(  # type: ignore[attr-defined]
                message, min(granted, publish_qos), False, parts
            )
        self.deliveries += len(targets)
        return len(targets)
