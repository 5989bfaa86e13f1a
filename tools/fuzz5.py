"""MQTT 5.0 in the broker fuzzer (:mod:`tools.fuzz`): level-5 connections and packets, and
the checks of the broker's 5.0 answers from each level-5 client's point of view.

Generation (a third or so of the connections of an episode, and a third of the decoder
inputs): CONNECT at level 5 with random properties (Session Expiry Interval 0 / small / large /
0xFFFFFFFF, small Receive Maximum, small Maximum Packet Size so that deliveries are dropped,
Topic Alias Maximum, Request Problem Information, user properties, sometimes an Authentication
Method: mqttd has no method, CONNACK 0x8C), wills with properties (Will Delay Interval,
Message Expiry, ...); PUBLISH with properties (Message Expiry incl. tiny ones, topic aliases
set / reused with an empty topic / 0 / above the maximum / unknown, content type, response
topic, correlation data, user properties, payload format, rarely a forbidden subscription
identifier); SUBSCRIBE with options (No Local, Retain As Published, Retain Handling 0/1/2),
subscription identifiers and shared subscriptions ``$share/g/f`` (No Local on a shared one
too); UNSUBSCRIBE; PUBACK/PUBREC/PUBREL/PUBCOMP with reason codes (and reason strings);
DISCONNECT 0x00 / 0x04 (with will) / errors, with a Session Expiry Interval; AUTH.

Checks (:class:`Client5`, called by ``BrokerFuzzer``): CONNACK 0 says what the broker allows
(Receive Maximum, Maximum Packet Size, Topic Alias Maximum, an assigned client id for an
empty one), is never sent for an Authentication Method (no method is offered), and Session
Present is 0 for Clean Start; no PUBLISH larger than the client's Maximum Packet Size, and
no other packet over it that carries a reason string or user properties (MQTT-3.1.2-24/25);
never more unacknowledged QoS 1/2 PUBLISHes than the client's Receive Maximum and the
broker's window; topic aliases within the client's Topic Alias Maximum and always
resolvable; subscription identifiers only those the client set; PUBACK/PUBREC reason codes
0x00/0x10/0x87/0x97 (no PUBREL after a PUBREC >= 0x80, in both directions); SUBACK codes
granted <= requested, 0x87 or 0x8F, 0x8F for every invalid filter, never a grant for No
Local on a shared subscription (MQTT-3.8.3-4); UNSUBACK 0x00/0x11 exactly as the session's
subscriptions say; a server DISCONNECT is a valid server reason code, the last packet, and
the connection closes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from mqttd.codec import Decoder, MQTTError
from mqttd.codec.packets import (
    AUTH,
    CONNACK,
    DISCONNECT,
    PROTOCOL_5,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from mqttd.codec.reason import VALID
from mqttd.topics import InvalidTopic, is_shared, parse_shared, validate_topic_filter
from tools.fuzz_base import (
    CLIENT_IDS,
    apply_mutations,
    fail,
    random_cuts,
    random_filter,
    random_mutations,
    random_packet_id,
    random_payload,
    random_topic,
)

if TYPE_CHECKING:
    from tools.fuzz import BrokerFuzzer, Peer

Action = tuple[Any, ...]

# Checks of findings that a long run may tolerate (``--tolerate NAME``), so that a finding
# does not end every episode early (all three are fixed: tests/fuzz/test_v5_fuzz_findings.py):
#   reason-string-size        a reason string / user property on a packet over the client's
#                             Maximum Packet Size (DISCONNECT, CONNACK, PUBACK, PUBREC)
#   pubrel-after-error        PUBREL after the client's PUBREC with a reason code >= 0x80
#   after-disconnect          packets after the server's DISCONNECT
CHECKS = ("reason-string-size", "pubrel-after-error", "after-disconnect")
TOLERATED: set[str] = set()

# -- generation -----------------------------------------------------------------------------------

SESSION_EXPIRIES = (None, None, 0, 0, 5, 3600, 0xFFFFFFFF)
RECEIVE_MAXIMA = (None, None, 1, 1, 2, 3, 65535)
CLIENT_MAX_PACKET_SIZES = (None, None, None, 12, 20, 30, 48, 80, 300)
TOPIC_ALIAS_MAXIMA = (None, 0, 1, 2, 10)
MESSAGE_EXPIRIES = (1, 1, 2, 60, 0xFFFFFFFF, 0)
USER_PROPERTIES = (("a", "b"), ("key", ""), ("é", "ü"), ("k", "v" * 40))
SHARE_GROUPS = ("g", "h")
BAD_SHARES = ("$share/g", "$share//a", "$share/g+/a", "$share/g/", "$share/#/a")
AUTH_METHODS = ("SCRAM-SHA-1", "x")
PUB_ACK_CODES = (0x00, 0x00, 0x10, 0x80, 0x83, 0x87, 0x97, 0x01)
REL_CODES = (0x00, 0x00, 0x92, 0x80)
DISCONNECT_CODES = (0x00, 0x00, 0x04, 0x04, 0x80, 0x81, 0x8E)
# what the broker may answer a PUBLISH with (5.0 PUBACK / PUBREC)
PUBLISH_ANSWERS = frozenset({0x00, 0x10, 0x87, 0x97})
SUBACK_REFUSALS = frozenset({0x87, 0x8F})


def user_properties(rng: random.Random) -> list[tuple[str, str]]:
    return [rng.choice(USER_PROPERTIES) for _ in range(rng.choice((1, 1, 2, 3)))]


def _maybe(rng: random.Random, props: dict[str, Any], name: str, p: float, value: Any) -> None:
    if rng.random() < p and value is not None:
        props[name] = value() if callable(value) else value


def message_properties(rng: random.Random, will: bool = False) -> dict[str, Any]:
    """Properties a PUBLISH and a will share (and a will's delay)."""
    props: dict[str, Any] = {}
    _maybe(rng, props, "message_expiry_interval", 0.3, rng.choice(MESSAGE_EXPIRIES))
    _maybe(rng, props, "payload_format_indicator", 0.1, rng.choice((0, 1)))
    _maybe(rng, props, "content_type", 0.15, rng.choice(("text/plain", "", "application/json")))
    _maybe(rng, props, "response_topic", 0.1, rng.choice(("r/t", "reply", "a/+")))
    _maybe(rng, props, "correlation_data", 0.1, rng.choice((b"", b"\x00\x01", b"id-42")))
    _maybe(rng, props, "user_property", 0.15, lambda: user_properties(rng))
    if will:
        _maybe(rng, props, "will_delay_interval", 0.5, rng.choice((0, 1, 5, 3600, 0xFFFFFFFF)))
    if props.get("response_topic") == "a/+" and rng.random() < 0.8:
        props["response_topic"] = "r/a"  # a wildcard is a protocol error: keep it rare
    return props


def random_connect5(rng: random.Random) -> Connect:
    props: dict[str, Any] = {}
    _maybe(rng, props, "session_expiry_interval", 0.7, rng.choice(SESSION_EXPIRIES))
    _maybe(rng, props, "receive_maximum", 0.6, rng.choice(RECEIVE_MAXIMA))
    _maybe(rng, props, "maximum_packet_size", 0.6, rng.choice(CLIENT_MAX_PACKET_SIZES))
    _maybe(rng, props, "topic_alias_maximum", 0.5, rng.choice(TOPIC_ALIAS_MAXIMA))
    _maybe(rng, props, "request_problem_information", 0.3, rng.choice((0, 1)))
    _maybe(rng, props, "request_response_information", 0.05, 1)
    _maybe(rng, props, "user_property", 0.15, lambda: user_properties(rng))
    if rng.random() < 0.04:
        props["authentication_method"] = rng.choice(AUTH_METHODS)
        _maybe(rng, props, "authentication_data", 0.5, b"client-first")
    will = None
    if rng.random() < 0.3:
        will = Will(random_topic(rng), random_payload(rng), rng.randint(0, 2),
                    rng.random() < 0.3, message_properties(rng, will=True) or None)
    username = password = None
    if rng.random() < 0.1:
        username = rng.choice(("u", "", "ü"))
        if rng.random() < 0.5:
            password = rng.randbytes(rng.randint(0, 4))
    return Connect(
        rng.choice(CLIENT_IDS),
        clean_session=rng.random() < 0.5,
        keepalive_s=rng.choice((0, 10, 60, 65535)),
        protocol_level=PROTOCOL_5,
        will=will,
        username=username,
        password=password,
        properties=props or None,
    )


def random_publish5(rng: random.Random) -> Publish:
    qos = rng.choice((0, 0, 1, 1, 2))
    dup = qos > 0 and rng.random() < 0.1
    topic = random_topic(rng)
    props = message_properties(rng)
    r = rng.random()
    if r < 0.25:  # set (or change) an alias
        props["topic_alias"] = rng.randint(1, 3)
    elif r < 0.40:  # use one: known if this connection set it before
        props["topic_alias"] = rng.randint(1, 3)
        topic = ""
    elif r < 0.42:
        props["topic_alias"] = 0
    elif r < 0.44:
        props["topic_alias"] = rng.choice((11, 65535))
    elif r < 0.45:
        topic = ""  # and no alias
    if rng.random() < 0.01:
        props["subscription_identifier"] = [1]  # only the server may send one
    packet_id = random_packet_id(rng) if qos else 0
    return Publish(topic, random_payload(rng), qos, rng.random() < 0.15, dup, packet_id,
                   props or None)


def random_filter5(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return f"$share/{rng.choice(SHARE_GROUPS)}/{random_filter(rng)}"
    if r < 0.22:
        return rng.choice(BAD_SHARES)
    return random_filter(rng)


def random_subscribe5(rng: random.Random) -> Subscribe:
    subs = tuple(
        Subscription(
            random_filter5(rng),
            rng.choice((0, 1, 2, 2, 1)) if rng.random() > 0.01 else 3,
            no_local=rng.random() < 0.25,
            retain_as_published=rng.random() < 0.25,
            retain_handling=rng.choice((0, 0, 1, 2)),
        )
        for _ in range(rng.choice((1, 1, 2, 3)))
    )
    props: dict[str, Any] = {}
    _maybe(rng, props, "subscription_identifier", 0.4, rng.choice((1, 2, 3, 7, 268_435_455)))
    _maybe(rng, props, "user_property", 0.1, lambda: user_properties(rng))
    return Subscribe(random_packet_id(rng), subs, props or None)


def random_disconnect5(rng: random.Random) -> Disconnect:
    props: dict[str, Any] = {}
    _maybe(rng, props, "session_expiry_interval", 0.3, rng.choice(SESSION_EXPIRIES))
    _maybe(rng, props, "reason_string", 0.1, "bye")
    return Disconnect(rng.choice(DISCONNECT_CODES), props or None)


def random_auth(rng: random.Random) -> Auth:
    props: dict[str, Any] = {}
    _maybe(rng, props, "authentication_method", 0.8, rng.choice(AUTH_METHODS))
    _maybe(rng, props, "authentication_data", 0.5, b"step")
    return Auth(rng.choice((0x00, 0x18, 0x19)), props or None)


def random_ack5(rng: random.Random) -> Packet:
    cls = rng.choice((PubAck, PubRec, PubRel, PubComp))
    code = rng.choice(PUB_ACK_CODES if cls in (PubAck, PubRec) else REL_CODES)
    props = {"reason_string": "why"} if rng.random() < 0.1 else None
    return cls(random_packet_id(rng), code, props)  # type: ignore[no-any-return]


def random_server_packet5(rng: random.Random) -> Packet:
    kind = rng.randrange(6)
    if kind == 0:
        props: dict[str, Any] = {}
        _maybe(rng, props, "receive_maximum", 0.5, rng.choice((1, 20)))
        _maybe(rng, props, "assigned_client_identifier", 0.3, "auto-1")
        _maybe(rng, props, "reason_string", 0.3, "no")
        _maybe(rng, props, "server_keep_alive", 0.2, 30)
        _maybe(rng, props, "maximum_qos", 0.1, rng.choice((0, 1)))
        return ConnAck(rng.random() < 0.5, rng.choice((0, 0, 0x80, 0x85, 0x8C)), props or None)
    if kind == 1:
        codes = tuple(rng.choice((0, 1, 2, 0x80, 0x87, 0x8F, 0x97)) for _ in range(2))
        return SubAck(random_packet_id(rng), codes,
                      {"reason_string": "x"} if rng.random() < 0.3 else None)
    if kind == 2:
        return UnsubAck(random_packet_id(rng), (rng.choice((0, 0x11, 0x80, 0x8F)),))
    if kind == 3:
        return Disconnect(rng.choice((0x00, 0x81, 0x8B, 0x8E, 0x93, 0x94, 0x95)),
                          {"server_reference": "other"} if rng.random() < 0.2 else None)
    if kind == 4:
        return random_auth(rng)
    return PingResp()


def random_client_packet5(rng: random.Random) -> Packet:
    """A packet a connected level-5 client might send, mostly valid."""
    r = rng.random()
    if r < 0.48:
        return random_publish5(rng)
    if r < 0.62:
        return random_subscribe5(rng)
    if r < 0.69:
        props = {"user_property": user_properties(rng)} if rng.random() < 0.1 else None
        return Unsubscribe(random_packet_id(rng),
                           tuple(random_filter5(rng) for _ in range(rng.choice((1, 1, 2)))), props)
    if r < 0.73:
        return PingReq()
    if r < 0.77:
        return random_disconnect5(rng)
    if r < 0.88:
        return random_ack5(rng)
    if r < 0.91:
        return random_auth(rng)
    if r < 0.93:
        return random_connect5(rng)
    return random_server_packet5(rng)


def random_any_packet5(rng: random.Random) -> Packet:
    r = rng.random()
    if r < 0.15:
        return random_connect5(rng)
    if r < 0.3:
        return random_server_packet5(rng)
    return random_client_packet5(rng)


def random_decoder_packets5(rng: random.Random) -> tuple[list[bytes], bytes, int]:
    """Encoded level-5 packets for the decoder target, another one (for splices), and how the
    decoder starts: 5 (at level 5) or 1 (accepting 5.0: a level-5 CONNECT comes first)."""
    parts = [random_any_packet5(rng).encode(PROTOCOL_5) for _ in range(rng.choice((1, 1, 2, 3)))]
    level = 5
    if rng.random() < 0.3:
        parts.insert(0, random_connect5(rng).encode())
        level = 1
    return parts, random_any_packet5(rng).encode(PROTOCOL_5), level


def random_connect_action5(rng: random.Random) -> Action:
    parts = [random_connect5(rng).encode()]
    if rng.random() < 0.2:
        parts += [random_client_packet5(rng).encode(PROTOCOL_5) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.07:
        parts[0] = apply_mutations(parts[0], random_mutations(rng), parts[-1])
    data = b"".join(parts)
    return ("connect", data, random_cuts(rng, len(data)) if rng.random() < 0.3 else ())


def random_send_action5(rng: random.Random, peer: int) -> Action:
    """("send5", peer, data, cuts): a level-5 peer sends level-5 packets; or ("ack5", peer,
    kind, pick, reason code, with a reason string): an ack with a reason code."""
    if rng.random() < 0.2:
        kind = rng.choice((PUBACK, PUBACK, PUBREC, PUBREL, PUBCOMP))
        codes = PUB_ACK_CODES if kind in (PUBACK, PUBREC) else REL_CODES
        return ("ack5", peer, kind, rng.randrange(1 << 16), rng.choice(codes[:-1]),
                rng.random() < 0.1)
    packets = [random_client_packet5(rng) for _ in range(rng.choice((1, 1, 1, 1, 2, 3)))]
    parts = [p.encode(PROTOCOL_5) for p in packets]
    if rng.random() < 0.08:
        k = rng.randrange(len(parts))
        parts[k] = apply_mutations(parts[k], random_mutations(rng), parts[-1])
    data = b"".join(parts)
    return ("send5", peer, data, random_cuts(rng, len(data)) if rng.random() < 0.2 else ())


# -- the client's side ----------------------------------------------------------------------------


def _filter_valid(topic_filter: str) -> bool:
    try:
        validate_topic_filter(topic_filter)
        if is_shared(topic_filter):
            parse_shared(topic_filter)
    except InvalidTopic:
        return False
    return True


class Client5:
    """What a level-5 client asked for in its CONNECT and learnt on its connection."""

    def __init__(self, connect: Connect) -> None:
        props = connect.properties or {}
        self.connect = connect
        self.receive_maximum: int = props.get("receive_maximum", 65535)
        self.max_packet_size: int = props.get("maximum_packet_size", 0)
        self.topic_alias_maximum: int = props.get("topic_alias_maximum", 0)
        self.auth = "authentication_method" in props
        self.window = 65535  # the broker's window for this client id (known at CONNACK)
        self.aliases: dict[int, str] = {}  # topic aliases the broker set up
        self.server_disconnect: Packet | None = None
        # UNSUBSCRIBE being answered -> the reason codes due (from the session's filters)
        self.unsuback_due: dict[int, tuple[int, ...]] = {}

    @classmethod
    def starting(cls, opening: bytes) -> Client5:
        """The client whose first bytes were ``opening`` (a level-5 CONNECT the broker took)."""
        try:
            packets = Decoder(accept_v5=True).feed(opening)
        except MQTTError as exc:
            packets = exc.packets_before
        connect = packets[0] if packets else None
        if not isinstance(connect, Connect):
            fail(f"the broker took a 5.0 CONNECT from a client that sent {opening.hex()}")
        return cls(connect)  # type: ignore[arg-type]

    # the broker handles a packet of this client
    def begin(self, fuzzer: BrokerFuzzer, peer: Peer, packet: Packet) -> None:
        session = peer.conn.session
        if isinstance(packet, Subscribe):
            sub_id = (packet.properties or {}).get("subscription_identifier")
            if sub_id:
                fuzzer.sub_ids.setdefault(peer.conn.client_id, set()).add(sub_id)
        elif isinstance(packet, Unsubscribe) and session is not None:
            subscribed = set(session.subscriptions)
            codes = []
            for topic_filter in packet.filters:
                codes.append(0x00 if topic_filter in subscribed else 0x11)
                subscribed.discard(topic_filter)
            self.unsuback_due[id(packet)] = tuple(codes)
        elif (
            isinstance(packet, PubRec) and packet.reason_code >= 0x80
            and "pubrel-after-error" not in TOLERATED
        ):
            if peer.outstanding.get(packet.packet_id) == (2, False):
                del peer.outstanding[packet.packet_id]  # the QoS 2 exchange ends here

    def check_sizes(self, data: bytes) -> None:
        """No PUBLISH over the client's Maximum Packet Size; other packets over it only when
        the specification leaves no way out (no reason string, no user property on them)."""
        limit = self.max_packet_size
        if not limit:
            return
        i, n = 0, len(data)
        while i < n:
            j, length, shift = i + 1, 0, 0
            while j < n and data[j] & 0x80:
                length |= (data[j] & 0x7F) << shift
                shift += 7
                j += 1
            if j >= n:
                return  # (the peer's decoder reports a broken stream)
            length |= data[j] << shift
            end = j + 1 + length
            if end - i > limit:
                packet_bytes = bytes(data[i:end])
                try:
                    [packet] = Decoder(protocol_level=PROTOCOL_5).feed(packet_bytes)
                except (MQTTError, ValueError):
                    return
                props = getattr(packet, "properties", None) or {}
                if packet.TYPE == PUBLISH or (
                    ("reason_string" in props or "user_property" in props)
                    and "reason-string-size" not in TOLERATED
                ):
                    fail(f"a {end - i}-byte {packet!r} to a client whose Maximum Packet Size is "
                         f"{limit} (MQTT-3.1.2-24/25)")
            i = end

    def check_server_packet(self, fuzzer: BrokerFuzzer, peer: Peer, packet: Packet) -> bool:
        """The 5.0 checks of one packet from the broker, before the 3.1.1 ones; True when it
        is fully checked here (DISCONNECT)."""
        kind = packet.TYPE
        if self.server_disconnect is not None:
            if "after-disconnect" in TOLERATED:
                return kind == DISCONNECT
            fail(f"{peer}: {packet!r} after the server's {self.server_disconnect!r}")
        if kind == DISCONNECT:
            code = packet.reason_code  # type: ignore[union-attr]
            if not peer.connacked or peer.refused:
                fail(f"{peer}: {packet!r} without a CONNACK 0 before it")
            if code not in VALID[DISCONNECT] or code in (0x04, 0x00):
                fail(f"{peer}: a server DISCONNECT with reason code {code:#04x}")
            self.server_disconnect = packet
            return True
        if kind == AUTH:
            fail(f"{peer}: {packet!r}, but mqttd offers no authentication method")
        if kind == CONNACK:
            self._check_connack(fuzzer, peer, packet)  # type: ignore[arg-type]
        elif kind == PUBLISH:
            self._check_publish(fuzzer, peer, packet)  # type: ignore[arg-type]
        elif kind == PUBREL:
            handling = peer.handling
            if (
                isinstance(handling, PubRec) and handling.reason_code >= 0x80
                and "pubrel-after-error" not in TOLERATED
            ):
                fail(f"{peer}: {packet!r} after the client's {handling!r} ended the exchange")
        return False

    def _check_connack(self, fuzzer: BrokerFuzzer, peer: Peer, packet: ConnAck) -> None:
        code = packet.return_code
        if code and (code < 0x80 or code not in VALID[CONNACK]):
            fail(f"{peer}: CONNACK with reason code {code:#04x}")
        if code:
            return
        if self.auth:
            fail(f"{peer}: {packet!r} accepts an Authentication Method no one offers (0x8C due)")
        if self.connect.clean_session and packet.session_present:
            fail(f"{peer}: {packet!r} with Session Present for a Clean Start")
        limits = fuzzer.config.limits
        props = packet.properties or {}
        wanted = {
            "receive_maximum": min(limits.max_receive_messages, 65535),
            "maximum_packet_size": min(limits.max_packet_size_bytes, 268_435_455),
            "topic_alias_maximum": limits.max_topic_aliases or None,
        }
        for name, value in wanted.items():
            if props.get(name) != value:
                fail(f"{peer}: {packet!r}: {name} should be {value}")
        if not self.connect.client_id and not props.get("assigned_client_identifier"):
            fail(f"{peer}: {packet!r} has no Assigned Client Identifier for an empty one")
        self.window = fuzzer.config.limits_for(peer.conn.client_id).max_inflight_messages

    def _check_publish(self, fuzzer: BrokerFuzzer, peer: Peer, packet: Publish) -> None:
        props = packet.properties or {}
        topic = packet.topic
        alias = props.get("topic_alias")
        if alias is not None:
            if not 1 <= alias <= self.topic_alias_maximum:
                fail(f"{peer}: {packet!r} uses topic alias {alias}; the client's Topic Alias "
                     f"Maximum is {self.topic_alias_maximum}")
            if topic:
                self.aliases[alias] = topic
            elif alias not in self.aliases:
                fail(f"{peer}: {packet!r} uses topic alias {alias}, never set up")
        elif not topic:
            fail(f"{peer}: {packet!r} with an empty topic and no alias")
        ids = props.get("subscription_identifier")
        if ids:
            known = fuzzer.sub_ids.get(peer.conn.client_id, set())
            if not set(ids) <= known:
                fail(f"{peer}: {packet!r} carries subscription identifiers {ids}; the client "
                     f"set only {sorted(known)}")
        interval = props.get("message_expiry_interval")
        if interval is not None and interval < 1:
            fail(f"{peer}: {packet!r} with Message Expiry Interval {interval}")
        if packet.qos and packet.packet_id not in peer.outstanding:
            limit = min(self.receive_maximum, self.window)
            if len(peer.outstanding) + 1 > limit:
                fail(f"{peer}: {packet!r} makes {len(peer.outstanding) + 1} unacknowledged QoS "
                     f"1/2 PUBLISHes; the client's Receive Maximum is {self.receive_maximum}, "
                     f"the broker's window {self.window} (MQTT-3.3.4-9)")

    def check_answer(self, peer: Peer, packet: Packet, request: Packet) -> None:
        """An ordered answer (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) to ``request``."""
        kind = packet.TYPE
        if kind in (PUBACK, PUBREC):
            code = packet.reason_code  # type: ignore[union-attr]
            if code not in PUBLISH_ANSWERS or (code == 0x97 and kind == PUBACK):
                fail(f"{peer}: {packet!r} answers {request!r} with reason code {code:#04x}")
        elif kind == PUBCOMP:
            if packet.reason_code not in (0x00, 0x92):  # type: ignore[union-attr]
                fail(f"{peer}: {packet!r} with an unexpected reason code")
        elif kind == SUBACK:
            assert isinstance(packet, SubAck) and isinstance(request, Subscribe)
            for code, sub in zip(packet.return_codes, request.subscriptions, strict=True):
                if code > 2 and code not in SUBACK_REFUSALS:
                    fail(f"{peer}: {packet!r}: reason code {code:#04x} for {sub!r}")
                if not _filter_valid(sub.filter) and code != 0x8F:
                    fail(f"{peer}: {packet!r}: {sub.filter!r} is not a valid filter (0x8F due)")
                if code <= 2 and sub.no_local and is_shared(sub.filter):
                    fail(f"{peer}: {packet!r} grants No Local on the shared subscription "
                         f"{sub.filter!r} (a protocol error, MQTT-3.8.3-4)")
        elif kind == UNSUBACK:
            assert isinstance(packet, UnsubAck)
            due = self.unsuback_due.pop(id(request), None)
            if due is not None and packet.reason_codes != due:
                fail(f"{peer}: {packet!r} answers {request!r}; the session's subscriptions say "
                     f"{due}")

    def check_after_step(self, peer: Peer) -> None:
        if self.server_disconnect is not None and not peer.conn.closing:
            fail(f"{peer}: the broker sent {self.server_disconnect!r} and kept the connection")
