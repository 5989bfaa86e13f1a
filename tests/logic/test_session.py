"""Session state without I/O: packet ids, the inflight window, QoS 2 outbound, the bounded
queue, and what ``attach`` resends (MQTT 3.1.1 sections 2.3.1, 4.3, 4.4, 4.6)."""

from __future__ import annotations

import pytest

from mqttd.codec import Decoder, ProtocolError
from mqttd.codec.packets import Publish, PubRel
from mqttd.connection import Connection
from mqttd.delivery import new_fanout
from mqttd.outqueue import QueueLimits
from mqttd.session import Session


def msg(n: int | str, qos: int = 1, topic: str = "t") -> Publish:
    return Publish(topic, str(n).encode(), qos)


def sent(conn: Connection) -> list[object]:
    """Everything the session wrote to ``conn`` since the last call, decoded."""
    return Decoder(protocol_level=4).feed(conn.data_to_send())


def online(**kwargs: object) -> tuple[Session, Connection]:
    session = Session("c", persistent=True, **kwargs)  # type: ignore[arg-type]
    conn = Connection(peer="test")
    session.attach(conn)
    assert conn.data_to_send() == b""
    return session, conn


def payloads(packets: list[object]) -> list[bytes]:
    return [p.payload for p in packets]  # type: ignore[attr-defined]


# -- packet ids ----------------------------------------------------------------------------


def test_packet_ids_start_at_1_and_increase() -> None:
    session, conn = online(max_inflight=10)
    for n in range(5):
        session.deliver(msg(n), 1, False, None)
    packets = sent(conn)
    assert [p.packet_id for p in packets] == [1, 2, 3, 4, 5]
    assert list(session.inflight) == [1, 2, 3, 4, 5]


def test_packet_id_wraps_from_65535_to_1_never_0() -> None:
    session, conn = online(max_inflight=10)
    session.next_packet_id = 65534
    for n in range(4):
        session.deliver(msg(n), 1, False, None)
    assert [p.packet_id for p in sent(conn)] == [65534, 65535, 1, 2]
    assert 0 not in session.inflight


def test_packet_id_allocation_skips_ids_still_in_flight() -> None:
    session, conn = online(max_inflight=10)
    session.deliver(msg("a"), 1, False, None)  # id 1, stays in flight
    session.deliver(msg("b"), 1, False, None)  # id 2
    assert session.on_puback(2)
    session.next_packet_id = 65535
    session.deliver(msg("c"), 1, False, None)  # 65535
    session.deliver(msg("d"), 1, False, None)  # 1 is in flight -> 2
    session.deliver(msg("e"), 1, False, None)  # 3
    packets = sent(conn)
    assert [(p.payload, p.packet_id) for p in packets] == [
        (b"a", 1), (b"b", 2), (b"c", 65535), (b"d", 2), (b"e", 3),
    ]
    assert sorted(session.inflight) == [1, 2, 3, 65535]


def test_packet_ids_of_inflight_messages_are_unique_over_many_cycles() -> None:
    session, conn = online(max_inflight=5)
    # keep the first one in flight for good; cycle past the end of the id space with the others
    session.deliver(msg("stuck"), 1, False, None)
    stuck_id = sent(conn)[0].packet_id
    seen = set()
    for n in range(65535 + 10):
        session.deliver(msg(n), 1, False, None)
        (p,) = sent(conn)
        assert p.packet_id != stuck_id
        assert 1 <= p.packet_id <= 65535
        seen.add(p.packet_id)
        assert session.on_puback(p.packet_id)
    assert seen == set(range(1, 65536)) - {stuck_id}  # wrapped, every other id used
    assert list(session.inflight) == [stuck_id]


# -- inflight window and queue -------------------------------------------------------------


def test_window_holds_exactly_n_then_queues() -> None:
    session, conn = online(max_inflight=3)
    for n in range(7):
        session.deliver(msg(n), 1, False, None)
    assert payloads(sent(conn)) == [b"0", b"1", b"2"]
    assert len(session.inflight) == 3
    assert [d[0].payload for d in session.out.ram or ()] == [b"3", b"4", b"5", b"6"]


