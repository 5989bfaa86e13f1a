"""Acknowledgements byte for byte, at protocol levels 3 (MQTT 3.1), 4 (3.1.1) and 5, for
clients that check them strictly.

- A success or 0x10 (No matching subscribers) PUBACK / PUBREC / PUBCOMP has a remaining
  length of 2 or 3 and no properties; a reason string goes only with an error code and only
  when the client allows problem information. SUBACK / UNSUBACK carry no properties.
- A PUBLISH answered with the wrong kind of ack (PUBREC or PUBCOMP for QoS 1, PUBACK for QoS
  2, PUBCOMP before PUBREC) is a protocol error: the connection is closed (5.0: DISCONNECT
  0x82 first), the message stays in the session and comes again, with DUP, on the next
  connection; everyone else goes on being served.
- MQTT 3.1 sets DUP on a PUBREL, SUBSCRIBE or UNSUBSCRIBE sent again (0x6A, 0x8A, 0xAA): taken
  at level 3, Malformed Packet at levels 4 and 5.
- An ack for a packet identifier the broker does not know: 5.0 answers PUBREL / PUBCOMP 0x92
  (Packet Identifier not found), 3.x the plain PUBREL / PUBCOMP.

Exact bytes are read with a PINGREQ barrier: the broker answers PINGREQ after everything it
queued before it, so "these bytes, then d0 00" proves nothing else (and nothing longer) came.
"""

from __future__ import annotations

import pytest
import trio

from mqttd.broker import running
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_31,
    PROTOCOL_311,
    Disconnect,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from tests.conftest import make_config
from tests.integration.test_v5_broker import connect, subscribe
from tests.rawclient import RawClient

LEVELS = (PROTOCOL_31, PROTOCOL_311, PROTOCOL_5)
TEST_TIMEOUT_S = 15
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def pid_bytes(packet_id: int) -> bytes:
    return packet_id.to_bytes(2, "big")


async def exact_reply(client: RawClient, data: bytes, expected: bytes) -> None:
    """Send ``data`` and a PINGREQ; the broker's answer must be ``expected`` and then the
    PINGRESP, byte for byte."""
    assert not client.received, client.received
    await client.stream.send_all(data + PINGREQ)
    want = expected + PINGRESP
    got = b""
    while len(got) < len(want):
        chunk = await client.stream.receive_some(65536)
        assert chunk, f"closed after {got.hex(' ')}"
        got += chunk
        if not want.startswith(got[: len(want)]):
            break
    assert got.hex(" ") == want.hex(" ")


async def closed_after(client: RawClient) -> list:
    """The packets the broker sent before closing the connection."""
    return await client.expect_closed()


# -- success and 0x10 acks: remaining length 2 or 3, never properties ---------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("problem_information", [True, False])
async def test_acks_of_a_publish_nobody_receives(level: int, problem_information: bool):
    """QoS 1 and 2 to a topic without subscribers: 5.0 says 0x10 in a three-byte body, with no
    reason string even though the client allows problem information; 3.x the plain ack."""
    props = {} if problem_information or level != PROTOCOL_5 else {
        "request_problem_information": 0
    }
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "pub", level=level, **props)
            code = b"\x10" if level == PROTOCOL_5 else b""
            length = bytes((2 + len(code),))
            await exact_reply(
                client, Publish("nobody/here", b"x", 1, packet_id=1).encode(level),
                b"\x40" + length + pid_bytes(1) + code,
            )
            await exact_reply(
                client, Publish("nobody/here", b"x", 2, packet_id=2).encode(level),
                b"\x50" + length + pid_bytes(2) + code,
            )
            await exact_reply(client, PubRel(2).encode(level), b"\x70\x02" + pid_bytes(2))


