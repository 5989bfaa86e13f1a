"""Typed operations the broker hands to the store, applied in order by the writer.

They are NamedTuples: typed, immutable and as cheap to create as plain tuples (one
``AddDelivery`` per persistent delivery is on the hot path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class SaveSession(NamedTuple):
    """Create or update a persistent session; ``disconnected_at`` (epoch seconds) is None while
    its client is connected. ``expiry_s`` replaces the stored value every time: None (3.1.1)
    means the configured ``persistence.session_expiry_s``, -1 never, otherwise the seconds
    the session lives on after its client disconnects (MQTT 5 Session Expiry Interval)."""

    client_id: str
    disconnected_at: float | None
    expiry_s: int | None = None


class DeleteSession(NamedTuple):
    """Delete a session with its subscriptions, queued/inflight messages and QoS 2 state."""

    client_id: str


class AddSubscription(NamedTuple):
    """Add or replace a subscription. ``options`` is the MQTT 5 subscription options byte
    without the QoS bits (bit 2 No Local, bit 3 Retain As Published, bits 4-5 Retain
    Handling; 0 in 3.1.1), ``subscription_id`` the Subscription Identifier (0: none)."""

    client_id: str
    filter: str
    qos: int
    options: int = 0
    subscription_id: int = 0


class RemoveSubscription(NamedTuple):
    client_id: str
    filter: str


class AddMessage(NamedTuple):
    """A message body, stored once however many sessions it is queued for. ``properties``
    is the encoded MQTT 5 property block of the PUBLISH (opaque to the store; None: none),
    ``expires_at`` the wall-clock epoch seconds at which it expires (None: never)."""

    message_id: int
    topic: str
    payload: bytes
    qos: int
    properties: bytes | None = None
    expires_at: float | None = None


class AddDelivery(NamedTuple):
    """Queue ``message_id`` for a session at position ``seq``; ``packet_id`` non-zero when
    it is sent at once (inflight)."""

    client_id: str
    seq: int
    message_id: int
    qos: int
    retain: bool
    packet_id: int


class AddSharedDelivery(NamedTuple):
    """:class:`AddDelivery` of a message that came through a consumer group: ``share`` is
    the ``$share/<group>/<filter>`` it came through, ``attempt`` the number of this delivery
    of the job (1 for the first), ``first_failure`` when the job first failed (epoch
    seconds; None before any failure)."""

    client_id: str
    seq: int
    message_id: int
    qos: int
    retain: bool
    packet_id: int
    share: str
    attempt: int = 1
    first_failure: float | None = None


class SetInflight(NamedTuple):
    """A queued delivery was sent with ``packet_id``."""

    client_id: str
    seq: int
    packet_id: int


class SetReleased(NamedTuple):
    """QoS 2: PUBREC received, PUBREL sent; the PUBLISH is never sent again."""

    client_id: str
    seq: int


class RemoveDelivery(NamedTuple):
    """Acknowledged (or dropped): the message body goes when no delivery refers to it."""

    client_id: str
    seq: int


class DropOldestQueued(NamedTuple):
    """Drop the oldest queued (never sent) delivery with a ``seq`` above ``after_seq``."""

    client_id: str
    after_seq: int


class AddInbound(NamedTuple):
    """QoS 2 inbound: packet id received, PUBREL not yet."""

    client_id: str
    packet_id: int


class RemoveInbound(NamedTuple):
    client_id: str
    packet_id: int


class SetRetained(NamedTuple):
    """Set the retained message of ``topic``; ``properties`` and ``expires_at`` as in
    :class:`AddMessage`."""

    topic: str
    payload: bytes
    qos: int
    properties: bytes | None = None
    expires_at: float | None = None


class DeleteRetained(NamedTuple):
    topic: str


class AddJob(NamedTuple):
    """A consumer group's job waiting for its retry (after a negative acknowledgement, an
    ack deadline or its member leaving): ``message_id`` (a stored message, kept while the
    job refers to it), the deliveries made so far, when it first failed, when it is due
    (epoch seconds), why it failed last, and the member to avoid (None: any)."""

    job_id: int
    share: str
    message_id: int
    deliveries: int
    first_failure: float
    due_at: float
    reason: str
    exclude: str | None = None


class RemoveJob(NamedTuple):
    """The job was handed to a member (or dead-lettered, or it expired)."""

    job_id: int


class AddDelayed(NamedTuple):
    """A delayed publish (``$delayed/<seconds>/<topic>``), to be published to ``topic`` at
    ``due_at`` (epoch seconds); the other fields as in :class:`AddMessage`."""

    delayed_id: int
    due_at: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: bytes | None = None
    expires_at: float | None = None


class RemoveDelayed(NamedTuple):
    """The delayed message was published (or dropped, expired)."""

    delayed_id: int


class QueuedRow(NamedTuple):
    """A queued delivery read back by :class:`LoadQueued`. Expired rows are returned too
    (the session counts what it asked for); ``expires_at`` lets the caller drop them."""

    seq: int
    qos: int
    retain: bool
    topic: str
    payload: bytes
    properties: bytes | None = None
    expires_at: float | None = None
    share: str | None = None  # as in AddSharedDelivery (None: not through a group)
    attempt: int = 0
    first_failure: float | None = None


class JobRow(NamedTuple):
    """A job waiting for its retry (see ops.AddJob), with its message."""

    job_id: int
    share: str
    message_id: int
    deliveries: int
    first_failure: float
    due_at: float
    reason: str
    exclude: str | None
    topic: str
    payload: bytes
    qos: int
    properties: bytes | None
    expires_at: float | None


class DelayedRow(NamedTuple):
    """A delayed publish (see ops.AddDelayed)."""

    delayed_id: int
    due_at: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: bytes | None
    expires_at: float | None


class Barrier(NamedTuple):
    """Writes nothing: its ticket lets a reply wait for something stored elsewhere, whose
    owner holds the commit back until it is stored (cluster mode: a message to a
    cluster-wide consumer group, stored in JetStream)."""


class LoadQueued(NamedTuple):
    """Read (in order with the writes) up to ``limit`` queued deliveries with a ``seq``
    above ``after_seq``; ``callback`` gets the rows in the trio task after the commit."""

    client_id: str
    after_seq: int
    limit: int
    callback: Callable[[list[QueuedRow]], None]


Op = (
    SaveSession | DeleteSession | AddSubscription | RemoveSubscription | AddMessage
    | AddDelivery | SetInflight | SetReleased | RemoveDelivery | DropOldestQueued | AddInbound
    | RemoveInbound | SetRetained | DeleteRetained | LoadQueued | AddSharedDelivery | AddJob
    | RemoveJob | AddDelayed | RemoveDelayed | Barrier
)
