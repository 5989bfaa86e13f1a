"""Findings of the fuzzers, each reduced to a test, and a smoke run of the fuzz harness."""

from __future__ import annotations

import trio

from devices.fuzz import main as fuzz_main
from mqttd.broker import Broker, running
from mqttd.codec import Decoder
from mqttd.codec.packets import Connect, PingReq, PubAck, Publish, Subscribe, Subscription
from mqttd.config import Config, Limits, Listener, Persistence
from mqttd.protocol import Connection
from tests.conftest import make_config

CLIENTS = 40
WAIT_S = 5.0


async def test_buffer_account_stays_exact_when_clients_close_while_their_replies_go_out() -> None:
    """Found by ``python -m devices.fuzz --socket``: ``broker.buffers.bytes`` went negative.

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
        for i in range(CLIENTS):
            stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
            await stream.send_all(Connect(f"fuzz-{i}").encode() + PingReq().encode())
            await stream.aclose()
        with trio.move_on_after(WAIT_S):
            while broker.connections:
                await trio.sleep(0.01)
        assert not broker.connections
        assert broker.buffers.bytes == 0  # the sum of the outbox_bytes of no connection


async def test_drop_oldest_while_a_queue_page_is_read_back_drops_the_right_message() -> None:
    """Found by ``python -m devices.fuzz`` (durable episodes with small pages) and by the socket
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
        limits=Limits(max_queued_messages=2, max_inflight_messages=1),
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
            assert (session.queued, session.queued_bytes) == (2, 5)  # bb, ccc

            sub = connect("sub", clean=False)  # reads a page (bb) back from the store
            for packet_id, payload in enumerate((b"dddd", b"eeeee"), 4):
                broker.handle_data(pub, Publish("t", payload, 1, packet_id=packet_id).encode())
            assert (session.queued, session.queued_bytes) == (2, 9)  # dddd, eeeee

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
    assert session.dropped == 3  # a, bb, ccc
    assert (session.queued, session.queued_bytes) == (0, 0)
    assert writer.store.table_counts()["deliveries"] == 0


def test_fuzz_harness_smoke() -> None:
    """``python -m devices.fuzz`` (decoder + sans-IO broker) runs and finds nothing."""
    assert fuzz_main(["--inputs", "3000", "--seed", "7", "--steps", "100"]) == 0
