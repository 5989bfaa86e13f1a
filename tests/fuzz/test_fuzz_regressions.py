"""Findings of the fuzzers, each reduced to a test, and a smoke run of the fuzz harness."""

from __future__ import annotations

from typing import Any

import trio

from mqttd.broker import Broker, running
from mqttd.codec import Decoder
from mqttd.codec.packets import Connect, PingReq, PubAck, Publish, Subscribe, Subscription
from mqttd.config import ClientOverride, Config, Limits, Listener, Persistence
from mqttd.connection import Connection
from persistence.writer import GroupCommitWriter
from tests.conftest import make_config
from tools import fuzz5
from tools.fuzz import main as fuzz_main

CLIENTS = 40
WAIT_S = 5.0


async def test_buffer_account_stays_exact_when_clients_close_while_their_replies_go_out() -> None:
    """Found by ``python -m tools.fuzz --socket``: ``broker.buffers.bytes`` went negative.

    Each client sends CONNECT and PINGREQ and closes at once. The writer task takes the
    CONNACK + PINGRESP off the outbox (``data_to_send``) and ``send_all`` yields after writing
    them; meanwhile the reader sees EOF and ``connection_lost`` -> ``discard_output`` takes the
    connection's 6 unsent bytes off ``buffers.bytes``; then the writer resumes and calls
    ``conn.sent(6)``: the same 6 bytes are taken off a second time (``outbox_bytes`` -6 on the
    dead connection). It happens in about half of such connections, so with 40 of them the
    account ends far below zero with no connection left, and ``max_buffered_bytes`` admits that
    much more than configured from then on.
    """
    async with running(make_config()) as broker:
        with trio.fail_after(4 * WAIT_S):
            for i in range(CLIENTS):
                stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
                await stream.send_all(Connect(f"fuzz-{i}").encode() + PingReq().encode())
                await stream.aclose()
        with trio.move_on_after(WAIT_S):  # polling broker state, bounded
            while broker.connections:
                await trio.sleep(0.01)
        assert not broker.connections
        assert broker.buffers.bytes == 0  # the sum of the outbox_bytes of no connection


async def test_drop_oldest_while_a_queue_page_is_read_back_drops_the_right_message() -> None:
    """Found by ``python -m tools.fuzz`` (durable episodes with small pages) and by the socket
    mode: a persistent session's ``queued_bytes`` no longer matched what its queue held.

    A persistent subscriber is offline with ``ccc`` and ``bb`` queued on disk (``a`` was dropped:
    max_queued_messages 2). It comes back: a page of one message (``bb``) is being read back when
    ``dddd`` and ``eeeee`` arrive. drop_oldest must drop ``bb`` (the page being read) and then
    ``ccc`` (the first message on disk only). It drops ``bb`` from the page correctly, but for
    ``ccc`` it submits ``DropOldestQueued(client_id, disk_after)`` with ``disk_after`` still
    below the page being read, so the store deletes ``bb`` (again) instead of ``ccc``. Memory
    and store disagree from then on: the client receives ``ccc``, which was counted as dropped,
    never receives ``eeeee``, which the policy kept, ``queued_bytes`` stays above zero with
    nothing queued, and the store keeps a delivery that memory has forgotten.
    """
    config = Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        limits=Limits(persistent_max_queued_messages=2, persistent_overflow_policy="drop_oldest",
                      max_inflight_messages=1),
        persistence=Persistence(db_file=":memory:", queue_page_messages=1),
    )
    broker = Broker(config)
    broker.open_store()
    writer = broker.writer
    assert writer is not None

    def connect(client_id: str, clean: bool) -> Connection:
        conn = broker.new_connection(client_id)
        broker.handle_data(conn, Connect(client_id, clean_session=clean).encode())
        return conn

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(WAIT_S):
            sub = connect("sub", clean=False)
            broker.handle_data(sub, Subscribe(1, (Subscription("t", 1),)).encode())
            await writer.flush()
            broker.connection_lost(sub)
            pub = connect("pub", clean=True)
            for packet_id, payload in enumerate((b"a", b"bb", b"ccc"), 1):
                broker.handle_data(pub, Publish("t", payload, 1, packet_id=packet_id).encode())
            await writer.flush()
            session = broker.sessions["sub"]
            assert (session.queued, session.out.bytes) == (2, 5)  # bb, ccc

            sub = connect("sub", clean=False)  # reads a page (bb) back from the store
            for packet_id, payload in enumerate((b"dddd", b"eeeee"), 4):
                broker.handle_data(pub, Publish("t", payload, 1, packet_id=packet_id).encode())
            assert (session.queued, session.out.bytes) == (2, 9)  # dddd, eeeee

            decoder = Decoder(protocol_level=4)
            received = []
            for _ in range(6):  # commit, deliver, acknowledge, until nothing is left
                await writer.flush()
                for packet in decoder.feed(sub.data_to_send()):
                    if isinstance(packet, Publish):
                        received.append(packet.payload)
                        broker.handle_data(sub, PubAck(packet.packet_id).encode())
            await writer.flush()
        nursery.cancel_scope.cancel()

    assert received == [b"dddd", b"eeeee"]
    assert session.out.dropped == 3  # a, bb, ccc
    assert (session.queued, session.out.bytes) == (0, 0)
    assert writer.store.table_counts()["deliveries"] == 0


