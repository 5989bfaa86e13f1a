"""The engine: the broker without I/O. :class:`Engine` is the :class:`~mqttd.engine.state.
BrokerState` with the packet dispatch table, driven synchronously by the I/O layer (no
``await``, no trio): ``new_connection``, ``handle_data`` (decode, then handle every packet),
``protocol_error``, ``connection_lost``; output waits in each :class:`~mqttd.connection.
Connection`'s outbox for the I/O layer to send. The handlers are functions over the state in
engine/connect.py (CONNECT, DISCONNECT, AUTH), publish.py (PUBLISH and its acks), subscribe.py
(SUBSCRIBE, UNSUBSCRIBE); sessions.py and wills.py hold what happens when a session ends.
:class:`mqttd.service.Broker` runs an engine on the network.

Security: every CONNECT passes the :class:`~mqttd.security.gatekeeper.Gatekeeper` (failed-login
limit, anonymous access per listener, the password file or the program's ``authenticator``).
With an ACL (``security.acl_file`` or the program's ``authorizer``), PUBLISH without write
access is dropped (and still acknowledged), SUBSCRIBE without read access gets 0x80, and
deliveries, retained ones included, go only to sessions allowed to read the topic.
``reload()`` re-reads both files (SIGHUP).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Any, cast

import attrs

from mqttd import v5
from mqttd.codec import MQTTError
from mqttd.codec.errors import ServerBusy
from mqttd.codec.packets import (
    AUTH,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PROTOCOL_5,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Packet,
    PingReq,
    Publish,
)
from mqttd.config import Listener
from mqttd.connection import Connection
from mqttd.engine import connect, publish, sessions, subscribe, wills
from mqttd.engine.state import BrokerState
from mqttd.logs import tracing
from mqttd.session import Session
from mqttd.topics import InvalidTopic, is_shared
from persistence.journal import Journal
from persistence.store import Snapshot

log = logging.getLogger("mqttd.broker")


def on_pingreq(state: BrokerState, conn: Connection, packet: PingReq) -> None:
    # behind the replies that wait for a commit, like every reply on this connection:
    # a PINGRESP then tells the client that everything it sent before was answered
    state.reply(conn, b"\xd0\x00")


@attrs.define(eq=False)
class Engine(BrokerState):
    _handlers: dict[int, Callable[[Connection, Any], None]] = attrs.field(init=False)
    # every connection's on_fed: one bound method, not one per connection
    _on_fed: Callable[[Connection], None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._on_fed = self.flow.fed
        # bound to this engine as methods are (cheaper to call than functools.partial)
        self._handlers = {
            kind: types.MethodType(handler, self)
            for kind, handler in (
                (CONNECT, connect.on_connect),
                (PUBLISH, publish.on_publish),
                (PUBACK, publish.on_puback),
                (PUBREC, publish.on_pubrec),
                (PUBREL, publish.on_pubrel),
                (PUBCOMP, publish.on_pubcomp),
                (SUBSCRIBE, subscribe.on_subscribe),
                (UNSUBSCRIBE, subscribe.on_unsubscribe),
                (PINGREQ, on_pingreq),
                (DISCONNECT, connect.on_disconnect),
                (AUTH, connect.on_auth),
            )
        }

    # -- connections (called by the I/O layer) ---------------------------------------

    def new_connection(
        self, peer: str, listener: Listener | None = None, tls_identity: str | None = None
    ) -> Connection:
        # (the first fields positionally, the rest set after: keywords to a class cost a
        # dict per call)
        limits = self.config.limits
        conn = Connection(peer, limits.max_packet_size_bytes, listener, tls_identity)
        conn.account = self.buffers
        conn.pace_bytes = limits.output_high_watermark_bytes
        conn.pace_messages = limits.queue_high_watermark_messages
        conn.on_fed = self._on_fed
        # the bucket starts full (a conditional expression: max() costs an iterator)
        conn.publish_tokens = self.publish_rate if self.publish_rate > 1.0 else 1.0
        conn.trace = tracing()  # decided once per connection: the hot path tests a flag
        self.connections.add(conn)
        self.connections_total += 1
        return conn

    def handle_data(self, conn: Connection, data: bytes) -> None:
        """Decode and handle everything complete in ``data``. Raises MQTTError (after
        handling the packets that preceded the bad one) when the connection must end."""
        self.bytes_received += len(data)
        try:
            packets = conn.receive_data(data)
        except MQTTError as exc:
            self.dispatch(conn, exc.packets_before)
            raise
        self.dispatch(conn, packets)

    def dispatch(self, conn: Connection, packets: list[Packet]) -> None:
        handlers = self._handlers
        parked = self.parked
        if parked and conn in parked:  # its login is being decided: handle these later
            if conn.auth_exchange is None:
                parked[conn].extend(packets)
                return
            for index, packet in enumerate(packets):  # enhanced authentication goes on
                if conn not in parked:  # accepted by the last AUTH: the rest as usual
                    self.dispatch(conn, packets[index:])
                    return
                if packet.TYPE == AUTH:
                    connect.on_auth(self, conn, packet)  # type: ignore[arg-type]
                else:
                    parked[conn].append(packet)
            return
        if packets and packets[0].TYPE == CONNECT:  # only ever first in the first batch
            handlers[CONNECT](conn, packets[0])
            if conn in parked:
                self.dispatch(conn, packets[1:])
                return
            packets = packets[1:]
        writer = self.writer
        flow = self.flow
        flow.current = conn  # the publisher its subscribers may hold
        # publish.on_publish's QoS 0 case, decided once per batch: a 3.1.1 client (not a
        # bridge) and none of topic limits, a publish rate, an ACL or a cluster: a QoS 0
        # PUBLISH that is not retained is counted and routed, nothing else
        session = conn.session
        route = self.router.route if (
            session is not None and conn.protocol_level != PROTOCOL_5 and not conn.is_bridge
            and not self.check_topic_limits and not self.publish_rate and self.acl is None
            and self.cluster is None
        ) else None
        try:
            for index, packet in enumerate(packets):
                if conn.closing:
                    return
                if writer is not None:
                    self.packet_ticket = writer.ticket  # see BrokerState.reply
                if (
                    route is not None and packet.__class__ is Publish
                    and not packet.qos and not packet.retain  # type: ignore[attr-defined]
                ):
                    self.messages_received += 1
                    route(packet, session, False)  # type: ignore[arg-type]
                else:
                    handlers[packet.TYPE](conn, packet)
                if conn.held_by or conn.publish_tokens < 0:
                    # held (a backlogged subscriber, the store), or over the publish rate
                    # (the reader waits for tokens): the rest waits
                    rest = packets[index + 1 :]
                    if rest:
                        held = conn.held_packets
                        conn.held_packets = rest if held is None else held + rest
                    return
        finally:
            flow.current = None

    def resume(self, conn: Connection) -> None:
        """``conn`` was held (see mqttd.engine.flow) and is released: handle the packets it
        sent after the one that held it, before reading more."""
        packets, conn.held_packets = conn.held_packets, None
        if packets:
            self.dispatch(conn, packets)

    def output_sent(self, conn: Connection, size: int) -> None:
        """The I/O layer wrote ``size`` bytes of ``conn``'s output."""
        if not conn.output_discarded:  # conn.sent(size), inlined (once per send)
            conn.outbox_bytes -= size
            conn.account.bytes -= size
        self.bytes_sent += size
        if conn.backlogged or conn.stalled:
            self.flow.sent(conn, time.monotonic())
        if self.paused_readers:
            self.notify_progress()

    def connection_lost(self, conn: Connection) -> None:
        """The connection is over, for whatever reason: publish the will unless the
        client sent DISCONNECT, detach the session, discard it if clean."""
        self.connections.discard(conn)
        self.awaiting_commit.discard(conn)
        self.parked.pop(conn, None)
        self.flow.forget(conn)
        conn.discard_output()
        self.notify_progress()
        if conn.accepted:
            if self.config.logging.connections:
                connect.log_disconnected(conn)
        elif conn.end_reason:
            log.debug("connection from %s ended before CONNACK: %s", conn.peer, conn.end_reason)
        session = conn.session
        if session is None:
            return
        conn.session = None
        will, conn.will = conn.will, None
        if session.connection is conn:
            sessions.detach(self, session)
        ends = not session.persistent or session.expiry_s == 0
        if ends and self.sessions.get(session.client_id) is session:
            sessions.discard(self, session)
        if will is not None:
            sessions.will_due(self, session, will, ends, connect.end_reason(conn))
        elif session.expiry_s is not None and session.expiry_s > 0 and not ends:
            sessions.expire_at(self, time.time() + session.expiry_s)

    def forget_connection(self, conn: Connection) -> None:
        """A bridge's remote connection is gone: hold no replies for it, and no publishers."""
        self.awaiting_commit.discard(conn)
        self.flow.forget(conn)

    def _on_commit(self, committed: int) -> None:
        released = []
        for conn in self.awaiting_commit:
            if conn.release_deferred(committed):
                released.append(conn)
        for conn in released:
            self.awaiting_commit.discard(conn)
        self.notify_progress()

    # -- inbound flow control ---------------------------------------------------------------

    def reading_paused(self, conn: Connection) -> bool:
        """Whether to stop reading from ``conn`` for now: the broker's unsent output is over
        ``max_buffered_bytes``, the store's writer (or in cluster mode, the output to the
        other nodes) is behind, or ``conn`` has ``max_receive_messages`` acknowledgements
        waiting for a commit."""
        if conn.held_by:
            return True  # held by a subscriber it feeds (mqttd.engine.flow)
        limits = self.config.limits
        if 0 <= limits.max_buffered_bytes < self.buffers.bytes:
            return True
        if self.parked and conn in self.parked and conn.auth_exchange is None:
            return True  # until its password check ends (it has no CONNACK yet)
        writer = self.writer
        if writer is not None and writer.congested:
            return True
        cluster = self.cluster
        if cluster is not None and cluster.congested:
            return True  # the output to the other nodes is full (cluster mode)
        return len(conn.deferred) >= limits.max_receive_messages

    def disconnect_stalled_clients(self, now: float) -> int:
        """Over ``max_buffered_bytes`` for a while: disconnect the clients whose output has
        not moved for ``stalled_output_timeout_s`` (they stopped reading), so that stalled
        clients cannot keep every publisher paused. Returns how many."""
        limits = self.config.limits
        if not 0 <= limits.max_buffered_bytes < self.buffers.bytes:
            return 0
        stalled = [
            conn for conn in self.connections
            if conn.send_blocked_since is not None
            and now - conn.send_blocked_since >= limits.stalled_output_timeout_s
            and not conn.closing
        ]
        for conn in stalled:
            log.warning(
                "client %s: output stalled for %.1fs with %d bytes unsent while the broker "
                "is over max_buffered_bytes; disconnecting it", conn.name,
                now - conn.send_blocked_since, conn.outbox_bytes,  # type: ignore[operator]
            )
            self.stalled_disconnects += 1
            conn.close(ServerBusy("output stalled while the broker is over its buffer limit"))
        return len(stalled)

    def publish_rate_delay(self, conn: Connection, now: float) -> float:
        """Token bucket for ``limits.max_publish_rate_per_s``: refill ``conn``'s tokens (a
        burst of one second's worth at most) and return how long to stop reading from it so
        that its rate stays under the limit (0: no need)."""
        rate = self.publish_rate
        if not rate:
            return 0.0
        burst = max(rate, 1.0)
        tokens = min(burst, conn.publish_tokens + (now - conn.tokens_at) * rate)
        conn.tokens_at = now
        conn.publish_tokens = tokens
        if tokens >= 0:
            return 0.0
        self.limit_exceeded("publish_rate")
        return -tokens / rate

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Broker-wide counters (read by the metrics work)."""
        writer = self.writer
        sent = connected = inflight = queued = 0
        for session in self.sessions.values():  # one pass over the sessions
            sent += session.sent
            connected += session.connection is not None
            inflight += len(session.inflight)
            queued += session.queued
        return {
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "subscriptions": len(self.router.trie) - self.internal_subscriptions,
            "retained": len(self.retained),
            "messages_received": self.messages_received,
            "messages_sent": self.sent_by_ended_sessions + sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "connections_total": self.connections_total,
            "connected_sessions": connected,
            "sessions_expired": self.sessions_expired,
            "deliveries": self.router.deliveries,
            "inflight": inflight,
            "queued": queued,
            "dropped": self.drops.dropped,
            "dropped_qos0": self.drops.dropped_qos0,
            "refused": self.drops.refused,
            "buffered_bytes": self.buffers.bytes,
            "read_pauses": self.read_pauses,
            "stalled_disconnects": self.stalled_disconnects,
            "limits_exceeded": sum(self.limits_exceeded.values()),
            "rate_limited": self.limits_exceeded.get("publish_rate", 0),
            "rate_refused": self.rate_refused,
            "auth_failures": self.gate.limiter.failures,
            "auth_rate_limited": self.gate.limiter.refused,
            "acl_denied_publish": self.acl_denied_publish,
            "acl_denied_subscribe": self.acl_denied_subscribe,
            "acl_denied_deliveries": self.router.denied + self.acl_denied_retained,
            "store_commits": writer.commits if writer is not None else 0,
            "store_writes": writer.ops_written if writer is not None else 0,
            "store_pending": writer.pending if writer is not None else 0,
            **self._storage_stats(),
            **self._flow_stats(),
            **self.shares.stats(),
            **self.work_queues.stats(),
            **self.delayed.stats(),
        }

    def _storage_stats(self) -> dict[str, int]:
        writer = self.writer
        usage = writer.usage if writer is not None else None
        return {
            "storage_ok": int(self.storage_ok),
            "storage_refused": self.storage_refused,
            "storage_holds": self.storage_holds,
            "storage_failures": writer.storage_failures if writer is not None else 0,
            "store_bytes": usage.used if usage is not None else 0,
            "store_free_bytes": usage.free if usage is not None and usage.free is not None
            else -1,
        }

    def _flow_stats(self) -> dict[str, int]:
        flow = self.flow
        return {
            "publisher_holds": flow.holds,
            "publishers_held": len(flow.held),
            "stalled_subscribers": flow.stalls,
        }

    def client_stats(self, client_id: str) -> dict[str, int | bool] | None:
        """Per-client counters: inflight, queued, queued_bytes, sent, dropped, ..."""
        session = self.sessions.get(client_id)
        if session is None:
            return None
        result = session.stats()
        conn = cast("Connection | None", session.connection)
        result["buffered_bytes"] = conn.outbox_bytes if conn is not None else 0
        result["times_held"] = conn.times_held if conn is not None else 0  # as a publisher
        result["stalled"] = conn is not None and conn.stalled  # as a subscriber
        return result


    # -- sessions and security, for the service and embedding programs --------------------

    def expire_sessions(self, now: float | None = None) -> int:
        """See :func:`mqttd.engine.sessions.expire_sessions`."""
        return sessions.expire_sessions(self, now)

    def load_security(self) -> None:
        """See :func:`mqttd.engine.connect.load_security`."""
        connect.load_security(self)

    def reload_security(self) -> bool:
        """See :func:`mqttd.engine.connect.reload_security`."""
        return connect.reload_security(self)

    def reload(self) -> bool:
        """Re-read the security files (the service re-reads TLS certificates too)."""
        return self.reload_security()

    # -- restoring and closing ---------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Take the sessions (subscriptions, inflight, queues) and retained messages read
        back from the store; expiry timers for the 5.0 sessions that are away."""
        writer: Journal = self.writer  # type: ignore[assignment]
        trie = self.router.trie
        for row in snapshot.sessions.values():
            session = Session.restore(
                row, writer, **self.session_limits(row.client_id, True),
            )
            self.sessions[session.client_id] = session
            for topic_filter, qos in session.subscriptions.items():
                stored = session.sub_options.get(topic_filter)
                options = v5.options_from_byte(*stored) if stored else None
                if is_shared(topic_filter):
                    try:
                        self.shares.add(topic_filter, session, qos, options)
                    except InvalidTopic:
                        log.warning("session %s: ignoring stored subscription %r",
                                    session.client_id, topic_filter)
                else:
                    trie.add(topic_filter, session.client_id, session, qos, options)
        for topic, payload, qos, props, expires_at in snapshot.retained:
            self.retained.set(
                topic, v5.restored_message(topic, payload, qos, True, props, expires_at)
            )
        writer.next_message_id = snapshot.next_message_id
        self.work_queues.restore(snapshot.jobs)
        self.delayed.restore(snapshot.delayed)
        for session in self.sessions.values():  # 5.0 expiry intervals run on a timer
            if session.expiry_s and session.expiry_s > 0 and session.disconnected_at:
                sessions.expire_at(self, session.disconnected_at + session.expiry_s)

    def close_all_connections(self, reason: MQTTError) -> None:
        """Server shutdown: publish the wills of connected clients (as mosquitto does at
        exit), then close every connection after flushing what is queued for it."""
        wills.publish_waiting_wills(self)
        for conn in list(self.connections):
            if conn.will is not None:
                will, conn.will = conn.will, None
                wills.publish_will(self, will, conn.client_id, "broker shutting down")
        for conn in list(self.connections):
            conn.close(reason, flush=conn.session is not None)


