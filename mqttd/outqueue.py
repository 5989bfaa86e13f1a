"""A session's out-queue: the deliveries waiting for its inflight window, within budgets.

The queue holds QoS 1/2 deliveries the window has no room for, or whose client is away. It
owns the budgets (messages, payload bytes), the overflow policy, and the count of every
message it does not deliver (dropped by a budget, expired while queued, QoS 0 dropped
because the client's output was backed up).

A persistent session's queue is a window onto the store: the oldest queued deliveries (at
most ``page_size``) are in RAM in ``ram``; newer ones are on disk only (``disk_count`` of
them, every one with a ``seq`` above ``disk_after``) and are read back a page at a time as
the client drains the queue, so a long offline backlog costs no RAM. A clean session's
queue is in RAM only.

Synchronous, like the session that owns it: the broker calls it while handling a packet.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import attrs

from mqttd import v5
from mqttd.codec.packets import Publish
from mqttd.delivery import Delivery, stored_share
from persistence import ops

if TYPE_CHECKING:
    from persistence.journal import Journal

log = logging.getLogger(__name__)

DROP_OLDEST = "drop_oldest"
DROP_NEW = "drop_new"
REFUSE = "refuse"  # as drop_new, and a 5.0 publisher is told (Quota exceeded)
DISCONNECT = "disconnect"
DROP_LOG_INTERVAL_S = 60.0


@attrs.frozen
class QueueLimits:
    """A session's queue budget: at most ``max_messages`` and ``max_bytes`` of payload
    (-1: no limit); ``policy`` says what happens to a message over it."""

    max_messages: int = 1000
    max_bytes: int = -1
    policy: str = DROP_OLDEST
    page_size: int = 256  # deliveries of a persistent session's queue held in RAM


class Bounded(Protocol):
    """A queue that refuses messages when full (an OutQueue, the delayed queue)."""

    def over_budget(self, extra_messages: int = 0, extra_bytes: int = 0) -> bool: ...

    def count_refused(self) -> None: ...


@attrs.define(eq=False)
class DropCounters:
    """Drops across all sessions (shared by the broker's sessions)."""

    dropped: int = 0  # QoS 1/2 messages dropped by a queue budget
    dropped_qos0: int = 0  # QoS 0 messages dropped because the client's output was backed up
    refused: int = 0  # QoS 1/2 messages a full queue refused (overflow_policy refuse)
    # the queues under overflow_policy refuse that are full (the next message would not
    # fit): the engine refuses a 5.0 publisher's message for them before routing it
    full: set[Bounded] = attrs.Factory(set)


@attrs.define(eq=False)
class OutQueue:
    client_id: str
    journal: Journal | None  # persistent sessions only
    limits: QueueLimits = attrs.Factory(QueueLimits)
    counters: DropCounters = attrs.Factory(DropCounters)
    ram: deque[Delivery] | None = None  # created when first needed (idle sessions are many)
    bytes: int = 0  # payload bytes of everything queued (RAM, being read, disk)
    disk_count: int = 0  # queued on disk only (persistent sessions)
    disk_after: int = 0  # every disk-only seq is above this
    disk_sizes: array[int] = attrs.Factory(lambda: array("Q"))  # payload sizes, seq order
    disk_head: int = 0  # disk_sizes[disk_head:] are the disk-only entries
    loading: list[int] = attrs.Factory(list)  # sizes of the page being read back from disk
    pending_drops: int = 0  # drops that fall on the page being read back
    # drops of disk-only messages decided while a page is read back: the store must drop
    # the oldest rows *after* that page, which is only known once it has arrived
    pending_disk_drops: int = 0
    # counters
    dropped: int = 0
    dropped_qos0: int = 0
    refused: int = 0
    expired: int = 0  # 5.0 messages whose expiry interval passed while queued
    _next_drop_log: float = 0.0

    def __len__(self) -> int:
        """Messages waiting (in RAM, being read back, or on disk)."""
        held = len(self.ram) if self.ram is not None else 0
        return held + len(self.loading) + self.disk_count - self.pending_drops

    def restore(self, count: int, after: int, sizes: Iterable[int]) -> None:
        """A restored session's queue: ``count`` deliveries on disk, all after ``after``."""
        self.disk_count = count
        self.disk_after = after
        self.disk_sizes = array("Q", sizes)
        self.bytes = sum(self.disk_sizes)

    def over_budget(self, extra_messages: int = 0, extra_bytes: int = 0) -> bool:
        limits = self.limits
        if 0 <= limits.max_messages < len(self) + extra_messages:
            return True
        return 0 <= limits.max_bytes < self.bytes + extra_bytes

    def refuses(self, size: int) -> bool:
        """Under drop_new, refuse or disconnect: True (counted as dropped, or refused) when
        one more message of ``size`` payload bytes does not fit. Under drop_oldest it always
        fits (:meth:`trim` makes room after it is added)."""
        policy = self.limits.policy
        if policy == DROP_OLDEST or not self.over_budget(1, size):
            return False
        if policy == REFUSE:
            self.count_refused()
        else:
            self._count_drop()
        return True

    # -- adding ------------------------------------------------------------------------

    def hold(self, delivery: Delivery, size: int) -> None:
        """Queue a clean session's delivery (in RAM) and keep the budget."""
        ram = self.ram
        if ram is None:
            ram = self.ram = deque()
        ram.append(delivery)
        self.bytes += size
        self.trim()
        self._check_full()

    def place(self, delivery: Delivery, size: int, online: bool) -> None:
        """Queue a persistent session's delivery, already journalled, in RAM while its
        client is online and the queue fits one page, else on disk only. The caller
        journals the delivery and then calls :meth:`trim` (a drop must follow the add)."""
        if online and not self.loading and not self.disk_count and (
            self.ram is None or len(self.ram) < self.limits.page_size
        ):
            ram = self.ram
            if ram is None:
                ram = self.ram = deque()
            ram.append(delivery)
        else:
            if not self.disk_count and not self.loading:
                self.disk_after = delivery.seq - 1
            self.disk_count += 1
            self.disk_sizes.append(size)
        self.bytes += size
        self._check_full()

    # -- budgets -----------------------------------------------------------------------

    def trim(self) -> None:
        """drop_oldest: drop the oldest queued messages until the queue fits its budget."""
        while len(self) and self.over_budget():
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._count_drop()
        journal = self.journal
        if self.ram:
            delivery = self.ram.popleft()
            self.bytes -= len(delivery.message.payload)  # type: ignore[union-attr]
            if journal is not None:
                journal.submit(ops.RemoveDelivery(self.client_id, delivery.seq))
        elif self.pending_drops < len(self.loading):
            # the oldest are on the page being read back: drop them when it arrives
            self.bytes -= self.loading[self.pending_drops]
            self.pending_drops += 1
        elif self.loading and self.disk_count:
            # the oldest is on disk after the page being read back: drop it when it arrives
            self.bytes -= self._take_from_disk(1)[0]
            self.pending_disk_drops += 1
        elif self.disk_count and journal is not None:
            self.bytes -= self._take_from_disk(1)[0]
            journal.submit(ops.DropOldestQueued(self.client_id, self.disk_after))

    def _take_from_disk(self, count: int) -> list[int]:
        """Take the ``count`` oldest disk-only entries off the disk books (their bytes stay
        queued); their sizes."""
        head = self.disk_head
        sizes = self.disk_sizes[head : head + count].tolist()
        self.disk_count -= count
        self.disk_head = head + count
        if self.disk_head > 4096 and self.disk_head * 2 > len(self.disk_sizes):
            del self.disk_sizes[: self.disk_head]
            self.disk_head = 0
        return sizes

    def _count_drop(self) -> None:
        self.dropped += 1
        self.counters.dropped += 1
        self._log_drop()

    def count_refused(self) -> None:
        self.refused += 1
        self.counters.refused += 1
        self._log_drop()

    def _check_full(self) -> None:
        if self.limits.policy == REFUSE and self.over_budget(1, 0):
            self.counters.full.add(self)

    def count_qos0_drop(self) -> None:
        """A QoS 0 message not sent because the client's output was backed up."""
        self.dropped_qos0 += 1
        self.counters.dropped_qos0 += 1
        self._log_drop()

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now >= self._next_drop_log:  # at most once a minute per client
            self._next_drop_log = now + DROP_LOG_INTERVAL_S
            log.warning(
                "client %s: dropping messages (%s; queue %d messages, %d bytes): %d dropped, "
                "%d refused, %d QoS 0 dropped so far", self.client_id,
                self.limits.policy, len(self), self.bytes, self.dropped, self.refused,
                self.dropped_qos0,
            )

    # -- taking ------------------------------------------------------------------------

    def next(self) -> Delivery | None:
        """The oldest delivery held in RAM that has not expired, off the queue; None when
        RAM holds none (see :meth:`read_ahead`). Expired ones are counted and forgotten."""
        ram = self.ram
        now = 0.0
        while ram:
            delivery = ram.popleft()
            message: Publish = delivery.message  # type: ignore[assignment]
            self.bytes -= len(message.payload)
            if message.expires_at is not None:
                now = now or time.time()
                if message.expires_at <= now:
                    self.expired += 1  # not delivered after its expiry interval
                    if self.journal is not None:
                        self.journal.submit(ops.RemoveDelivery(self.client_id, delivery.seq))
                    continue
            return delivery
        return None

    def read_ahead(self, on_page: Callable[[list[ops.QueuedRow]], None]) -> None:
        """Read the next page back from disk when RAM runs low (half a page) and no read
        is under way; ``on_page`` gets the rows (see :meth:`page_loaded`)."""
        if not self.disk_count or self.loading:
            return
        held = len(self.ram) if self.ram is not None else 0
        page_size = self.limits.page_size
        if held > page_size // 2:
            return
        count = min(page_size - held, self.disk_count)
        self.loading = self._take_from_disk(count)
        self.journal.submit(  # type: ignore[union-attr]
            ops.LoadQueued(self.client_id, self.disk_after, count, on_page)
        )

    def page_loaded(
        self,
        rows: list[ops.QueuedRow],
        sub_ids_for: Callable[[str], tuple[int, ...] | None],
    ) -> None:
        """A page read back from disk: into RAM, less the drops decided while it was read
        (``sub_ids_for`` gives a message's 5.0 subscription identifiers)."""
        expected = len(self.loading)
        skip, self.pending_drops = self.pending_drops, 0
        self.loading = []
        if len(rows) < expected:  # rows removed under us (should not happen): stay honest
            log.error("session %s: %d queued rows missing", self.client_id, expected - len(rows))
            self.bytes = max(0, self.bytes - (expected - len(rows)))
        if rows:
            self.disk_after = rows[-1].seq
        journal: Journal = self.journal  # type: ignore[assignment]
        for row in rows[:skip]:  # dropped while being read back
            journal.submit(ops.RemoveDelivery(self.client_id, row.seq))
        disk_drops, self.pending_disk_drops = self.pending_disk_drops, 0
        for _ in range(disk_drops):  # the oldest on disk after this page
            journal.submit(ops.DropOldestQueued(self.client_id, self.disk_after))
        ram = self.ram
        if ram is None:
            ram = self.ram = deque()
        for row in rows[skip:]:
            if row.properties is None and row.expires_at is None:
                message = Publish(row.topic, row.payload, row.qos, row.retain)
            else:
                message = v5.restored_message(
                    row.topic, row.payload, row.qos, row.retain, row.properties, row.expires_at
                )
            share = None if row.share is None else stored_share(
                row.share, row.attempt, row.first_failure
            )
            ram.append(Delivery(message, row.qos, row.retain, row.seq, share,
                                sub_ids_for(row.topic)))

    def take_shared(self) -> list[Delivery]:
        """Take the deliveries held in RAM that came through shared subscriptions, oldest
        first (disk-only entries, a backlog beyond one page, stay)."""
        ram = self.ram
        if not ram or all(delivery.share is None for delivery in ram):
            return []
        taken: list[Delivery] = []
        kept: deque[Delivery] = deque()
        for delivery in ram:
            if delivery.share is None:
                kept.append(delivery)
                continue
            taken.append(delivery)
            self.bytes -= len(delivery.message.payload)  # type: ignore[union-attr]
            if self.journal is not None:
                self.journal.submit(ops.RemoveDelivery(self.client_id, delivery.seq))
        self.ram = kept
        return taken

    def evict(self) -> None:
        """Offline: hand the deliveries held in RAM back to the disk region (they are
        stored already), so an offline session's queue costs no RAM. Not while a page is
        being read back (its rows lie between the two); that page stays in RAM."""
        ram = self.ram
        if self.journal is None or not ram or self.loading:
            return
        sizes = array("Q", (len(d.message.payload) for d in ram))  # type: ignore[union-attr]
        sizes.extend(self.disk_sizes[self.disk_head :])
        self.disk_sizes = sizes
        self.disk_head = 0
        self.disk_after = ram[0].seq - 1
        self.disk_count += len(ram)
        self.ram = None