@pytest.mark.parametrize("level", LEVELS)
async def test_acks_of_a_publish_somebody_receives(level: int):
    """With a subscriber every ack is the four-byte Success form, at every level."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            sub, _ = await connect(broker.port, "sub", level=level)
            await subscribe(sub, Subscription("somebody/#", 0))
            client, _ = await connect(broker.port, "pub", level=level)
            await exact_reply(
                client, Publish("somebody/here", b"x", 1, packet_id=1).encode(level),
                b"\x40\x02" + pid_bytes(1),
            )
            await exact_reply(
                client, Publish("somebody/here", b"x", 2, packet_id=2).encode(level),
                b"\x50\x02" + pid_bytes(2),
            )
            await exact_reply(client, PubRel(2).encode(level), b"\x70\x02" + pid_bytes(2))


async def test_suback_and_unsuback_carry_no_properties():
    """5.0 SUBACK / UNSUBACK: packet id, property length 0, the codes (0x8F for an invalid
    filter, 0x11 for no subscription), whatever the client allows."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "c")
            subscribe_ = Subscribe(1, (Subscription("a/#", 1), Subscription("a/#/b", 0)))
            await exact_reply(client, subscribe_.encode(PROTOCOL_5),
                              bytes.fromhex("90 05 0001 00 01 8f"))
            unsubscribe = Unsubscribe(2, ("a/#", "nothing"))
            await exact_reply(client, unsubscribe.encode(PROTOCOL_5),
                              bytes.fromhex("b0 05 0002 00 00 11"))


@pytest.mark.parametrize("problem_information", [True, False])
async def test_an_error_ack_has_a_reason_string_only_if_the_client_allows_it(
    problem_information: bool,
):
    """PUBREC 0x97 (more QoS 2 messages awaiting PUBREL than allowed): with the reason string
    when the client allows problem information (the default), in a three-byte body when it
    said 0."""
    props = {} if problem_information else {"request_problem_information": 0}
    text = b"too many QoS 2 messages awaiting PUBREL"
    if problem_information:  # id, code, property length, 0x1F + string length + string
        expected = bytes((0x50, 3 + 1 + 3 + len(text), 0, 2, 0x97, 3 + len(text), 0x1F,
                          0, len(text))) + text
    else:
        expected = b"\x50\x03" + pid_bytes(2) + b"\x97"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_inbound_qos2=1)) as broker:
            client, _ = await connect(broker.port, "pub", **props)
            await exact_reply(
                client, Publish("t", b"x", 2, packet_id=1).encode(PROTOCOL_5),
                b"\x50\x03" + pid_bytes(1) + b"\x10",
            )
            await exact_reply(
                client, Publish("t", b"x", 2, packet_id=2).encode(PROTOCOL_5), expected
            )


# -- the wrong kind of ack ends the connection; the message comes again ---------------------

WRONG_ACKS = [  # (QoS of the delivery, the wrong answer)
    pytest.param(1, PubRec, id="pubrec-for-qos1"),
    pytest.param(1, PubComp, id="pubcomp-for-qos1"),
    pytest.param(2, PubAck, id="puback-for-qos2"),
    pytest.param(2, PubComp, id="pubcomp-before-pubrec"),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("qos", "wrong"), WRONG_ACKS)
async def test_the_wrong_ack_is_a_protocol_error_and_the_message_comes_again(
    level: int, qos: int, wrong: type
):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            expiry = {"session_expiry_interval": 300} if level == PROTOCOL_5 else {}
            sub, _ = await connect(broker.port, "sub", level=level, clean_start=False, **expiry)
            await subscribe(sub, Subscription("cmd/#", qos))
            other, _ = await connect(broker.port, "other", level=level)
            await subscribe(other, Subscription("cmd/#", qos))
            pub, _ = await connect(broker.port, "pub", level=level)
            await pub.send(Publish("cmd/1", b"reboot", qos, packet_id=1))
            message = await sub.take(Publish)
            assert (message.payload, message.qos, message.dup) == (b"reboot", qos, False)
            await sub.send(wrong(message.packet_id))
            packets = await closed_after(sub)
            if level == PROTOCOL_5:
                assert packets and isinstance(packets[-1], Disconnect), packets
                assert packets[-1].reason_code == 0x82
            else:
                assert packets == []
            # the broker goes on serving the others, the one that acked right included
            got = await other.take(Publish)
            assert got.payload == b"reboot"
            # the session kept the message: it comes again, with DUP, on the next connection
            again, connack = await connect(broker.port, "sub", level=level, clean_start=False,
                                           **expiry)
            assert connack.session_present == (level != PROTOCOL_31)  # 3.1 has no such flag
            resent = await again.take(Publish)
            assert (resent.payload, resent.qos, resent.dup, resent.packet_id) == (
                b"reboot", qos, True, message.packet_id
            )
            if qos == 1:
                await exact_reply(again, PubAck(resent.packet_id).encode(level), b"")
            else:
                await exact_reply(
                    again, PubRec(resent.packet_id).encode(level),
                    b"\x62\x02" + pid_bytes(resent.packet_id),
                )
                await exact_reply(again, PubComp(resent.packet_id).encode(level), b"")
            assert not broker.sessions["sub"].inflight


