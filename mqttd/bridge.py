"""Bridges: this broker connects to a remote MQTT broker as a client and carries messages
across, per topic mapping (``out``: local -> remote, ``in``: remote -> local, ``both``).

Store and forward. The local side of a bridge is a persistent session, ``$bridge/<name>``
(a client id no client may use), subscribed to the local filters of the ``out`` and ``both``
mappings. A :class:`BridgeLink` stands in the subscription trie for that session: it maps
each message to its remote topic and hands it to the session, which does what it does for
any persistent client: the message is stored (and the publisher's PUBACK waits for that
commit), sent while the link is up and its inflight window has room, queued in SQLite while
the link is down or slow (bounded by the bridge's queue budget and overflow policy), kept
across a restart, resent with DUP=1 and the same packet id after a reconnect, and deleted
only when the remote broker has acknowledged it (PUBACK, or PUBCOMP for QoS 2): QoS 1
semantics end to end.

Messages from the remote side (``in`` / ``both``: the link subscribes there) are published
locally like a client's, and acknowledged to the remote only after the local commit.

Reconnects back off exponentially from ``reconnect_delay_min_s`` to
``reconnect_delay_max_s``, with jitter (each wait is drawn between half and all of the
current delay), and start from the minimum again once a link has stayed up for a while.

Loops (``both``): a message that came in through the link is never sent back out through
it (the link recognises the message it is routing); and the link announces itself as a
bridge (``try_private``: protocol level | 0x80, as mosquitto does), so that a mosquitto or
mqttd remote does not send our own messages back to us. A remote that refuses that
protocol level is retried at once without it.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import v5
from mqttd.codec import Decoder, MQTTError, ProtocolError
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_311,
    ConnAck,
    Connect,
    Disconnect,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
)
from mqttd.codec.reason import CONNACK_UNACCEPTABLE_PROTOCOL_VERSION
from mqttd.config import BRIDGE_PREFIX, BridgeTLS, BridgeTopic
from mqttd.config import Bridge as BridgeConfig
from mqttd.outqueue import QueueLimits
from mqttd.protocol import Connection
from mqttd.session import Session
from mqttd.topics import matches
from persistence import ops

if TYPE_CHECKING:
    from mqttd.delivery import Fanout
    from mqttd.engine.dispatch import Engine as Broker
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger(__name__)

STABLE_LINK_S = 30.0  # a link up this long resets the reconnect delay to its minimum


class LinkDown(Exception):
    """The link failed: the message says why (logged, counted, then reconnect)."""


class BridgeLink:
    """One configured bridge: the local session, the remote connection, the counters."""

    def __init__(self, broker: Broker, config: BridgeConfig, pauses: ReadPauses) -> None:
        self.broker = broker
        self.pauses = pauses
        self.config = config
        self.name = config.name
        self.client_id = config.local_client_id
        self.out_topics: list[BridgeTopic] = [
            t for t in config.topics if t.direction in ("out", "both")
        ]
        self.in_topics: list[BridgeTopic] = [
            t for t in config.topics if t.direction in ("in", "both")
        ]
        self.session: Session | None = None
        self.conn: Connection | None = None
        self.tls_context = _tls_context(config.tls) if config.tls is not None else None
        self.state = "down"
        self.subscribed = False  # the remote answered the ``in`` subscriptions
        self.level = PROTOCOL_5 if config.protocol == "5" else PROTOCOL_311
        # 5.0 has No Local for what try_private does for 3.1.1
        self.private = config.try_private and self.level == PROTOCOL_311
        self._inbound: Publish | None = None  # the message being routed in from the remote
        self._wake = trio.Event()
        self._subscribe_id = 0
        # counters
        self.connects = 0
        self.connect_failures = 0
        self.link_losses = 0
        self.forwarded = 0  # messages acknowledged by the remote broker
        self.received = 0  # messages from the remote published here
        self.unmapped = 0  # messages that matched no mapping (not forwarded)
        self.refused = 0  # 5.0: messages the remote refused (PUBACK/PUBREC reason >= 0x80)
        self.last_error: str | None = None
        self.connected_at: float | None = None
        self.next_attempt_in_s = 0.0

    # -- local side --------------------------------------------------------------------

    def setup(self) -> None:
        """Create (or take over the restored) ``$bridge/<name>`` session and make its
        subscriptions exactly the ``out`` mappings, with this link in the trie."""
        broker = self.broker
        writer = broker.writer
        assert writer is not None, "the store must be open"
        cfg = self.config
        limits = broker.config.limits_for(self.client_id)
        session = broker.sessions.get(self.client_id)
        if session is None:
            session = Session(
                self.client_id, persistent=True, writer=writer,
                qos0_buffer_bytes=broker.config.limits.qos0_buffer_bytes,
                counters=broker.drops,
            )
            broker.sessions[self.client_id] = session
        session.max_inflight = cfg.max_inflight_messages or limits.max_inflight_messages
        session.out.limits = QueueLimits(
            cfg.max_queued_messages or limits.max_queued_messages,
            cfg.max_queued_bytes if cfg.max_queued_bytes is not None else limits.max_queued_bytes,
            limits.overflow_policy,
            broker.config.persistence.queue_page_messages,
        )
        session.disconnected_at = None  # a configured bridge's session never expires
        writer.submit(ops.SaveSession(self.client_id, None))
        trie = broker.router.trie
        wanted: dict[str, int] = {}
        for topic in self.out_topics:
            wanted[topic.local_filter] = max(topic.qos, wanted.get(topic.local_filter, 0))
        for topic_filter in list(session.subscriptions):
            if topic_filter not in wanted:
                del session.subscriptions[topic_filter]
                trie.remove(topic_filter, self.client_id)
                writer.submit(ops.RemoveSubscription(self.client_id, topic_filter))
        for topic_filter, qos in wanted.items():
            session.subscriptions[topic_filter] = qos
            trie.add(topic_filter, self.client_id, self, qos)
            writer.submit(ops.AddSubscription(self.client_id, topic_filter, qos))
        self.session = session
        if session.queued or session.inflight:
            log.info(
                "bridge %s: %d messages stored for %s:%d (%d in flight)", self.name,
                session.queued + len(session.inflight), cfg.host, cfg.port,
                len(session.inflight),
            )

    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: Fanout[Any] | None
    ) -> None:
        """The router hands a local message to the bridge: map it to its remote topic and
        queue it on the bridge's session (stored, sent when the link has room)."""
        if message is self._inbound:
            return  # it came from the remote through this link: never send it back
        topic = message.topic
        for mapping in self.out_topics:
            if matches(mapping.local_filter, topic):
                break
        else:
            self.unmapped += 1
            return
        remote_topic = mapping.remote_prefix + topic[len(mapping.local_prefix):]
        qos = min(message.qos, mapping.qos)
        # (5.0 properties and expiry go along; a 3.1.1 link leaves them out when encoding)
        remote = attrs.evolve(message, topic=remote_topic, qos=qos, dup=False, packet_id=0)
        self.session.deliver(remote, qos, message.retain, None)  # type: ignore[union-attr]

    def _local_topic(self, remote_topic: str) -> str | None:
        for mapping in self.in_topics:
            if matches(mapping.remote_filter, remote_topic):
                return mapping.local_prefix + remote_topic[len(mapping.remote_prefix):]
        return None

    # -- the link ----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff, until cancelled."""
        cfg = self.config
        delay = cfg.reconnect_delay_min_s
        while True:
            started = time.monotonic()
            try:
                await self._connect_and_serve()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    MQTTError, LinkDown) as exc:
                problem = str(exc) or type(exc).__name__
                self.last_error = problem
                if self.conn is None:
                    self.connect_failures += 1
                else:
                    self.link_losses += 1
                if isinstance(exc, _RetryWithoutPrivate):
                    self._link_down()
                    continue
                self._link_down()
                if time.monotonic() - started >= STABLE_LINK_S:
                    delay = cfg.reconnect_delay_min_s
                wait_s = random.uniform(delay / 2, delay)
                self.next_attempt_in_s = wait_s
                session = self.session
                log.warning(
                    "bridge %s: %s:%d: %s; %d messages queued for it; retrying in %.1fs",
                    self.name, cfg.host, cfg.port, problem,
                    (session.queued + len(session.inflight)) if session else 0, wait_s,
                )
                await trio.sleep(wait_s)
                delay = min(delay * 2, cfg.reconnect_delay_max_s)
            finally:
                if self.conn is not None:  # cancelled (shutdown)
                    self._link_down()

    async def _connect_and_serve(self) -> None:
        cfg = self.config
        self.state = "connecting"
        stream: trio.abc.Stream
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                stream = await trio.open_tcp_stream(cfg.host, cfg.port)
                if self.tls_context is not None:
                    stream = trio.SSLStream(stream, self.tls_context, server_hostname=cfg.host)
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        await trio.aclose_forcefully(stream)
                        raise LinkDown(f"TLS handshake failed: {exc.__cause__ or exc}") from None
        except trio.TooSlowError:
            raise LinkDown("connect timed out") from None
        async with stream:
            decoder = Decoder(protocol_level=self.level)
            connack = await self._handshake(stream, decoder)
            conn = Connection(peer=f"{cfg.host}:{cfg.port}", account=self.broker.buffers)
            conn.client_id = self.client_id
            conn.protocol_level = self.level
            conn.on_output = self._output_ready
            session: Session = self.session  # type: ignore[assignment]
            if self.level == PROTOCOL_5:  # the remote's limits, from its CONNACK
                props = connack.properties or {}
                conn.max_send_size = props.get("maximum_packet_size", 0)
                conn.topic_alias_out_max = props.get("topic_alias_maximum", 0)
                limits = self.broker.config.limits_for(self.client_id)
                window = cfg.max_inflight_messages or limits.max_inflight_messages
                session.max_inflight = min(window, props.get("receive_maximum", window))
            self.conn = conn
            self.state = "connected"
            self.connects += 1
            self.connected_at = time.time()
            log.info(
                "bridge %s: connected to %s:%d as %r (session present %d, %d messages to "
                "forward)", self.name, cfg.host, cfg.port, cfg.remote_client_id(),
                connack.session_present, session.queued + len(session.inflight),
            )
            if self.in_topics:
                self._subscribe_id = self._free_packet_id(session)
                v5_link = self.level == PROTOCOL_5
                conn.send_packet(Subscribe(self._subscribe_id, tuple(
                    # 5.0: No Local (our own messages do not come back), Retain As Published
                    Subscription(t.remote_filter, t.qos, v5_link, v5_link)
                    for t in self.in_topics
                ), {} if v5_link else None))
            session.attach(conn)  # resend what is in flight (DUP), then the queue
            try:
                async with trio.open_nursery() as nursery:
                    conn.on_close = nursery.cancel_scope.cancel
                    nursery.start_soon(self._writer, stream, conn)
                    nursery.start_soon(self._keepalive, conn)
                    await self._reader(stream, decoder, conn)
            except BaseExceptionGroup as group:
                failure = _first_failure(group)
                if failure is not None:
                    raise failure from None
                await _say_goodbye(stream)  # cancelled: shutdown
                raise
            except trio.Cancelled:
                await _say_goodbye(stream)
                raise
            raise LinkDown(f"closed: {conn.close_reason or 'by the broker'}")

    async def _handshake(self, stream: trio.abc.Stream, decoder: Decoder) -> ConnAck:
        cfg = self.config
        properties = None
        if self.level == PROTOCOL_5:  # a kept session is kept for good (0xFFFFFFFF)
            properties = {"session_expiry_interval": 0 if cfg.clean_session else 0xFFFFFFFF}
        packet = Connect(
            cfg.remote_client_id(), cfg.clean_session, cfg.keepalive_s,
            self.level | BRIDGE_LEVEL_FLAG if self.private else self.level,
            None, cfg.username, cfg.password.encode() if cfg.password is not None else None,
            properties,
        )
        with trio.fail_after(cfg.connect_timeout_s):
            try:
                await stream.send_all(packet.encode())
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        if self.private:  # some brokers close instead of answering 0x01
                            self.private = False
                            raise _RetryWithoutPrivate("closed at CONNECT: retrying as a client")
                        raise LinkDown("closed by the remote during CONNECT")
                    packets = decoder.feed(chunk)
                    if packets:
                        break
            except trio.TooSlowError:
                raise LinkDown("no CONNACK in time") from None
        connack = packets[0]
        if not isinstance(connack, ConnAck):
            raise ProtocolError(f"expected CONNACK, got {type(connack).__name__}")
        if connack.return_code == CONNACK_UNACCEPTABLE_PROTOCOL_VERSION and self.private:
            self.private = False
            raise _RetryWithoutPrivate("bridge protocol flag refused: retrying as a client")
        if connack.return_code != 0:
            raise LinkDown(f"connection refused (CONNACK return code {connack.return_code})")
        return connack

    @staticmethod
    def _free_packet_id(session: Session) -> int:
        packet_id = 65535
        while packet_id in session.inflight:
            packet_id -= 1
        return packet_id

    def _output_ready(self) -> None:
        self._wake.set()

    async def _writer(self, stream: trio.abc.Stream, conn: Connection) -> None:
        while True:
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)
                conn.sent(len(data))
                self.broker.notify_progress()
                continue
            self._wake = trio.Event()
            await self._wake.wait()

    async def _keepalive(self, conn: Connection) -> None:
        while True:
            await trio.sleep(self.config.keepalive_s)
            conn.send(b"\xc0\x00")  # PINGREQ

    async def _reader(
        self, stream: trio.abc.Stream, decoder: Decoder, conn: Connection
    ) -> None:
        broker = self.broker
        silence_s = self.config.keepalive_s * 1.5 + 1
        while True:
            if broker.reading_paused(conn):
                await self.pauses.wait_readable(conn)
            with trio.move_on_after(silence_s):
                data = await stream.receive_some(65536)
                if not data:
                    raise LinkDown("closed by the remote")
                for packet in decoder.feed(data):
                    self._handle(conn, packet)
                continue
            raise LinkDown(f"no answer from the remote for {silence_s:.0f}s")

    def _handle(self, conn: Connection, packet: Any) -> None:
        session: Session = self.session  # type: ignore[assignment]
        if isinstance(packet, Publish):
            self._inbound_publish(conn, session, packet)
        elif isinstance(packet, PubAck):
            if session.on_puback(packet.packet_id):
                if packet.reason_code >= 0x80:
                    self._refused(packet)
                else:
                    self.forwarded += 1
        elif isinstance(packet, PubRec):
            if packet.reason_code >= 0x80:  # 5.0: refused, the exchange ends
                if session.on_pubrec_refused(packet.packet_id):
                    self._refused(packet)
                return
            session.on_pubrec(packet.packet_id)
            conn.send_packet(PubRel(packet.packet_id))
        elif isinstance(packet, PubComp):
            if session.on_pubcomp(packet.packet_id):
                self.forwarded += 1
        elif isinstance(packet, PubRel):
            self.broker.begin_packet()
            if packet.packet_id in session.inbound_qos2:
                session.inbound_qos2.discard(packet.packet_id)
                session.writer.submit(  # type: ignore[union-attr]
                    ops.RemoveInbound(self.client_id, packet.packet_id)
                )
            self.broker.reply(conn, PubComp(packet.packet_id).encode())
        elif isinstance(packet, SubAck):
            refused = [
                t.remote_filter for t, code in zip(self.in_topics, packet.return_codes,
                                                   strict=False) if code >= 0x80
            ]
            if refused:
                log.warning("bridge %s: the remote refused subscriptions %s", self.name, refused)
            self.subscribed = True
        elif not isinstance(packet, PingResp):
            raise ProtocolError(f"unexpected {type(packet).__name__} from the remote broker")

    def _refused(self, packet: PubAck | PubRec) -> None:
        self.refused += 1
        log.warning("bridge %s: the remote refused a message (reason code %#04x)", self.name,
                    packet.reason_code)

    def _inbound_publish(self, conn: Connection, session: Session, packet: Publish) -> None:
        broker = self.broker
        if packet.properties is not None:  # 5.0: keep what is forwarded, make expiry absolute
            packet = v5.inbound(conn, packet, time.time())
        broker.begin_packet()
        packet_id = packet.packet_id
        qos = packet.qos
        route = True
        if qos == 2:
            if packet_id in session.inbound_qos2:
                route = False  # a resend: acknowledged again, not routed again
            else:
                session.inbound_qos2.add(packet_id)
                session.writer.submit(  # type: ignore[union-attr]
                    ops.AddInbound(self.client_id, packet_id)
                )
        if route:
            topic = self._local_topic(packet.topic)
            if topic is None:
                self.unmapped += 1
            else:
                message = attrs.evolve(packet, topic=topic, dup=False, packet_id=0)
                self._inbound = message
                try:
                    broker.publish(message)
                finally:
                    self._inbound = None
                self.received += 1
        if qos == 1:
            broker.reply(conn, PubAck(packet_id).encode(), puback=True)
        elif qos == 2:
            broker.reply(conn, PubRec(packet_id).encode())

    def _link_down(self) -> None:
        conn, self.conn = self.conn, None
        self.state = "down"
        self.subscribed = False
        self.connected_at = None
        if conn is None:
            return
        conn.discard_output()
        self.broker.forget_connection(conn)
        session = self.session
        if session is not None and session.connection is conn:
            session.detach()
            session.disconnected_at = None  # detached, yet not an expiring offline session

    def stats(self) -> dict[str, Any]:
        session = self.session
        return {
            "name": self.name,
            "remote": f"{self.config.host}:{self.config.port}",
            "state": self.state,
            "subscribed": self.subscribed,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "link_losses": self.link_losses,
            "forwarded": self.forwarded,
            "received": self.received,
            "unmapped": self.unmapped,
            "refused": self.refused,
            "protocol": self.config.protocol,
            "inflight": len(session.inflight) if session else 0,
            "queued": session.queued if session else 0,
            "queued_bytes": session.out.bytes if session else 0,
            "dropped": session.out.dropped if session else 0,
            "last_error": self.last_error,
        }


