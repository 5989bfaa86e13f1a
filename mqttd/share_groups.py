"""Shared subscriptions: ``$share/<group>/<filter>`` (MQTT 5.0 section 4.8.2, also accepted
from 3.1.1 clients, as mosquitto does).

Every session subscribed to the same ``$share/<group>/<filter>`` is a member of one
:class:`ShareGroup`. The group, not its members, sits in the subscription trie (under a key
no client id can have), so a routed message reaches the group once and the group hands it
to exactly one member:

- round robin over the connected members, skipping those whose inflight window is full or
  who already have a queue (so a slow consumer does not collect the group's backlog);
- when every connected member is busy, the connected member with the shortest queue;
- when no member is connected, a persistent member (its queue is stored, as for any
  persistent session), round robin;
- no member able to take it (only offline clean sessions, QoS 0 to offline members): dropped
  and counted.

Each member receives at most the QoS it was granted. A member's deliveries remember the
group they came through; when the member's connection ends, what it has not acknowledged
(inflight PUBLISHes, QoS 2 ones not yet PUBRECed, and its queue held in RAM) is taken back
and handed to another member. Retained messages are not sent on a shared subscription
(MQTT 5.0, 4.8.2 / 3.8.4). What a group does beyond picking a member (retries after a
negative acknowledgement, ack deadlines, dead letters, handing on) is
:mod:`mqttd.workqueues`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from mqttd.topics import parse_shared

if TYPE_CHECKING:
    from mqttd.codec.packets import Publish
    from mqttd.delivery import Fanout, Share
    from mqttd.session import Session
    from mqttd.subscriptions import SubOptions
    from mqttd.trie import SubscriptionTrie

    Member = tuple[Session, int, SubOptions | None]
    Watch = Callable[["ShareGroup", Member, Publish, str], Share]


class ClusterGroups(Protocol):
    """Cluster mode's hook (mqttd.clustering.groups): groups span the nodes, and their
    messages reach a member through JetStream, not through the local router."""

    def group_added(self, group: ShareGroup) -> None: ...

    def group_removed(self, group: ShareGroup) -> None: ...

    def node_local(self, topic: str) -> bool:
        """Whether a topic's messages stay on this node (``$SYS``): delivered here."""
        ...

log = logging.getLogger(__name__)

# Trie key of a group: U+0000 cannot occur in an MQTT string, so no client id equals it.
_KEY_PREFIX = "\x00"


class ShareGroup:
    """The members of one ``$share/<group>/<filter>`` and the round-robin cursor."""

    __slots__ = (
        "_cursor",
        "cluster",
        "delivered",
        "dropped",
        "filter",
        "group",
        "members",
        "name",
        "redelivered",
        "watch",
    )

    def __init__(self, name: str, group: str, topic_filter: str) -> None:
        self.name = name
        self.group = group
        self.filter = topic_filter
        # client id -> (session, QoS, 5.0 options)
        self.members: dict[str, tuple[Session, int, SubOptions | None]] = {}
        self._cursor = 0
        self.delivered = 0
        self.redelivered = 0
        self.dropped = 0
        # set by the work queues when the group has an ack deadline: called for each
        # delivery, it returns what the delivery carries (an Attempt it watches)
        self.watch: Watch | None = None
        # cluster mode: the messages come through JetStream (see ClusterGroups)
        self.cluster: ClusterGroups | None = None

    def pick(
        self, qos: int, exclude: Session | None = None, connected: bool = False
    ) -> Member | None:
        """The member to hand a message to (see the module's docstring); with ``exclude``
        never that session, with ``connected`` only a connected member."""
        members = list(self.members.values())
        count = len(members)
        if not count:
            return None
        start = self._cursor % count
        busy: Member | None = None
        busy_queued = 0
        offline: Member | None = None
        for i in range(count):
            entry = members[(start + i) % count]
            session = entry[0]
            if session is exclude:
                continue
            if session.connection is None:
                if offline is None and session.persistent and qos and entry[1] and not connected:
                    offline = entry
                continue
            queued = session.queued
            if not queued and len(session.inflight) < session.max_inflight:
                self._cursor = start + i + 1
                return entry
            if busy is None or queued < busy_queued:
                busy, busy_queued = entry, queued
        chosen = busy if busy is not None else offline
        if chosen is not None:
            self._cursor = members.index(chosen) + 1
        return chosen

    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: Fanout[Any] | None
    ) -> None:
        """The router's entry point (the group is in the trie with QoS 2, so ``qos`` is the
        message's own)."""
        cluster = self.cluster
        if cluster is not None and not cluster.node_local(message.topic):
            return  # cluster mode: it comes to a member through JetStream
        entry = self.pick(qos)
        if entry is None:
            self.dropped += 1
            return
        self.delivered += 1
        watch = self.watch
        if watch is None:
            deliver_to(entry, message, qos, parts, self.name)
        else:
            deliver_to(entry, message, qos, parts, watch(self, entry, message, self.name))


def deliver_to(
    member: Member, message: Publish, qos: int, parts: Fanout[Any] | None, name: Share
) -> None:
    """Hand ``message`` to one member, at most at the QoS it was granted; ``name`` is what
    the delivery carries (the group's name, or a work queue's Attempt)."""
    session, granted, options = member
    qos = qos if qos < granted else granted
    if options is None:
        session.deliver(message, qos, False, parts, name)
        return
    retain = message.retain and options.retain_as_published
    session.deliver(
        message, qos, retain, None if retain else parts, name,
        options.subscription_ids or None,
    )


class ShareGroups:
    """Every share group, by ``$share/<group>/<filter>``; keeps the trie in step."""

    def __init__(self, trie: SubscriptionTrie) -> None:
        self.trie = trie
        self.groups: dict[str, ShareGroup] = {}
        self.lost = 0  # messages given back by a member no other member could take
        # called for each new group (the work queues set its ack deadline watch)
        self.on_new: Callable[[ShareGroup], None] | None = None
        # cluster mode (mqttd.clustering.groups): told of every group made and gone
        self.cluster: ClusterGroups | None = None

    def add(
        self, topic_filter: str, session: Session, qos: int, options: SubOptions | None = None
    ) -> bool:
        """Make ``session`` a member (or change its QoS); InvalidTopic if malformed.
        Returns True if it is a new membership."""
        group = self.groups.get(topic_filter)
        if group is None:
            name, inner = parse_shared(topic_filter)
            group = self.groups[topic_filter] = ShareGroup(topic_filter, name, inner)
            self.trie.add(inner, _KEY_PREFIX + topic_filter, group, 2)
            if self.on_new is not None:
                self.on_new(group)
            if self.cluster is not None:
                group.cluster = self.cluster
                self.cluster.group_added(group)
        new = session.client_id not in group.members
        group.members[session.client_id] = (session, qos, options)
        session.group_member = True
        return new

    def remove(self, topic_filter: str, client_id: str) -> bool:
        group = self.groups.get(topic_filter)
        if group is None or group.members.pop(client_id, None) is None:
            return False
        if not group.members:
            del self.groups[topic_filter]
            self.trie.remove(group.filter, _KEY_PREFIX + topic_filter)
            if self.cluster is not None:
                self.cluster.group_removed(group)
        return True

    def stats(self) -> dict[str, int]:
        groups = self.groups.values()
        return {
            "shared_subscriptions": len(self.groups),
            "shared_members": sum(len(g.members) for g in groups),
            "shared_delivered": sum(g.delivered for g in groups),
            "shared_redelivered": sum(g.redelivered for g in groups),
            "shared_dropped": sum(g.dropped for g in groups) + self.lost,
        }