def test_puback_releases_exactly_one_queued_message_in_order() -> None:
    session, conn = online(max_inflight=3)
    for n in range(7):
        session.deliver(msg(n), 1, False, None)
    first = sent(conn)
    assert session.on_puback(first[0].packet_id)
    assert payloads(sent(conn)) == [b"3"]
    assert len(session.inflight) == 3
    assert session.on_puback(first[2].packet_id)
    assert payloads(sent(conn)) == [b"4"]
    assert [d[0].payload for d in session.out.ram or ()] == [b"5", b"6"]


def test_new_delivery_queues_behind_queue_even_if_window_opens() -> None:
    session, conn = online(max_inflight=1)
    session.deliver(msg(0), 1, False, None)
    session.deliver(msg(1), 1, False, None)
    session.deliver(msg(2), 1, False, None)
    (p0,) = sent(conn)
    session.on_puback(p0.packet_id)
    (p1,) = sent(conn)
    assert p1.payload == b"1"
    session.on_puback(p1.packet_id)
    session.deliver(msg(3), 1, False, None)
    assert payloads(sent(conn)) == [b"2"]
    assert [d[0].payload for d in session.out.ram or ()] == [b"3"]


def test_qos0_is_not_counted_against_the_window() -> None:
    session, conn = online(max_inflight=1)
    session.deliver(msg("q1"), 1, False, None)
    session.deliver(msg("q0", qos=0), 0, False, None)
    packets = sent(conn)
    assert [(p.payload, p.qos) for p in packets] == [(b"q1", 1), (b"q0", 0)]
    assert len(session.inflight) == 1


def test_queue_bound_drops_oldest_and_counts() -> None:
    session = Session(
        "c", persistent=True, max_inflight=2, queue_limits=QueueLimits(max_messages=3)
    )
    for n in range(5):
        session.deliver(msg(n), 1, False, None)
    assert [d[0].payload for d in session.out.ram or ()] == [b"2", b"3", b"4"]
    assert session.out.dropped == 2
    session.deliver(msg(5), 2, False, None)
    assert [d[0].payload for d in session.out.ram or ()] == [b"3", b"4", b"5"]
    assert session.out.dropped == 3


def test_queue_bound_applies_while_online_with_full_window() -> None:
    session, conn = online(max_inflight=1, queue_limits=QueueLimits(max_messages=2))
    for n in range(5):
        session.deliver(msg(n), 1, False, None)
    assert payloads(sent(conn)) == [b"0"]
    assert [d[0].payload for d in session.out.ram or ()] == [b"3", b"4"]
    assert session.out.dropped == 2


def test_qos0_to_offline_session_is_not_queued() -> None:
    session = Session("c", persistent=True)
    session.deliver(msg("x", qos=0), 0, False, None)
    assert not session.out.ram
    assert not session.inflight
    assert session.sent == 0


def test_qos1_to_offline_session_is_queued_not_inflight() -> None:
    session = Session("c", persistent=True)
    session.deliver(msg("x"), 1, False, None)
    assert [d[0].payload for d in session.out.ram or ()] == [b"x"]
    assert not session.inflight


# -- acknowledgements ----------------------------------------------------------------------


def test_duplicate_and_unknown_puback_return_false_and_change_nothing() -> None:
    session, conn = online(max_inflight=1)
    session.deliver(msg(0), 1, False, None)
    session.deliver(msg(1), 1, False, None)
    (p,) = sent(conn)
    assert session.on_puback(p.packet_id)
    (p1,) = sent(conn)
    before_inflight = dict(session.inflight)
    assert session.on_puback(p.packet_id) is None  # duplicate
    assert session.on_puback(999) is None  # unknown
    assert session.inflight == before_inflight
    assert conn.data_to_send() == b""
    assert session.on_puback(p1.packet_id)