def _tls_context(tls: BridgeTLS) -> ssl.SSLContext:
    """The client-side TLS context of a bridge (files read once, at start-up: a missing or
    broken file stops the broker with the reason)."""
    context = ssl.create_default_context(cafile=tls.cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certfile is not None:
        context.load_cert_chain(tls.certfile, tls.keyfile)
    context.check_hostname = tls.verify_hostname
    return context


def _first_failure(group: BaseExceptionGroup) -> BaseException | None:
    """The first exception in ``group`` that is not a cancellation, if any."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_failure(exc)
            if inner is not None:
                return inner
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return None


async def _say_goodbye(stream: trio.abc.Stream) -> None:
    """Shutdown: send DISCONNECT (best effort, shielded, within a second)."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await stream.send_all(Disconnect().encode(PROTOCOL_311))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _RetryWithoutPrivate(LinkDown):
    """The remote refused the bridge protocol flag: connect again at once without it."""


class Bridges:
    """Every configured bridge, run in one nursery; stopped before the store is flushed."""

    def __init__(self, broker: Broker, pauses: ReadPauses) -> None:
        self.broker = broker
        self.links = [BridgeLink(broker, cfg, pauses) for cfg in broker.config.bridges]
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def setup(self) -> None:
        """Set up the local side of every bridge (after the store is restored, before
        clients connect). A stored ``$bridge/...`` session of a bridge no longer configured
        is left to expire like any offline session."""
        configured = {link.client_id for link in self.links}
        for client_id, session in self.broker.sessions.items():
            if client_id.startswith(BRIDGE_PREFIX) and client_id not in configured:
                if session.disconnected_at is None:
                    session.disconnected_at = time.time()
                    self.broker.writer.submit(  # type: ignore[union-attr]
                        ops.SaveSession(client_id, session.disconnected_at)
                    )
                log.warning(
                    "session %s belongs to a bridge that is no longer configured: its %d "
                    "stored messages are deleted when the session expires", client_id,
                    session.queued + len(session.inflight),
                )
        for link in self.links:
            link.setup()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for link in self.links:
                        nursery.start_soon(link.run)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()

    def stats(self) -> list[dict[str, Any]]:
        return [link.stats() for link in self.links]
