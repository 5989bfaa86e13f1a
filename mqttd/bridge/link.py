"""A bridge's link: this broker connects to a remote MQTT broker as a client and carries
messages across, per topic mapping (:mod:`mqttd.bridge.mapping`).

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

The link runs on the listeners' stream task (:mod:`mqttd.server.stream_task`: reader,
writer, read pauses) and answers its remote's acks and PUBREL with the engine's handlers
(:mod:`mqttd.engine.publish`), as the broker does for a client; the CONNECT / CONNACK
exchange is :mod:`mqttd.client_role`'s. What is the link's own: opening the socket (TLS),
the handshake's bridge rules, PINGREQ every keepalive period, the backoff, the counters.

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
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import client_role, v5
from mqttd.codec import Decoder, MQTTError, ProtocolError
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG, PUBACK, PUBREC
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_311,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
)
from mqttd.codec.reason import CONNACK_UNACCEPTABLE_PROTOCOL_VERSION
from mqttd.config import Bridge as BridgeConfig
from mqttd.connection import Connection
from mqttd.engine import publish
from mqttd.outqueue import QueueLimits
from mqttd.server.stream_task import StreamTask
from mqttd.server.tls import client_context
from mqttd.session import Session
from persistence import ops

if TYPE_CHECKING:
    from mqttd.bridge.mapping import TopicMapping
    from mqttd.delivery import Fanout
    from mqttd.engine.dispatch import Engine as Broker
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger("mqttd.bridge")

STABLE_LINK_S = 30.0  # a link up this long resets the reconnect delay to its minimum


class LinkDown(Exception):
    """The link failed: the message says why (logged, counted, then reconnect)."""


class _RetryWithoutPrivate(LinkDown):
    """The remote refused the bridge protocol flag: connect again at once without it."""




class BridgeLink:
    """One configured bridge: the local session, the remote connection, the counters."""

    def __init__(
        self, broker: Broker, config: BridgeConfig, pauses: ReadPauses, mapping: TopicMapping
    ) -> None:
        self.broker = broker
        self.pauses = pauses
        self.config = config
        self.mapping = mapping
        self.name = config.name
        self.client_id = config.local_client_id
        self.session: Session | None = None
        self.conn: Connection | None = None
        self.tls_context = client_context(config.tls) if config.tls is not None else None
        self.state = "down"
        self.subscribed = False  # the remote answered the ``in`` subscriptions
        self.level = PROTOCOL_5 if config.protocol == "5" else PROTOCOL_311
        # 5.0 has No Local for what try_private does for 3.1.1
        self.private = config.try_private and self.level == PROTOCOL_311
        self._inbound: Publish | None = None  # the message being routed in from the remote
        self._decoder: Decoder | None = None  # the remote's packets (from the handshake on)
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
        self._subscribe_locally(session)
        self.session = session
        if session.queued or session.inflight:
            log.info(
                "bridge %s: %d messages stored for %s:%d (%d in flight)", self.name,
                session.queued + len(session.inflight), cfg.host, cfg.port,
                len(session.inflight),
            )

    def _subscribe_locally(self, session: Session) -> None:
        writer = self.broker.writer
        assert writer is not None
        trie = self.broker.router.trie
        wanted = self.mapping.local_filters()
        for topic_filter in list(session.subscriptions):
            if topic_filter not in wanted:
                del session.subscriptions[topic_filter]
                trie.remove(topic_filter, self.client_id)
                writer.submit(ops.RemoveSubscription(self.client_id, topic_filter))
        for topic_filter, qos in wanted.items():
            session.subscriptions[topic_filter] = qos
            trie.add(topic_filter, self.client_id, self, qos)
            writer.submit(ops.AddSubscription(self.client_id, topic_filter, qos))

    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: Fanout[Any] | None
    ) -> None:
        """The router hands a local message to the bridge: map it to its remote topic and
        queue it on the bridge's session (stored, sent when the link has room)."""
        if message is self._inbound:
            return  # it came from the remote through this link: never send it back
        remote = self.mapping.outbound(message)
        if remote is None:
            self.unmapped += 1
            return
        self.session.deliver(remote, remote.qos, message.retain, None)  # type: ignore[union-attr]

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
                self._failed(exc)
                if isinstance(exc, _RetryWithoutPrivate):
                    continue
                if time.monotonic() - started >= STABLE_LINK_S:
                    delay = cfg.reconnect_delay_min_s
                wait_s = random.uniform(delay / 2, delay)
                self.next_attempt_in_s = wait_s
                session = self.session
                log.warning(
                    "bridge %s: %s:%d: %s; %d messages queued for it; retrying in %.1fs",
                    self.name, cfg.host, cfg.port, self.last_error,
                    (session.queued + len(session.inflight)) if session else 0, wait_s,
                )
                await trio.sleep(wait_s)
                delay = min(delay * 2, cfg.reconnect_delay_max_s)
            finally:
                if self.conn is not None:  # cancelled (shutdown)
                    self._link_down()

    def _failed(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        if self.conn is None:
            self.connect_failures += 1
        else:
            self.link_losses += 1
        self._link_down()

    async def _connect_and_serve(self) -> None:
        self.state = "connecting"
        stream = await self._open_stream()
        async with stream:
            exchange, connack = await self._handshake(stream)
            self._decoder = exchange.decoder
            conn = self._new_connection(exchange.connect, connack)
            await self._serve(stream, conn, exchange.leftovers)

    async def _open_stream(self) -> trio.abc.Stream:
        cfg = self.config
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
        return stream

    async def _handshake(
        self, stream: trio.abc.Stream
    ) -> tuple[client_role.Handshake, ConnAck]:
        cfg = self.config
        properties = None
        if self.level == PROTOCOL_5:  # a kept session is kept for good (0xFFFFFFFF)
            properties = {"session_expiry_interval": 0 if cfg.clean_session else 0xFFFFFFFF}
        exchange = client_role.Handshake(Connect(
            cfg.remote_client_id(), cfg.clean_session, cfg.keepalive_s,
            self.level | BRIDGE_LEVEL_FLAG if self.private else self.level,
            None, cfg.username, cfg.password.encode() if cfg.password is not None else None,
            properties,
        ))
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                connack = await client_role.handshake(stream, exchange)
        except trio.TooSlowError:
            raise LinkDown("no CONNACK in time") from None
        if connack is None:
            if self.private:  # some brokers close instead of answering 0x01
                self.private = False
                raise _RetryWithoutPrivate("closed at CONNECT: retrying as a client")
            raise LinkDown("closed by the remote during CONNECT")
        if connack.return_code == CONNACK_UNACCEPTABLE_PROTOCOL_VERSION and self.private:
            self.private = False
            raise _RetryWithoutPrivate("bridge protocol flag refused: retrying as a client")
        if connack.return_code != 0:
            raise LinkDown(f"connection refused (CONNACK return code {connack.return_code})")
        return exchange, connack

    def _new_connection(self, connect: Connect, connack: ConnAck) -> Connection:
        """The link is up: its Connection (the remote's limits from its 5.0 CONNACK)."""
        cfg = self.config
        session: Session = self.session  # type: ignore[assignment]
        flow_limits = self.broker.config.limits
        # the link is a subscriber like any other: a slow remote paces the local publishers
        # feeding it (mqttd.engine.flow), until it counts as stalled
        conn = Connection(
            peer=f"{cfg.host}:{cfg.port}", account=self.broker.buffers,
            pace_bytes=flow_limits.output_high_watermark_bytes,
            pace_messages=flow_limits.queue_high_watermark_messages,
            on_fed=self.broker.flow.fed,
        )
        conn.client_id = self.client_id
        conn.protocol_level = self.level
        conn.session = session  # for the engine's handlers of the remote's packets
        if self.level == PROTOCOL_5:
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
            "forward)", self.name, cfg.host, cfg.port, connect.client_id,
            connack.session_present, session.queued + len(session.inflight),
        )
        return conn

    async def _serve(
        self, stream: trio.abc.Stream, conn: Connection, leftovers: list[Packet]
    ) -> None:
        silence_s = self.config.keepalive_s * 1.5 + 1
        try:
            task, timed_out = await self._run_tasks(stream, conn, leftovers, silence_s)
        except BaseExceptionGroup as group:
            failure = _first_failure(group)
            if failure is not None:
                raise failure from None
            await _say_goodbye(stream)  # cancelled: shutdown
            raise
        except trio.Cancelled:
            await _say_goodbye(stream)
            raise
        if task.failure is not None:
            raise task.failure
        if task.peer_closed:
            raise LinkDown("closed by the remote")
        if timed_out:
            raise LinkDown(f"no answer from the remote for {silence_s:.0f}s")
        raise LinkDown(f"closed: {conn.close_reason or 'by the broker'}")

    async def _run_tasks(
        self, stream: trio.abc.Stream, conn: Connection, leftovers: list[Packet],
        silence_s: float,
    ) -> tuple[StreamTask, bool]:
        """The stream task (reader, writer) and the pings, until the link ends; whether it
        ended by silence."""
        async with trio.open_nursery() as nursery:
            task = StreamTask(
                self.broker, self.pauses, stream, conn, nursery,
                handle_data=self._receive, idle_timeout_s=silence_s,
            )
            try:
                self._start(conn, leftovers)
                nursery.start_soon(self._keepalive, conn)
                timed_out = await task.serve(trio.current_time() + silence_s)
            finally:
                # no writer starts any more (this nursery closes before the link is marked
                # down): what the session still sends meanwhile waits, to be discarded
                conn.on_output = _no_writer
            nursery.cancel_scope.cancel()  # the keepalive (and a writer still sending)
        return task, timed_out

    def _start(self, conn: Connection, leftovers: list[Packet]) -> None:
        """Subscribe at the remote (``in`` mappings), resend what is in flight (DUP), then
        the queue; handle what came with the CONNACK."""
        session: Session = self.session  # type: ignore[assignment]
        if self.mapping.in_topics:
            v5_link = self.level == PROTOCOL_5
            conn.send_packet(Subscribe(
                client_role.free_packet_id(range(65535, 0, -1), session.inflight),
                self.mapping.remote_subscriptions(v5_link), {} if v5_link else None,
            ))
        session.attach(conn)
        for packet in leftovers:
            self._handle(conn, packet)

    async def _keepalive(self, conn: Connection) -> None:
        while True:
            await trio.sleep(self.config.keepalive_s)
            conn.send(client_role.PINGREQ)

    # -- the remote's packets ----------------------------------------------------------

    def _receive(self, conn: Connection, data: bytes) -> None:
        for packet in self._decoder.feed(data):  # type: ignore[union-attr]
            self._handle(conn, packet)

    def _handle(self, conn: Connection, packet: Packet) -> None:
        broker = self.broker
        broker.begin_packet()  # what the packet writes, its reply waits for
        if isinstance(packet, Publish):
            self._inbound_publish(conn, packet)
        elif isinstance(packet, PubAck):
            if publish.on_puback(broker, conn, packet):
                if packet.reason_code >= 0x80:
                    self._refused(packet)
                else:
                    self.forwarded += 1
        elif isinstance(packet, PubRec):
            if publish.on_pubrec(broker, conn, packet) and packet.reason_code >= 0x80:
                self._refused(packet)  # 5.0: refused, the exchange ends
        elif isinstance(packet, PubComp):
            if publish.on_pubcomp(broker, conn, packet):
                self.forwarded += 1
        elif isinstance(packet, PubRel):
            publish.on_pubrel(broker, conn, packet)
        elif isinstance(packet, SubAck):
            refused = self.mapping.refused_filters(packet.return_codes)
            if refused:
                log.warning("bridge %s: the remote refused subscriptions %s", self.name, refused)
            self.subscribed = True
        elif not isinstance(packet, PingResp):
            raise ProtocolError(f"unexpected {type(packet).__name__} from the remote broker")

    def _refused(self, packet: PubAck | PubRec) -> None:
        self.refused += 1
        log.warning("bridge %s: the remote refused a message (reason code %#04x)", self.name,
                    packet.reason_code)

    def _inbound_publish(self, conn: Connection, packet: Publish) -> None:
        """Published here under its local topic, once (QoS 2: the engine's bookkeeping),
        and acknowledged after the commit of what that wrote."""
        session: Session = self.session  # type: ignore[assignment]
        if packet.properties is not None:  # 5.0: keep what is forwarded, make expiry absolute
            packet = v5.inbound(conn, packet, time.time())
        packet_id = packet.packet_id
        qos = packet.qos
        if qos == 2 and packet_id in session.inbound_qos2:
            pass  # a resend: acknowledged again, not routed again
        else:
            if qos == 2:
                publish.remember_qos2(session, packet_id)
            self._publish_locally(packet)
        if qos:
            kind = PUBACK if qos == 1 else PUBREC
            self.broker.reply(conn, conn.encode_ack(kind, packet_id), puback=qos == 1)

    def _publish_locally(self, packet: Publish) -> None:
        topic = self.mapping.local_topic(packet.topic)
        if topic is None:
            self.unmapped += 1
            return
        message = attrs.evolve(packet, topic=topic, dup=False, packet_id=0)
        self._inbound = message
        try:
            self.broker.publish(message)
        finally:
            self._inbound = None
        self.received += 1

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


def _no_writer() -> None:
    """The link's tasks have ended: nobody sends any more."""


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