# -- MQTT 3.1: DUP on PUBREL, SUBSCRIBE, UNSUBSCRIBE ----------------------------------------

SUBSCRIBE_DUP = bytes.fromhex("8a 08 0001 0003 612f62 01")  # "a/b" QoS 1, DUP
UNSUBSCRIBE_DUP = bytes.fromhex("aa 07 0002 0003 612f62")


@pytest.mark.parametrize("level", LEVELS)
async def test_mqtt31_resends_with_dup(level: int):
    """0x6A / 0x8A / 0xAA are MQTT 3.1's resent PUBREL / SUBSCRIBE / UNSUBSCRIBE: answered at
    level 3. 3.1.1 and 5.0 reserve those flags: Malformed Packet, the connection closed."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "c", level=level)
            if level != PROTOCOL_31:
                await client.stream.send_all(b"\x6a\x02" + pid_bytes(1))
                packets = await closed_after(client)
                if level == PROTOCOL_5:
                    assert [(type(p), p.reason_code) for p in packets] == [(Disconnect, 0x81)]
                else:
                    assert packets == []
                return
            await exact_reply(client, Publish("a/b", b"x", 2, packet_id=1).encode(level),
                              b"\x50\x02" + pid_bytes(1))
            await exact_reply(client, b"\x62\x02" + pid_bytes(1), b"\x70\x02" + pid_bytes(1))
            await exact_reply(client, b"\x6a\x02" + pid_bytes(1), b"\x70\x02" + pid_bytes(1))
            await exact_reply(client, SUBSCRIBE_DUP, b"\x90\x03" + pid_bytes(1) + b"\x01")
            await exact_reply(client, UNSUBSCRIBE_DUP, b"\xb0\x02" + pid_bytes(2))
            assert not broker.sessions["c"].subscriptions


@pytest.mark.parametrize("level", [PROTOCOL_311, PROTOCOL_5])
@pytest.mark.parametrize("packet", [SUBSCRIBE_DUP, UNSUBSCRIBE_DUP])
async def test_dup_on_subscribe_is_malformed_after_mqtt31(level: int, packet: bytes):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "c", level=level)
            await client.stream.send_all(packet)
            packets = await closed_after(client)
            if level == PROTOCOL_5:
                assert [(type(p), p.reason_code) for p in packets] == [(Disconnect, 0x81)]
            else:
                assert packets == []


# -- acks for packet identifiers the broker does not know ----------------------------------


@pytest.mark.parametrize("level", LEVELS)
async def test_acks_for_unknown_packet_ids(level: int):
    """PUBREL for no QoS 2 exchange: PUBCOMP (5.0: 0x92). PUBREC for no delivery: PUBREL (5.0:
    0x92). PUBACK and PUBCOMP for no delivery: nothing, and the connection stays up."""
    code = b"\x92" if level == PROTOCOL_5 else b""
    length = bytes((2 + len(code),))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "c", level=level)
            await exact_reply(client, PubRel(9).encode(level), b"\x70" + length + pid_bytes(9)
                              + code)
            await exact_reply(client, PubRec(9).encode(level), b"\x62" + length + pid_bytes(9)
                              + code)
            await exact_reply(client, PubAck(9).encode(level), b"")
            await exact_reply(client, PubComp(9).encode(level), b"")


# -- replies keep their order, PINGRESP included -------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qos", [1, 2])
async def test_pingresp_comes_after_the_acks_that_wait_for_a_commit(level: int, qos: int):
    """A PUBLISH for a persistent session is acknowledged after the store commits it; a
    PINGREQ sent behind it is answered behind that ack (a PINGRESP tells the client that
    everything before was answered: the tests' barrier, and what a client may rely on)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            expiry = {"session_expiry_interval": 300} if level == PROTOCOL_5 else {}
            sub, _ = await connect(broker.port, "sub", level=level, clean_start=False, **expiry)
            await subscribe(sub, Subscription("t", 1))
            pub, _ = await connect(broker.port, "pub", level=level)
            ack = (b"\x40" if qos == 1 else b"\x50") + b"\x02" + pid_bytes(1)
            await exact_reply(pub, Publish("t", b"x", qos, packet_id=1).encode(level), ack)
