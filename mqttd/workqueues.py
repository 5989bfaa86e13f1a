"""Consumer groups as work queues: retries, ack deadlines, dead letters.

Every message a consumer group (:mod:`mqttd.share_groups`) hands to a member at QoS 1/2 is a
*job*. What becomes of it:

- **Acknowledged** (PUBACK, or PUBREC, with a reason code below 0x80): done.
- **Rejected** (5.0: PUBACK or PUBREC with a reason code of 0x80 or more, "I could not
  process this"): the job waits for a retry, ``retry_delay_initial_s`` after the first
  failure, then ``retry_delay_multiplier`` times longer each time up to
  ``retry_delay_max_s``, each wait shortened at random by up to ``retry_delay_jitter`` of
  it. Then it goes to another member (the same one when it is alone). Durable where the
  session is: a job a persistent member rejected waits stored (table ``jobs``, its body in
  ``messages``), written in the commit that removes it from the member, so that it survives
  a restart and a ``kill -9``; one a clean session rejected was never stored and waits in
  RAM.
- **Held past the ack deadline** (``ack_timeout_s``, when set): while a member holds a job
  sent and unacknowledged that long, a copy goes to another *connected* member and the
  member's own copy is *superseded*: acknowledging it later counts as a duplicate
  (at-least-once), rejecting it changes nothing, and it is not handed on when the member
  leaves. Without another connected member the job stays where it is and is looked at again
  after another ``ack_timeout_s``.
- **Its member left** with it unacknowledged: it goes to another member at once (a job that
  was sent counts as a delivery made).
- After ``max_deliveries`` deliveries, a job that fails again is a **dead letter**:
  published to ``dead_letter_topic`` (``$dead/{group}/{topic}`` by default) with its
  properties and the 5.0 user properties ``x-death-reason`` (``rejected``, ``ack_timeout``
  or ``disconnected``), ``x-deliveries``, ``x-first-failure`` (UTC, ISO 8601), ``x-group``
  (and ``x-reason-code`` for a rejection). 3.1.1 subscribers of that topic get its payload.
- A job whose 5.0 Message Expiry Interval passes while it waits for a retry is dropped and
  counted as expired.

A delivery carries what the work queue needs to know of it (:class:`mqttd.delivery.Attempt`,
stored with a persistent member's delivery): nothing is added to ordinary deliveries, and an
acknowledgement costs one test of ``share`` (:func:`settled` runs only for shared ones).

Sans-IO: timers through the host's ``call_at``, stores through its ``writer``, dead letters
through its ``publish`` (the engine's :class:`~mqttd.engine.state.BrokerState` is the host).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import attrs

from mqttd import v5
from mqttd.codec.packets import Publish
from mqttd.config import WorkQueues as WorkQueuesConfig
from mqttd.delivery import (
    STORED_ID,
    Attempt,
    Delivery,
    RemoteJob,
    Share,
    new_fanout,
    share_name,
)
from mqttd.share_groups import ShareGroup, ShareGroups, deliver_to
from mqttd.topics import parse_shared
from persistence import ops

if TYPE_CHECKING:
    from mqttd.session import Session, Taken
    from persistence.journal import Journal
    from persistence.store import JobRow

    Member = tuple[Session, int, Any]

log = logging.getLogger(__name__)

REJECTED = "rejected"
ACK_TIMEOUT = "ack_timeout"
DISCONNECTED = "disconnected"
LOG_INTERVAL_S = 10.0  # at most one line per interval about dead letters
TIMER_GRID_S = 0.01  # retries are due on this grid (fewer wakeups, never early)


class Host(Protocol):
    """What the work queues need of the broker (BrokerState has it)."""

    writer: Journal | None

    def publish(self, message: Publish) -> int: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> None: ...


class Job(NamedTuple):
    """A job waiting for its retry."""

    job_id: int
    share: str  # $share/<group>/<filter>
    message: Publish
    message_id: int  # its stored body (0: not stored)
    deliveries: int  # made so far
    first_failure: float
    due_at: float
    reason: str  # of the last failure
    exclude: str | None  # the client id of the member that failed it


@attrs.define(eq=False)
class GroupCounters:
    """What happened to one group's jobs (kept after the group is gone)."""

    acked: int = 0
    rejected: int = 0  # negative acknowledgements
    retries: int = 0  # deliveries after a rejection, an ack deadline or a member leaving
    ack_timeouts: int = 0  # ack deadlines that passed with the job sent and unacknowledged
    duplicates: int = 0  # superseded copies acknowledged all the same
    dead_lettered: int = 0
    expired: int = 0  # expired while waiting for a retry


