"""The parts of cluster-wide persistent sessions that need no NATS: the session record's
encoding, the acknowledged floor over out-of-order acks, packet ids from stream sequences
(mqttd.clustering.sessions, mqttd.clustering.streamsession)."""

from __future__ import annotations

import pytest

from mqttd.clustering.sessions import Record
from mqttd.clustering.streamsession import StreamSession, packet_id_of
from mqttd.codec.packets import Publish
from mqttd.connection import Connection


def test_a_record_survives_its_encoding() -> None:
    record = Record("dev/1 ä", "n2", 1700000000123, 7, 3600, 1700000001.5,
                    {"cmd/#": [1, 4, 0], "a/+/b": [2, 8, 42]}, "alice", [7, 9], [1024])
    assert Record.decode(record.encode()) == record
    empty = Record("x", "n0", 1, 1)
    assert Record.decode(empty.encode()) == empty


@pytest.mark.parametrize("data", [b"", b"{}", b"[]", b'{"client_id": "x"}', b"\xff",
                                  b'{"client_id":"x","owner":"n","boot":1,"epoch":1,'
                                  b'"subs":{"a":[1]}}'])
def test_a_bad_record_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        Record.decode(data)


def test_packet_ids_come_from_the_stream_sequence() -> None:
    assert packet_id_of(1) == 2
    assert packet_id_of(65534) == 65535
    assert packet_id_of(65535) == 1  # never 0
    assert all(1 <= packet_id_of(seq) <= 65535 for seq in range(0, 200_000, 997))


def connected(session: StreamSession) -> Connection:
    conn = Connection(peer="test", client_id=session.client_id)
    session.connection = conn  # as attach does, without starting a feeder
    return conn


def test_the_floor_moves_over_the_contiguous_acknowledged_prefix() -> None:
    session = StreamSession("s", True)
    conn = connected(session)
    for seq in (5, 9, 12):
        assert session.has_room(seq)
        assert session.feed(Publish("t", b"%d" % seq, 1, False), 1, False, None, seq)
    assert session.fed_upto == 12 and session.floor == 0
    assert session.on_puback(packet_id_of(9)) is not None  # out of order: no floor yet
    assert session.floor == 0
    assert session.on_puback(packet_id_of(5)) is not None  # 5 and 9 are done
    assert session.floor == 9
    session.skipped(14)  # expired in the stream: done with, behind 12
    assert session.floor == 9
    assert session.on_puback(packet_id_of(12)) is not None
    assert session.floor == 14
    sent = b"".join(conn.outbox)  # three PUBLISHes, with the stream's packet ids
    for seq in (5, 9, 12):
        assert b"\x00\x01t" + packet_id_of(seq).to_bytes(2, "big") + b"%d" % seq in sent


def test_a_packet_id_in_flight_holds_the_message_that_would_reuse_it() -> None:
    session = StreamSession("s", True, max_inflight=10)
    connected(session)
    assert session.feed(Publish("t", b"a", 1, False), 1, False, None, 3)
    colliding = 3 + 65535  # the same packet id
    assert not session.has_room(colliding)
    session.on_puback(packet_id_of(3))
    assert session.has_room(colliding)


def test_the_window_bounds_what_is_fed() -> None:
    session = StreamSession("s", True, max_inflight=2)
    connected(session)
    session.feed(Publish("t", b"a", 1, False), 1, False, None, 1)
    session.feed(Publish("t", b"b", 1, False), 1, False, None, 2)
    assert not session.has_room(3)
    session.on_puback(packet_id_of(1))
    assert session.has_room(3)
    session.connection = None
    assert not session.has_room(3)  # offline: nothing is fed