def test_puback_for_a_qos2_message_is_a_protocol_error() -> None:
    session, conn = online()
    session.deliver(msg("x", qos=2), 2, False, None)
    (p,) = sent(conn)
    with pytest.raises(ProtocolError, match="PUBACK for the QoS 2"):
        session.on_puback(p.packet_id)
    assert session.inflight[p.packet_id][0] is not None  # kept, to be sent again
    assert session.on_pubrec(p.packet_id)  # a PUBREC after PUBREL again
    with pytest.raises(ProtocolError, match="PUBACK for the QoS 2"):
        session.on_puback(p.packet_id)
    assert p.packet_id in session.inflight


def test_pubrec_or_pubcomp_for_a_qos1_message_is_a_protocol_error() -> None:
    session, conn = online()
    session.deliver(msg("x"), 1, False, None)
    (p,) = sent(conn)
    with pytest.raises(ProtocolError, match="PUBREC for the QoS 1"):
        session.on_pubrec(p.packet_id)
    with pytest.raises(ProtocolError, match="PUBREC for the QoS 1"):
        session.on_pubrec_refused(p.packet_id)
    with pytest.raises(ProtocolError, match="PUBCOMP for the QoS 1"):
        session.on_pubcomp(p.packet_id)
    assert session.inflight[p.packet_id][0] is not None  # kept, to be sent again


def test_acks_for_unknown_packet_ids_are_ignored() -> None:
    session, _conn = online()
    assert session.on_puback(7) is None
    assert session.on_pubrec(7) is None
    assert session.on_pubrec_refused(7) is None
    assert session.on_pubcomp(7) is False


def test_qos2_outbound_flow() -> None:
    session, conn = online(max_inflight=1)
    session.deliver(msg("a", qos=2), 2, False, None)
    session.deliver(msg("b", qos=2), 2, False, None)
    (p,) = sent(conn)
    assert p.qos == 2
    with pytest.raises(ProtocolError, match="PUBCOMP before PUBREC"):
        session.on_pubcomp(p.packet_id)
    assert session.inflight[p.packet_id][0] is not None  # not released
    assert session.on_pubrec(p.packet_id)
    assert session.inflight[p.packet_id][0] is None  # released: PUBREL sent
    assert session.on_pubrec(p.packet_id)  # a PUBREC again: the caller sends PUBREL again
    # still holds the window and the id: nothing else sent yet
    assert conn.data_to_send() == b""
    assert session.out.ram
    assert session.on_pubcomp(p.packet_id)
    assert p.packet_id not in session.inflight
    (p2,) = sent(conn)
    assert p2.payload == b"b"


def test_pubcomp_frees_the_packet_id_for_reuse() -> None:
    session, conn = online(max_inflight=5)
    session.deliver(msg("a", qos=2), 2, False, None)
    (p,) = sent(conn)
    session.on_pubrec(p.packet_id)
    session.on_pubcomp(p.packet_id)
    session.next_packet_id = p.packet_id
    session.deliver(msg("b", qos=2), 2, False, None)
    (p2,) = sent(conn)
    assert p2.packet_id == p.packet_id


def test_duplicate_pubcomp_and_unknown_pubrec_return_false() -> None:
    session, conn = online()
    session.deliver(msg("a", qos=2), 2, False, None)
    (p,) = sent(conn)
    assert session.on_pubrec(4321) is None
    assert session.on_pubcomp(4321) is False
    session.on_pubrec(p.packet_id)
    assert session.on_pubcomp(p.packet_id)
    assert session.on_pubcomp(p.packet_id) is False
    assert session.on_pubrec(p.packet_id) is None  # the id is no longer known at all
    assert not session.inflight
    assert conn.data_to_send() == b""


def test_duplicate_pubrec_changes_nothing() -> None:
    session, conn = online()
    session.deliver(msg("a", qos=2), 2, False, None)
    (p,) = sent(conn)
    assert session.on_pubrec(p.packet_id)
    # a repeated PUBREC is answered with PUBREL again by the broker; the state stays released
    session.on_pubrec(p.packet_id)
    assert list(session.inflight) == [p.packet_id]
    assert session.inflight[p.packet_id][0] is None  # released
    assert conn.data_to_send() == b""