@attrs.define(eq=False)
class WorkQueues:
    host: Host
    shares: ShareGroups
    config: WorkQueuesConfig = attrs.Factory(WorkQueuesConfig)
    rng: random.Random = attrs.Factory(random.Random)
    waiting: dict[int, Job] = attrs.Factory(dict)  # by job id
    counters: dict[str, GroupCounters] = attrs.Factory(dict)  # by $share/... name
    # per group with an ack deadline: the attempts it watches, oldest deadline first:
    # attempt -> (deadline, member, message)
    watched: dict[str, OrderedDict[Attempt, tuple[float, Session, Publish]]] = attrs.Factory(
        dict
    )
    next_job_id: int = 1
    _settings: dict[str, WorkQueuesConfig] = attrs.Factory(dict)  # by group name
    _armed: set[str] = attrs.Factory(set)  # groups whose deadline timer is set
    _next_log: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.shares.on_new = self._configure

    def settings(self, share: str) -> WorkQueuesConfig:
        group = parse_shared(share)[0]
        found = self._settings.get(group)
        if found is None:
            found = self._settings[group] = self.config.settings_for(group)
        return found

    def _configure(self, group: ShareGroup) -> None:
        if self.settings(group.name).ack_timeout_s > 0:
            group.watch = self._watch

    def _count(self, share: str) -> GroupCounters:
        found = self.counters.get(share)
        if found is None:
            found = self.counters[share] = GroupCounters()
        return found

    # -- what members answer ---------------------------------------------------------

    def settled(self, session: Session, entry: Delivery, reason_code: int) -> None:
        """A member acknowledged (``reason_code`` below 0x80) or rejected a delivery that
        came through a group (``entry.share`` is set). QoS 2: at PUBREC."""
        share: Share = entry.share  # type: ignore[assignment]
        if share.__class__ is RemoteJob:  # a cluster-wide group's job: JetStream's queue
            share.owner.settled(share, session, entry.message, reason_code)  # type: ignore[union-attr,arg-type]
            return
        attempt = share if share.__class__ is Attempt else None
        name = share_name(share)
        counts = self._count(name)
        if attempt is not None:
            self._unwatch(name, attempt)  # type: ignore[arg-type]
            if attempt.superseded:  # type: ignore[union-attr]
                if reason_code < 0x80:
                    counts.duplicates += 1
                return
        if reason_code < 0x80:
            counts.acked += 1
            return
        counts.rejected += 1
        deliveries = attempt.deliveries if attempt is not None else 1  # type: ignore[union-attr]
        first = attempt.first_failure if attempt is not None else 0.0  # type: ignore[union-attr]
        self._failed(name, entry.message, deliveries, first,  # type: ignore[arg-type]
                     REJECTED, session, reason_code)

    def hand_on(self, session: Session, taken: list[Taken]) -> int:
        """``session``'s connection ended and ``taken`` is what it held from groups
        (``Session.take_shared``): each job goes to another member (a job that was sent
        counts as a delivery; past ``max_deliveries`` it is a dead letter). What no other
        member can take stays with ``session`` if it is persistent (it gets it when it
        returns), else it is lost and counted. Returns how many were handed on."""
        handed = 0
        now = time.time()
        for message, qos, share, sent in taken:
            if share.__class__ is RemoteJob:  # a cluster-wide group's job: JetStream's queue
                share.owner.given_back(share, session, message, sent)  # type: ignore[union-attr]
                continue
            name = share_name(share)
            attempt = share if share.__class__ is Attempt else None
            if attempt is not None:
                self._unwatch(name, attempt)  # type: ignore[arg-type]
                if attempt.superseded:  # type: ignore[union-attr]
                    continue  # another member has the live copy
            deliveries = attempt.deliveries if attempt is not None else 1  # type: ignore[union-attr]
            first = (attempt.first_failure if attempt is not None else 0.0) or now  # type: ignore[union-attr]
            if sent and deliveries >= self.settings(name).max_deliveries:
                self._dead_letter(name, message, deliveries, first, DISCONNECTED)
                continue
            group = self.shares.groups.get(name)
            member = group.pick(qos, session) if group is not None else None
            if member is None:
                if session.persistent and not session.discarded:
                    session.deliver(message, qos, False, None, share)
                else:
                    self.shares.lost += 1
                continue
            if sent:
                share = Attempt(name, deliveries + 1, first)
                self._count(name).retries += 1
            group.redelivered += 1  # type: ignore[union-attr]
            self._deliver(group, member, message, share)  # type: ignore[arg-type]
            handed += 1
        if handed:
            log.info("client %s left with %d unacknowledged shared messages: handed to other "
                     "members", session.client_id, handed)
        return handed

    # -- failures, retries, dead letters -----------------------------------------------

    def _failed(
        self, name: str, message: Publish, deliveries: int, first_failure: float, reason: str,
        member: Session, reason_code: int | None = None,
    ) -> None:
        """A delivery of a job failed: a retry after its backoff, or a dead letter. The
        waiting job is stored when the member's delivery was (durable where the session
        is: a job given to a clean session was never stored, and its publisher's PUBACK did
        not wait for a commit)."""
        settings = self.settings(name)
        now = time.time()
        first_failure = first_failure or now
        if deliveries >= settings.max_deliveries:
            self._dead_letter(name, message, deliveries, first_failure, reason, reason_code)
            return
        if v5.expired(message, now):
            self._count(name).expired += 1
            return
        delay = self.retry_delay(name, deliveries)
        job_id = self.next_job_id
        self.next_job_id = job_id + 1
        message_id = 0
        writer = member.writer
        if writer is not None:
            message_id = writer.add_message(
                message.topic, message.payload, message.qos, v5.stored_properties(message),
                message.expires_at,
            )
            writer.submit(ops.AddJob(job_id, name, message_id, deliveries, first_failure,
                                     now + delay, reason, member.client_id))
        self._wait(Job(job_id, name, message, message_id, deliveries, first_failure,
                       now + delay, reason, member.client_id))

    def retry_delay(self, name: str, deliveries: int) -> float:
        """How long a job of the group ``name`` that failed its ``deliveries``-th delivery
        waits for the next (the backoff, with its jitter)."""
        settings = self.settings(name)
        delay = min(settings.retry_delay_max_s,
                    settings.retry_delay_initial_s
                    * settings.retry_delay_multiplier ** (deliveries - 1))
        return delay * (1.0 - settings.retry_delay_jitter * self.rng.random())

    def dead_letter(
        self, name: str, message: Publish, deliveries: int, first_failure: float, reason: str,
        reason_code: int | None = None,
    ) -> None:
        """Publish a job of the group ``name`` to its dead-letter topic (cluster mode's
        groups call this too)."""
        self._dead_letter(name, message, deliveries, first_failure, reason, reason_code)

    def counts(self, name: str) -> GroupCounters:
        """The counters of the group ``name`` (made when missing)."""
        return self._count(name)

    def _wait(self, job: Job) -> None:
        self.waiting[job.job_id] = job
        job_id = job.job_id
        # on a grid of TIMER_GRID_S: jobs due close together are retried by one wakeup of
        # the timer loop (never earlier than due)
        when = math.ceil(job.due_at / TIMER_GRID_S) * TIMER_GRID_S
        self.host.call_at(when, lambda: self._due(job_id))

    def _due(self, job_id: int) -> None:
        """A job's retry is due: to a member other than the one that failed it if there is
        one, else to that one; with no member able to take it, it waits again."""
        job = self.waiting.pop(job_id, None)
        if job is None:
            return
        counts = self._count(job.share)
        writer = self.host.writer
        if v5.expired(job.message):
            counts.expired += 1
            if writer is not None:
                writer.submit(ops.RemoveJob(job_id))
            return
        group = self.shares.groups.get(job.share)
        member = None
        if group is not None:
            failed = group.members.get(job.exclude) if job.exclude is not None else None
            qos = job.message.qos
            member = group.pick(qos, failed[0] if failed is not None else None)
            if member is None and failed is not None:
                member = group.pick(qos)
        if group is None or member is None:
            later = time.time() + self.settings(job.share).retry_delay_max_s
            self._wait(job._replace(due_at=later))
            return
        counts.retries += 1
        parts = None
        if job.message_id:
            parts = new_fanout()
            parts[STORED_ID] = job.message_id  # a persistent member refers to the stored body
        attempt = Attempt(job.share, job.deliveries + 1, job.first_failure)
        self._deliver(group, member, job.message, attempt, parts)
        if writer is not None:
            writer.submit(ops.RemoveJob(job_id))

    def _deliver(
        self, group: ShareGroup, member: Member, message: Publish, share: Share,
        parts: list[Any] | None = None,
    ) -> None:
        if group.watch is not None:
            share = self._watch(group, member, message, share)
        deliver_to(member, message, message.qos, parts, share)

    def _dead_letter(
        self, name: str, message: Publish, deliveries: int, first_failure: float, reason: str,
        reason_code: int | None = None,
    ) -> None:
        """Publish the job to the group's dead-letter topic, saying why in user properties."""
        group = parse_shared(name)[0]
        topic = self.settings(name).dead_letter_topic.format(group=group, topic=message.topic)
        props = dict(message.properties or {})
        failed_at = datetime.datetime.fromtimestamp(first_failure, datetime.UTC)
        added = [
            ("x-death-reason", reason), ("x-deliveries", str(deliveries)),
            ("x-first-failure", failed_at.isoformat(timespec="milliseconds")),
            ("x-group", group),
        ]
        if reason_code is not None:
            added.append(("x-reason-code", f"0x{reason_code:02X}"))
        props["user_property"] = [*props.get("user_property", ()), *added]
        dead = attrs.evolve(message, topic=topic, properties=props, retain=False, dup=False,
                            packet_id=0)
        counts = self._count(name)
        counts.dead_lettered += 1
        self.host.publish(dead)
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL_S
            log.warning("%s: a job on %r failed %d times (%s): published to %r (%d dead "
                        "letters in this group so far)", name, message.topic, deliveries,
                        reason, topic, counts.dead_lettered)

    # -- ack deadlines -----------------------------------------------------------------

    def _watch(self, group: ShareGroup, member: Member, message: Publish, share: Share
               ) -> Share:
        """A delivery through a group with an ack deadline: what it carries (an Attempt,
        watched from now on). QoS 0 deliveries are not jobs."""
        if not (message.qos and member[1]):
            return share
        attempt = share if share.__class__ is Attempt else Attempt(share)  # type: ignore[arg-type]
        timeout_s = self.settings(group.name).ack_timeout_s
        self._watch_until(group.name, attempt, time.time() + timeout_s,  # type: ignore[arg-type]
                          member[0], message)
        return attempt

    def _watch_until(
        self, name: str, attempt: Attempt, deadline: float, session: Session, message: Publish
    ) -> None:
        watched = self.watched.get(name)
        if watched is None:
            watched = self.watched[name] = OrderedDict()
        watched[attempt] = (deadline, session, message)
        if name not in self._armed:
            self._armed.add(name)
            self.host.call_at(deadline, lambda: self._deadlines(name))

    def _unwatch(self, name: str, attempt: Attempt) -> None:
        watched = self.watched.get(name)
        if watched is not None:
            watched.pop(attempt, None)

    def _deadlines(self, name: str) -> None:
        """The group's first ack deadline is due: act on every one that passed."""
        self._armed.discard(name)
        watched = self.watched.get(name)
        now = time.time()
        while watched:
            attempt, (deadline, session, message) = next(iter(watched.items()))
            if deadline > now:
                break
            del watched[attempt]
            self._deadline_passed(name, attempt, session, message, now)
        if watched:
            self._armed.add(name)
            first = next(iter(watched.values()))[0]
            self.host.call_at(first, lambda: self._deadlines(name))
        elif watched is not None:
            del self.watched[name]

    def _deadline_passed(
        self, name: str, attempt: Attempt, session: Session, message: Publish, now: float
    ) -> None:
        """``session`` may still hold ``attempt``: sent and unacknowledged, a copy goes to
        another connected member; still queued, or nobody else to take it, it is looked at
        again after another ack_timeout_s; gone (acknowledged, rejected, handed on), done."""
        settings = self.settings(name)
        held = _held(session, attempt)
        if held is None:
            return
        group = self.shares.groups.get(name)
        other = group.pick(message.qos, session, connected=True) if group is not None else None
        if held and (other is not None or attempt.deliveries >= settings.max_deliveries):
            counts = self._count(name)
            counts.ack_timeouts += 1
            attempt.superseded = True
            first = attempt.first_failure or now
            if attempt.deliveries >= settings.max_deliveries:
                self._dead_letter(name, message, attempt.deliveries, first, ACK_TIMEOUT)
                return
            counts.retries += 1
            self._deliver(group, other, message,  # type: ignore[arg-type]
                          Attempt(name, attempt.deliveries + 1, first))
            return
        self._watch_until(name, attempt, now + settings.ack_timeout_s, session, message)

    # -- restart and stats -------------------------------------------------------------

    def restore(self, rows: list[JobRow]) -> None:
        """The jobs that were waiting for their retry when the broker stopped."""
        for row in rows:
            message = v5.restored_message(row.topic, row.payload, row.qos, False,
                                          row.properties, row.expires_at)
            self._wait(Job(row.job_id, row.share, message, row.message_id, row.deliveries,
                           row.first_failure, row.due_at, row.reason, row.exclude))
            self.next_job_id = max(self.next_job_id, row.job_id + 1)

    def group_stats(self) -> list[dict[str, Any]]:
        """Per group (every group with members, waiting jobs or a history): its members,
        ``in_progress`` (jobs sent to a member and not acknowledged), ``queued`` (jobs
        waiting for a retry, or in the RAM part of a member's queue) and the counters."""
        waiting: dict[str, int] = {}
        for job in self.waiting.values():
            waiting[job.share] = waiting.get(job.share, 0) + 1
        names = sorted(set(self.shares.groups) | set(waiting) | set(self.counters))
        result = []
        for name in names:
            group_name, topic_filter = parse_shared(name)
            group = self.shares.groups.get(name)
            members = list(group.members.values()) if group is not None else []
            in_progress, queued = _held_by(name, [member[0] for member in members])
            result.append({
                "name": name, "group": group_name, "filter": topic_filter,
                "members": len(members),
                "connected_members": sum(m[0].connection is not None for m in members),
                "in_progress": in_progress, "queued": queued + waiting.get(name, 0),
                "waiting_retry": waiting.get(name, 0),
                **attrs.asdict(self._count(name)),
            })
        return result

    def stats(self) -> dict[str, int]:
        """Broker-wide totals for Engine.stats()."""
        totals = GroupCounters()
        for counts in self.counters.values():
            for field in attrs.fields(GroupCounters):
                setattr(totals, field.name,
                        getattr(totals, field.name) + getattr(counts, field.name))
        return {
            "jobs_waiting_retry": len(self.waiting),
            **{f"jobs_{key}": value for key, value in attrs.asdict(totals).items()},
        }


def _held(session: Session, attempt: Attempt) -> bool | None:
    """Whether ``session`` holds ``attempt``: True sent (in flight), False queued, None not."""
    for delivery in session.inflight.values():
        if delivery.share is attempt:
            return delivery.message is not None
    for delivery in session.out.ram or ():
        if delivery.share is attempt:
            return False
    return None


def _held_by(name: str, sessions: list[Session]) -> tuple[int, int]:
    """(sent and unacknowledged, queued in RAM) deliveries of the group ``name`` held by
    ``sessions``."""
    sent = queued = 0
    for session in sessions:
        for delivery in session.inflight.values():
            share = delivery.share
            if share is not None and delivery.message is not None and share_name(share) == name:
                sent += not (share.__class__ is Attempt and share.superseded)  # type: ignore[union-attr]
        for delivery in session.out.ram or ():
            if delivery.share is not None and share_name(delivery.share) == name:
                queued += 1
    return sent, queued
