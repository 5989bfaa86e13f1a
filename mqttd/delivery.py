"""What one outbound delivery is, and the one place a delivery is encoded for its client.

A routed message is encoded at most once per QoS and protocol family, and the bytes are
shared by every subscriber it reaches: that per-message cache is a :data:`Fanout`. A
delivery waiting for, or in, a session's inflight window is a :class:`Delivery`.

Hot path: a Delivery is a NamedTuple (one object, as the plain tuple it replaces) and a
Fanout a plain list with named slots, since a class instance per routed message would cost
more than the encoding it saves at one subscriber.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import attrs

from mqttd import v5
from mqttd.codec.packets import PROTOCOL_5, Publish, encode_publish_parts


@attrs.define(eq=False, slots=True)
class Attempt:
    """A delivery of a job through a consumer group (a work queue), when it is more than a
    first delivery with nothing to watch: its number (``deliveries``, this one included),
    when it first failed (epoch seconds, 0.0 before any failure), and ``superseded`` once
    its ack deadline passed and another member got a copy (mqttd.workqueues). A first
    delivery without an ack deadline carries just the share name (a ``str``)."""

    share: str
    deliveries: int = 1
    first_failure: float = 0.0
    superseded: bool = False


class JobOwner(Protocol):
    """Where the queue of a :class:`RemoteJob` lives (cluster mode: mqttd.clustering.groups)."""

    def settled(self, job: RemoteJob, session: Any, message: Publish, reason_code: int) -> None:
        """The member acknowledged (``reason_code`` below 0x80) or rejected the job."""

    def given_back(self, job: RemoteJob, session: Any, message: Publish, sent: bool) -> None:
        """The member's connection ended with the job unacknowledged (``sent``: in flight)."""


@attrs.define(eq=False, slots=True)
class RemoteJob(Attempt):
    """A job of a cluster-wide consumer group (cluster mode): its queue is not this node's
    work queues' but JetStream's, so what the member answers goes to ``owner``; ``token``
    is the owner's handle of the job (its JetStream ack subject)."""

    owner: JobOwner | None = None
    token: str = ""


Share = str | Attempt
"""What a delivery through a shared subscription carries: its ``$share/...`` name, or an
:class:`Attempt` of a work queue."""


def share_name(share: Share) -> str:
    return share if share.__class__ is str else share.share  # type: ignore[union-attr,return-value]


def stored_share(share: str, attempt: int, first_failure: float | None) -> Share:
    """The share of a delivery read back from the store (persistence.ops.AddSharedDelivery)."""
    if attempt <= 1 and first_failure is None:
        return share
    return Attempt(share, attempt, first_failure or 0.0)


class Delivery(NamedTuple):
    """One message on its way to one session.

    ``message`` is None in an inflight entry once a QoS 2 PUBREC has come back (PUBREL sent).
    ``seq`` numbers a persistent session's deliveries (0 in clean sessions). ``share`` is the
    ``$share/...`` name of the shared subscription it came through, or its work-queue
    :class:`Attempt` (stored with the delivery), and ``sub_ids`` the identifiers of the 5.0
    subscriptions it matched (None otherwise; kept in memory only)."""

    message: Publish | None
    qos: int
    retain: bool
    seq: int
    share: Share | None
    sub_ids: tuple[int, ...] | None


# Building a Delivery by tuple.__new__ skips NamedTuple's Python-level __new__ (the hot path).
new_delivery = tuple.__new__

# The per-message encoding cache, shared by the subscribers of one routed message: slots
# V3 + qos hold the 3.1/3.1.1 (head, tail) per QoS, V5 + qos the 5.0 ones (when nothing in
# them is specific to one connection), STORED_ID the store's message id once a persistent
# session has stored the message (0 before).
Fanout = list
V3 = 0
STORED_ID = 3
V5 = 4


def new_fanout() -> Fanout[Any]:
    return [None, None, None, 0, None, None, None]


class Recipient(v5.Terms, Protocol):
    """What encoding needs of the client's connection: its protocol level and 5.0 terms."""

    protocol_level: int


def encode_delivery(
    conn: Recipient,
    message: Publish,
    qos: int,
    retain: bool,
    fanout: Fanout[Any] | None,
    sub_ids: tuple[int, ...] | None,
) -> tuple[bytes, bytes] | None:
    """The PUBLISH of one delivery for ``conn`` as (head, tail) around the packet id: the
    one 3.1.1/5.0 switch. Shared through ``fanout`` where nothing in it is specific to this
    connection (``None``: encode for this delivery only, e.g. a retained message sent on
    SUBSCRIBE). None when it is larger than a 5.0 client's Maximum Packet Size."""
    if conn.protocol_level == PROTOCOL_5:
        return v5.publish_parts(conn, message, qos, retain, fanout, sub_ids)
    if fanout is None:
        return encode_publish_parts(message.topic, message.payload, qos, retain)
    parts = fanout[qos]
    if parts is None:
        parts = fanout[qos] = encode_publish_parts(message.topic, message.payload, qos, retain)
    return parts  # type: ignore[no-any-return]


def encode_resend(
    conn: Recipient, message: Publish, qos: int, retain: bool, sub_ids: tuple[int, ...] | None
) -> tuple[bytes, bytes] | None:
    """A delivery sent again on a new connection (DUP=1), as :func:`encode_delivery`."""
    if conn.protocol_level == PROTOCOL_5:
        return v5.publish_parts(conn, message, qos, retain, None, sub_ids, True)
    return encode_publish_parts(message.topic, message.payload, qos, retain, True)
