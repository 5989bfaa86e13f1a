"""A bridge's topic mapping (mosquitto's bridge_topic.c): which local messages go to the
remote broker and under which topic (``out`` and ``both``), and where the remote's messages
are published here (``in`` and ``both``). A mapping's ``local_prefix`` replaces its
``remote_prefix`` at the start of a topic, and the other way round; the first mapping that
matches a topic decides."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from mqttd.codec.packets import Publish, Subscription
from mqttd.config import BridgeTopic
from mqttd.topics import matches


class TopicMapping:
    def __init__(self, topics: Sequence[BridgeTopic]) -> None:
        self.out_topics = [t for t in topics if t.direction in ("out", "both")]
        self.in_topics = [t for t in topics if t.direction in ("in", "both")]

    def local_filters(self) -> dict[str, int]:
        """The local subscriptions of the bridge's session: each ``out`` filter at the
        highest QoS of the mappings that have it."""
        wanted: dict[str, int] = {}
        for topic in self.out_topics:
            wanted[topic.local_filter] = max(topic.qos, wanted.get(topic.local_filter, 0))
        return wanted

    def outbound(self, message: Publish) -> Publish | None:
        """``message`` as it goes to the remote (its topic mapped, QoS at most the
        mapping's, DUP and packet id cleared), or None when no ``out`` mapping has it.
        5.0 properties and expiry go along; a 3.1.1 link leaves them out when encoding."""
        topic = message.topic
        for mapping in self.out_topics:
            if matches(mapping.local_filter, topic):
                break
        else:
            return None
        remote_topic = mapping.remote_prefix + topic[len(mapping.local_prefix):]
        qos = min(message.qos, mapping.qos)
        return attrs.evolve(message, topic=remote_topic, qos=qos, dup=False, packet_id=0)

    def local_topic(self, remote_topic: str) -> str | None:
        """Where a message of the remote's ``remote_topic`` is published here (None: no
        ``in`` mapping has it)."""
        for mapping in self.in_topics:
            if matches(mapping.remote_filter, remote_topic):
                return mapping.local_prefix + remote_topic[len(mapping.remote_prefix):]
        return None

    def remote_subscriptions(self, v5_link: bool) -> tuple[Subscription, ...]:
        """What the link subscribes to at the remote: the ``in`` filters; on a 5.0 link with
        No Local (its own messages do not come back) and Retain As Published."""
        return tuple(
            Subscription(t.remote_filter, t.qos, v5_link, v5_link) for t in self.in_topics
        )

    def refused_filters(self, return_codes: Sequence[int]) -> list[str]:
        """The remote filters a SUBACK refused (return code 0x80 or more)."""
        return [
            t.remote_filter
            for t, code in zip(self.in_topics, return_codes, strict=False)
            if code >= 0x80
        ]
