"""Synchronous routing of one message to the sessions subscribed to its topic.

The subscription trie stores, per client, the object to deliver to (a ``Session``,
or anything else with the same ``deliver`` method: the seam where a bridge or a
cluster link plugs in) and the granted QoS. ``route`` runs inside the publisher's
reader task with no ``await``: the message is encoded at most once per QoS and the
bytes are shared by every subscriber.

With an ``authorizer`` (set by the broker when an ACL is configured), each delivery to a
session is checked with ``can_receive`` (cached per client and topic); without one the
loop has no per-delivery check at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from mqttd.codec.packets import Publish
from mqttd.delivery import Fanout
from mqttd.trie import DEFAULT_CACHE_SIZE, Match, SubscriptionTrie

if TYPE_CHECKING:
    from mqttd.acl import CachedAuthorizer

MAX_ALLOWED_TOPICS = DEFAULT_CACHE_SIZE


class Subscriber(Protocol):
    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: Fanout[Any] | None
    ) -> None: ...


class Router:
    def __init__(self, trie: SubscriptionTrie | None = None) -> None:
        self.trie = trie if trie is not None else SubscriptionTrie()
        self.messages_routed = 0
        self.messages_unmatched = 0
        self.deliveries = 0
        self.denied = 0  # deliveries withheld by the authorizer
        self.authorizer: CachedAuthorizer | None = None
        # topic -> (the trie's match list, the targets allowed to receive, how many not)
        self._allowed: dict[str, tuple[list[Match], list[Match], int]] = {}

    def route(self, message: Publish, publisher: object = None, bridge: bool = False) -> int:
        """Deliver ``message`` to every matching subscriber at min(publish QoS, granted
        QoS), once per client however many of its filters match. ``publisher``: the
        publishing session, for 5.0 No Local subscriptions; with ``bridge`` it gets nothing
        at all (a bridge does not get its own messages back). Returns how many."""
        self.messages_routed += 1
        targets = self.trie.match(message.topic)
        if bridge:
            targets = [target for target in targets if target[0] is not publisher]
        if not targets:
            self.messages_unmatched += 1
            return 0
        if self.authorizer is not None:
            targets = self._allowed_targets(message, targets, self.authorizer)
            if not targets:
                return 0
        parts: Fanout[Any] = [None, None, None, 0, None, None, None]  # new_fanout(), inlined
        publish_qos = message.qos
        delivered = len(targets)
        for subscriber, granted, options in targets:
            if options is None:
                subscriber.deliver(  # type: ignore[attr-defined]
                    message, publish_qos if publish_qos < granted else granted, False, parts
                )
            elif options.no_local and subscriber is publisher:
                delivered -= 1
            else:
                retain = message.retain and options.retain_as_published
                subscriber.deliver(  # type: ignore[attr-defined]
                    message, publish_qos if publish_qos < granted else granted, retain,
                    None if retain else parts, None, options.subscription_ids or None,
                )
        self.deliveries += delivered
        return delivered

    def _allowed_targets(
        self, message: Publish, targets: list[Match], authorizer: CachedAuthorizer
    ) -> list[Match]:
        """The targets with read access to the topic. They are kept per topic, as long as
        the trie returns the same (cached) match list and :meth:`acl_changed` is not called,
        so a repeated topic costs one lookup, not one check per subscriber. A session whose
        login is not known (restored from the store and not reconnected since) is not
        checked: its subscriptions were checked when they were made, and the store does not
        keep user names yet."""
        topic = message.topic
        entry = self._allowed.get(topic)
        if entry is None or entry[0] is not targets:
            can_receive = authorizer.can_receive
            allowed = [
                target for target in targets
                if not getattr(target[0], "login_known", False)
                or can_receive(
                    target[0].client_id, target[0].username, topic  # type: ignore[attr-defined]
                )
            ]
            if len(self._allowed) >= MAX_ALLOWED_TOPICS:
                self._allowed.clear()
            entry = self._allowed[topic] = (targets, allowed, len(targets) - len(allowed))
        _, allowed, denied = entry
        self.denied += denied
        return allowed

    def acl_changed(self) -> None:
        """Forget the per-topic receive checks (a new ACL, or a session logged in as a
        possibly different user)."""
        self._allowed.clear()
