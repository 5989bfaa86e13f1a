"""The retained stream's rules without NATS (mqttd.clustering.retained): which write the
local store keeps when the stream and this node's own writes interleave, which failed
write is not sent again, when held replies are released, what only the local store had."""

from __future__ import annotations

from typing import Any

import attrs

from mqttd.cluster.jetstream import StoredMsg
from mqttd.cluster.nats_protocol import decode_headers
from mqttd.clustering import wire
from mqttd.clustering.gate import CommitGate
from mqttd.clustering.retained import RetainedSync
from mqttd.codec.packets import Publish
from mqttd.config import Cluster
from mqttd.engine.dispatch import Engine


@attrs.define(eq=False)
class FakeWriter:
    ticket: int = 0
    on_commit: Any = None
    ops: list[Any] = attrs.Factory(list)

    def submit(self, op: Any) -> None:
        self.ticket += 1
        self.ops.append(op)


@attrs.define(eq=False)
class FakeNode:
    engine: Engine
    config: Cluster = attrs.Factory(Cluster)
    client: Any = None
    js: Any = None
    gate: Any = None
    node: str = "me"
    boot: int = 100
    origin: str = "me 100 "
    seq: int = 0
    streams_ready: bool = False  # exports stay unsent: nothing to talk to
    exported: int = 0
    imported: int = 0
    malformed: int = 0
    warnings: list[str] = attrs.Factory(list)

    def warn(self, kind: str, message: str, *args: Any) -> None:
        self.warnings.append(message % args)


def setup(retained: dict[str, bytes] | None = None) -> tuple[RetainedSync, Engine, list[int]]:
    engine = Engine()
    for topic, payload in (retained or {}).items():
        engine.retained.set(topic, Publish(topic, payload, 1, True))
    writer = FakeWriter()
    released: list[int] = []
    writer.on_commit = released.append
    engine.writer = writer  # type: ignore[assignment]
    node = FakeNode(engine, gate=CommitGate(engine))
    node.gate.install()
    sync = RetainedSync(node)  # type: ignore[arg-type]
    sync.install()
    return sync, engine, released


def stored(seq: int, topic: str, payload: bytes, node: str = "other", boot: int = 7,
           number: int = 1) -> StoredMsg:
    block = wire.header_block(f"{node} {boot} ", number, Publish(topic, payload, 1, True),
                              delete=not payload)
    return StoredMsg(f"mqttd.r.{topic.replace('/', '.')}", seq, payload,
                     decode_headers(block)[0])


def local(engine: Engine, topic: str) -> bytes | None:
    message = engine.retained.get(topic)
    return message.payload if isinstance(message, Publish) else None


def export(sync: RetainedSync, engine: Engine, topic: str, payload: bytes) -> int:
    """What BrokerState.publish does for a retained message in cluster mode."""
    message = Publish(topic, payload, 1, True)
    engine.writer.submit("SetRetained")  # type: ignore[union-attr]
    engine.retained.set(topic, message)
    sync.node.seq += 1
    sync.export(message, sync.node.seq)
    return sync.node.seq


def test_foreign_writes_apply_in_stream_order() -> None:
    sync, engine, _ = setup()
    sync._apply(stored(1, "a/b", b"x"))
    sync._apply(stored(2, "a/b", b"y"))
    assert local(engine, "a/b") == b"y"
    sync._apply(stored(3, "a/b", b""))  # a tombstone
    assert local(engine, "a/b") is None
    assert sync.imported == 3


def test_own_write_wins_over_what_the_stream_had_before_it() -> None:
    """This node wrote t; the stream delivers another node's older write to t first, then
    this node's: the local store keeps its own all along and follows the stream after."""
    sync, engine, _ = setup()
    seq = export(sync, engine, "t", b"mine")
    sync._apply(stored(5, "t", b"theirs"))
    assert local(engine, "t") == b"mine"
    sync._apply(stored(6, "t", b"mine", node="me", boot=100, number=seq))
    assert local(engine, "t") == b"mine" and "t" not in sync.own_pending
    sync._apply(stored(7, "t", b"later"))  # after ours in the stream: it wins
    assert local(engine, "t") == b"later"


def test_an_older_own_write_does_not_clear_a_newer_one() -> None:
    sync, engine, _ = setup()
    first = export(sync, engine, "t", b"1")
    export(sync, engine, "t", b"2")
    sync._apply(stored(5, "t", b"1", node="me", boot=100, number=first))
    assert "t" in sync.own_pending
    sync._apply(stored(6, "t", b"foreign"))
    assert local(engine, "t") == b"2"


def test_a_previous_boot_of_this_node_is_another_writer() -> None:
    sync, engine, _ = setup()
    sync._apply(stored(1, "t", b"old", node="me", boot=99))
    assert local(engine, "t") == b"old"


def test_a_failed_write_is_not_sent_again_when_a_later_one_to_its_topic_waits() -> None:
    sync, engine, _ = setup()
    export(sync, engine, "t", b"1")
    export(sync, engine, "u", b"1")
    assert not sync._superseded(sync.writes[0])
    export(sync, engine, "t", b"2")
    assert sync._superseded(sync.writes[0])
    assert not sync._superseded(sync.writes[2])


def test_replies_wait_for_the_oldest_write_not_stored() -> None:
    """The commit passed on to the engine is the store's, but below the ticket of the
    oldest retained write JetStream has not acknowledged."""
    sync, engine, released = setup()
    engine.writer.submit("before")  # type: ignore[union-attr]
    export(sync, engine, "t", b"1")  # ticket 2
    export(sync, engine, "u", b"1")  # ticket 3
    sync.node.gate._on_store_commit(3)
    assert released == [1]
    sync.writes.popleft()
    sync._release()
    assert released == [1, 2]
    sync.writes.popleft()
    sync._release()
    assert released == [1, 2, 3]


def test_what_only_the_local_store_had_is_published_after_the_replay() -> None:
    sync, engine, _ = setup({"kept/1": b"a", "kept/2": b"b", "$SYS/x": b"s"})
    sync._apply(stored(1, "kept/1", b"a2"))
    sync._loaded()
    assert sync.loaded
    assert [w.topic for w in sync.writes] == ["kept/2"]
    assert local(engine, "kept/1") == b"a2"


def test_malformed_stream_messages_are_counted() -> None:
    sync, engine, _ = setup()
    sync._apply(StoredMsg("mqttd.r.t", 1, b"x", {}))
    assert sync.node.malformed == 1 and local(engine, "t") is None