def _broker_with_store(**config: Any) -> tuple[Broker, GroupCommitWriter]:
    """A broker driven without sockets, with its SQLite store in memory (the caller runs
    ``writer.run`` in its nursery)."""
    broker = Broker(
        Config(
            listeners=(Listener(host="127.0.0.1", port=0),),
            persistence=Persistence(db_file=":memory:"),
            **config,
        )
    )
    broker.open_store()
    assert broker.writer is not None
    return broker, broker.writer


def _connect(broker: Broker, client_id: str, clean: bool) -> Connection:
    conn = broker.new_connection(client_id)
    broker.handle_data(conn, Connect(client_id, clean_session=clean).encode())
    return conn


async def test_acknowledged_message_for_a_recreated_persistent_session_is_stored() -> None:
    """Found by ``python -m tools.fuzz --socket`` (mqttd logged "session c1: 1 queued rows
    missing"): a QoS 1 message acknowledged to its publisher is lost for a persistent session.

    Within one commit batch: persistent session S1 of ``c1`` gets ``first`` (seq 1) and
    acknowledges it (``RemoveDelivery(c1, 1)``); ``c1`` comes back with clean session 1 (S1 is
    discarded) and then with clean session 0: a new persistent session S3 whose seq numbering
    starts at 1 again; offline, it gets ``second`` (``AddDelivery(c1, 1)``). The store's
    ``_without_settled`` keys deliveries by (client id, seq), so it takes S1's RemoveDelivery
    as settling S3's AddDelivery: it leaves out S3's delivery and the body of ``second``. The
    publisher has its PUBACK (after the commit), the store has nothing, and when ``c1`` comes
    back the page read finds no row: ``second`` is never delivered (nor after a restart).
    """
    broker, writer = _broker_with_store()

    def connect(client_id: str, clean: bool) -> Connection:
        return _connect(broker, client_id, clean)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(WAIT_S):
            pub = connect("pub", clean=True)
            s1 = connect("c1", clean=False)
            broker.handle_data(s1, Subscribe(1, (Subscription("t", 1),)).encode())
            await writer.flush()
            s1_decoder = Decoder(protocol_level=4)
            s1_decoder.feed(s1.data_to_send())
            # from here to the next flush, everything goes into one commit batch
            broker.handle_data(pub, Publish("t", b"first", 1, packet_id=1).encode())
            [first] = [p for p in s1_decoder.feed(s1.data_to_send()) if isinstance(p, Publish)]
            broker.handle_data(s1, PubAck(first.packet_id).encode())
            connect("c1", clean=True)  # takes S1 over and discards it
            s3 = connect("c1", clean=False)  # a new persistent session
            broker.handle_data(s3, Subscribe(1, (Subscription("t", 1),)).encode())
            broker.connection_lost(s3)
            broker.handle_data(pub, Publish("t", b"second", 1, packet_id=2).encode())
            await writer.flush()
            pub_decoder = Decoder(protocol_level=4)
            assert PubAck(2) in pub_decoder.feed(pub.data_to_send())  # acknowledged: stored
            assert writer.store.table_counts()["deliveries"] == 1

            back = connect("c1", clean=False)
            for _ in range(3):  # the queue is read back from the store
                await writer.flush()
            got = [p.payload for p in Decoder(protocol_level=4).feed(back.data_to_send())
                   if isinstance(p, Publish)]
        nursery.cancel_scope.cancel()
    assert got == [b"second"]