def test_publish_is_never_resent_after_pubrec() -> None:
    session, conn = online()
    session.deliver(msg("a", qos=2), 2, False, None)
    (p,) = sent(conn)
    session.on_pubrec(p.packet_id)
    session.detach()
    conn2 = Connection(peer="again")
    session.attach(conn2)
    assert sent(conn2) == [PubRel(p.packet_id)]


# -- attach: resend on reconnect -----------------------------------------------------------


def test_attach_resends_inflight_with_dup_same_ids_in_order_then_fills_window() -> None:
    session, conn = online(max_inflight=4)
    session.next_packet_id = 65534  # ids 65534, 65535, 1, 2: send order != numeric order
    session.deliver(msg("a"), 1, False, None)
    session.deliver(msg("b", qos=2), 2, False, None)
    session.deliver(msg("c"), 1, False, None)
    session.deliver(msg("d", qos=2), 2, True, None)
    for n in range(3):
        session.deliver(msg(f"q{n}"), 1, False, None)
    first = sent(conn)
    ids = {p.payload: p.packet_id for p in first}
    assert [p.packet_id for p in first] == [65534, 65535, 1, 2]
    assert all(not p.dup for p in first)
    session.on_pubrec(ids[b"b"])  # b is released: a PUBREL is resent, not the PUBLISH
    assert session.on_puback(ids[b"a"])  # frees a slot: q0 goes out
    q0 = sent(conn)
    assert payloads(q0) == [b"q0"]
    session.detach()
    # offline: nothing sent, more is queued
    session.deliver(msg("q3"), 1, False, None)
    assert conn.data_to_send() == b""

    conn2 = Connection(peer="again")
    session.attach(conn2)
    out = sent(conn2)
    assert out[0] == PubRel(ids[b"b"])
    resent = out[1:4]
    assert [(p.payload, p.packet_id, p.dup, p.qos) for p in resent] == [
        (b"c", ids[b"c"], True, 1),
        (b"d", ids[b"d"], True, 2),
        (b"q0", q0[0].packet_id, True, 1),
    ]
    assert resent[1].retain  # the RETAIN flag sent first is kept
    # the window (4) is full again with b (released), c, d, q0: nothing from the queue yet
    assert len(out) == 4
    assert [d[0].payload for d in session.out.ram or ()] == [b"q1", b"q2", b"q3"]
    session.on_pubcomp(ids[b"b"])
    session.on_puback(ids[b"c"])
    fresh = sent(conn2)
    assert [(p.payload, p.dup) for p in fresh] == [(b"q1", False), (b"q2", False)]
    assert not {p.packet_id for p in fresh} & {ids[b"d"], q0[0].packet_id}


def test_attach_fills_window_from_queue() -> None:
    session = Session("c", persistent=True, max_inflight=2)
    for n in range(5):
        session.deliver(msg(n), 1, False, None)
    conn = Connection(peer="test")
    session.attach(conn)
    packets = sent(conn)
    assert [(p.payload, p.dup) for p in packets] == [(b"0", False), (b"1", False)]
    assert len(session.inflight) == 2
    assert len(session.out.ram or ()) == 3


def test_attach_with_nothing_pending_sends_nothing() -> None:
    session = Session("c", persistent=True)
    conn = Connection(peer="test")
    session.attach(conn)
    assert conn.data_to_send() == b""


def test_shared_parts_cache_is_filled_once_per_qos() -> None:
    session, conn = online()
    cache = new_fanout()
    m = msg("x", qos=2)
    session.deliver(m, 1, False, cache)
    assert cache[1] is not None and cache[0] is None and cache[2] is None
    head, tail = cache[1]
    assert conn.outbox[0] is head
    assert conn.outbox[2] is tail
