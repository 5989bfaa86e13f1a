"""Flow control: publishers are paced by the subscribers they feed.

The model, subscriber side. A subscriber's *backlog* is its connection's unsent output
(bytes) and its session's out-queue (messages waiting for the inflight window). When a
message reaches a subscriber whose output is over ``output_high_watermark_bytes`` or whose
queue is over ``queue_high_watermark_messages``, the subscriber is *backlogged*: the message
is still delivered (nothing is dropped for a subscriber that keeps reading), but the
publisher that sent it is *held*. It drains when both are at half their watermark or less.

Publisher side. A held publisher's remaining packets (those read with the one that fed the
backlogged subscriber) wait in its connection, and the service stops reading from it, so TCP
slows the client down. It is released when every subscriber it waits for has drained; then
the held packets are handled first. A publisher is held only by the subscribers its own
messages reach, so one feeding only fast subscribers is never paused for a slow one, and
all the publishers one subscriber holds are released together (none starves the others).

Stalled subscribers. A subscriber that holds someone and whose output has not moved for
``stalled_output_timeout_s`` (it stopped reading, or stopped acknowledging) is *stalled*: it
stops pacing (its publishers are released, and it holds none until it reads again), its
QoS 0 messages over ``qos0_buffer_bytes`` of unsent output are dropped and counted, and its
QoS 1/2 messages are queued within its budget (on disk when persistent). So it holds a
publisher back at most once for that timeout, not once per message. Any output sent to it
again makes it pace again.

Sans-IO: the service reports output sent (:meth:`Pacing.sent`) with a monotonic clock and
asks, while a held reader waits, when to look for stalled subscribers
(:meth:`Pacing.stall_deadline`, :meth:`Pacing.release_stalled`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mqttd.connection import Connection

log = logging.getLogger("mqttd.broker")


def gate(conn: Connection) -> Connection:
    """Make ``conn`` (a connection with no peer) a gate publishers can be held at, released
    only explicitly (:meth:`Pacing.release`): it never counts as stalled."""
    conn.backlogged = True
    conn.progress_at = math.inf
    return conn


@attrs.define(eq=False)
class Pacing:
    stall_after_s: float = 5.0
    # wakes the readers of released publishers (the service's ReadPauses)
    wake: Callable[[], None] = lambda: None
    # the publisher whose packets are being handled (None: a timer, a will, a bridge link)
    current: Connection | None = None
    held: set[Connection] = attrs.Factory(set)  # publishers held now
    # counters
    holds: int = 0  # a publisher held by a backlogged subscriber
    stalls: int = 0  # a subscriber found stalled (it stopped pacing)

    def fed(self, sub: Connection) -> None:
        """A message was just given to ``sub``, whose backlog is over a high watermark:
        hold the publisher that sent it (after this packet)."""
        pub = self.current
        if pub is None or pub is sub or sub.stalled or pub.closing:
            return
        if not sub.backlogged:
            sub.backlogged = True
            sub.backlogged_at = time.monotonic()
        self.hold(pub, sub)

    def hold(self, pub: Connection, sub: Connection) -> None:
        """Hold ``pub`` until ``sub`` releases it: a subscriber, or a gate such as the
        store's (see :func:`gate`)."""
        waiters = sub.waiters
        if waiters is None:
            waiters = sub.waiters = set()
        elif pub in waiters:
            return
        waiters.add(pub)
        held_by = pub.held_by
        if held_by is None:
            held_by = pub.held_by = set()
        held_by.add(sub)
        self.held.add(pub)
        self.holds += 1
        pub.times_held += 1

    def sent(self, sub: Connection, now: float) -> None:
        """Output of ``sub`` was written (at ``now``, monotonic): it moves, so it is not
        stalled; release its publishers once its backlog has drained."""
        sub.progress_at = now
        sub.stalled = False
        if sub.backlogged and self.drained(sub):
            self.release(sub)

    def drained(self, sub: Connection) -> bool:
        if sub.outbox_bytes > sub.pace_bytes // 2:
            return False
        session = sub.session
        return session is None or len(session.out) <= sub.pace_messages // 2

    def release(self, sub: Connection) -> None:
        """``sub`` no longer holds anyone (drained, stalled, or gone)."""
        sub.backlogged = False
        waiters, sub.waiters = sub.waiters, None
        if not waiters:
            return
        woken = False
        for pub in waiters:
            held_by = pub.held_by
            if held_by is not None:
                held_by.discard(sub)
                if not held_by:
                    self.held.discard(pub)
                    woken = True
        if woken:
            self.wake()

    def stall_deadline(self, pub: Connection) -> float | None:
        """When (monotonic) the first subscriber holding ``pub`` counts as stalled if its
        output does not move before; None when nothing holds it."""
        held_by = pub.held_by
        if not held_by:
            return None
        return min(max(sub.backlogged_at, sub.progress_at) for sub in held_by) + (
            self.stall_after_s
        )

    def release_stalled(self, pub: Connection, now: float) -> int:
        """Mark stalled the subscribers holding ``pub`` whose output has not moved for the
        timeout, releasing everyone they hold. Returns how many."""
        held_by = pub.held_by
        if not held_by:
            return 0
        stalled = [
            sub for sub in held_by
            if now - max(sub.backlogged_at, sub.progress_at) >= self.stall_after_s
        ]
        for sub in stalled:
            sub.stalled = True
            sub.stalls += 1
            self.stalls += 1
            log.warning(
                "client %s: output stalled for %.1fs (%d bytes unsent, %d queued): it no "
                "longer paces its publishers; its QoS 0 messages are dropped over the buffer "
                "limit, QoS 1/2 queued within its budget", sub.name, self.stall_after_s,
                sub.outbox_bytes, len(sub.session.out) if sub.session is not None else 0,
            )
            self.release(sub)
        return len(stalled)

    def forget(self, conn: Connection) -> None:
        """The connection is gone: it holds no one and waits for no one."""
        self.release(conn)
        held_by, conn.held_by = conn.held_by, None
        for sub in held_by or ():
            if sub.waiters is not None:
                sub.waiters.discard(conn)
        self.held.discard(conn)
        conn.held_packets = None
        if self.current is conn:
            self.current = None