async def test_message_dropped_by_one_offline_session_stays_stored_for_the_others() -> None:
    """Found by ``python -m tools.fuzz`` (durable episodes): a session's stored inflight and
    queued deliveries were fewer than in memory after a restart.

    Two persistent subscribers of ``t`` are offline: ``tiny`` (a constrained device whose
    ``max_queued_bytes`` is 8) and ``big``. A 40-byte QoS 1 message comes. Routing gives it to
    ``tiny`` first: ``AddMessage``, ``AddDelivery(tiny)``, and at once ``DropOldestQueued(tiny)``
    (it does not fit its byte budget); then ``AddDelivery(big)``. Applied in that order, the
    delete trigger sees the message's last reference go and deletes its body before
    ``big``'s delivery is inserted (``_without_settled`` only pairs AddDelivery with
    RemoveDelivery, not with DropOldestQueued). The publisher has its PUBACK, but ``big``'s
    delivery refers to a message that is gone: its page read finds nothing ("1 queued rows
    missing") and the message is never delivered.
    """
    broker, writer = _broker_with_store(
        client_overrides=(ClientOverride(client_id="tiny", max_queued_bytes=8),)
    )

    def connect(client_id: str, clean: bool) -> Connection:
        return _connect(broker, client_id, clean)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(WAIT_S):
            for client_id in ("tiny", "big"):
                conn = connect(client_id, clean=False)
                broker.handle_data(conn, Subscribe(1, (Subscription("t", 1),)).encode())
                broker.connection_lost(conn)
            await writer.flush()
            pub = connect("pub", clean=True)
            broker.handle_data(pub, Publish("t", b"x" * 40, 1, packet_id=1).encode())
            await writer.flush()
            assert PubAck(1) in Decoder(protocol_level=4).feed(pub.data_to_send())
            assert broker.sessions["big"].queued == 1
            assert writer.store.table_counts()["messages"] == 1  # big's copy is stored

            back = connect("big", clean=False)
            for _ in range(3):  # the queue is read back from the store
                await writer.flush()
            got = [p.payload for p in Decoder(protocol_level=4).feed(back.data_to_send())
                   if isinstance(p, Publish)]
        nursery.cancel_scope.cancel()
    assert got == [b"x" * 40]


def test_fuzz_harness_smoke() -> None:
    """``python -m tools.fuzz`` (decoder + sans-IO broker, 3.1.1 and 5.0) runs and finds
    nothing, with every check on."""
    assert not fuzz5.TOLERATED
    # --hang-s: the harness's own limits (per input, per step, and its watchdog at twice
    # that) far above anything a loaded machine takes: a failure here is a finding, never
    # slowness; an endless loop still ends in the watchdog's Hang
    assert fuzz_main(["--inputs", "3000", "--seed", "7", "--steps", "100",
                      "--hang-s", "600"]) == 0
