"""The engine's hot path in one process, without sockets: PUBLISH bytes from one client go
through ``Engine.handle_data`` to one subscriber's outbox (which the subscriber acknowledges
at QoS 1). Prints nanoseconds per message (best of the repeats).

Its use is comparing two trees, where wall-clock numbers on a shared VM are too noisy: count
instructions with callgrind, net of a run with no messages, with a fixed hash seed::

    cd /tmp  # not inside a tree: PYTHONPATH picks the tree whose mqttd is measured
    count() { PYTHONHASHSEED=0 PYTHONPATH=$1 valgrind --tool=callgrind \\
        --callgrind-out-file=/dev/null python /path/to/tools/engine_bench.py --qos $2 \\
        --messages $3 --repeats 1 2>&1 | awk '/Collected/ {gsub(",", "", $4); print $4}'; }
    echo $(( ($(count TREE 0 4000) - $(count TREE 0 0)) / 4000 )) instructions per message

(Run as a file, not with ``-m`` from a checkout, which would put that checkout first.)
``--store`` attaches a store writer, as a serving broker has, so the durable-reply
bookkeeping runs too (nothing is committed: the writer's task does not run here).
"""

from __future__ import annotations

import argparse
import time

from mqttd.broker import Broker
from mqttd.codec import Decoder
from mqttd.codec.packets import Connect, PubAck, Publish, Subscribe, Subscription
from mqttd.config import Config, Limits, Persistence

BATCH = 200  # PUBLISH packets per handle_data call, as in one 64 KiB read


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.engine_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store", action="store_true")
    parser.add_argument("--subscribers", type=int, default=1,
                        help="fan-out: this many subscribers on bench/# (default 1)")
    args = parser.parse_args()
    ns = run(args.qos, args.messages, args.repeats, args.store, args.subscribers)
    print(f"{ns:.0f} ns per message")


def run(qos: int, messages: int, repeats: int, store: bool, subscribers: int = 1) -> float:
    config = Config(
        persistence=Persistence(db_file=":memory:"),
        limits=Limits(max_queued_messages=10**8, max_queued_bytes=-1, qos0_buffer_bytes=1 << 30,
                      max_inflight_messages=65535, max_receive_messages=65535),
    )
    broker = Broker(config)
    if store:
        from persistence.store import SqliteStore
        from persistence.writer import GroupCommitWriter

        broker.writer = GroupCommitWriter(SqliteStore.open(":memory:", "process_crash"))
    subs = []
    for n in range(subscribers):
        sub = broker.new_connection(f"sub:{n}")
        sub.on_output = lambda: None
        broker.handle_data(sub, Connect(f"sub{n}").encode()
                           + Subscribe(1, (Subscription("bench/#", qos),)).encode())
        sub.data_to_send()
        subs.append(sub)
    pub = broker.new_connection("pub:1")
    pub.on_output = lambda: None
    broker.handle_data(pub, Connect("pub").encode())
    pub.data_to_send()
    decoder = Decoder(protocol_level=4)
    best = float("inf")
    for repeat in range(repeats):
        chunks = [
            b"".join(
                Publish(f"bench/{(repeat + i) % 10:04d}/t", b"x" * 64, qos, False, False,
                        (i % 60000) + 1 if qos else 0).encode()
                for i in range(start, min(start + BATCH, messages))
            )
            for start in range(0, messages, BATCH)
        ]
        began = time.perf_counter_ns()
        for chunk in chunks:
            broker.handle_data(pub, chunk)
            pub.data_to_send()
            for sub in subs:
                out = sub.data_to_send()
                sub.sent(len(out))
                if qos:
                    acks = b"".join(PubAck(p.packet_id).encode() for p in decoder.feed(out)
                                    if isinstance(p, Publish))
                    broker.handle_data(sub, acks)
                    sub.data_to_send()
        if messages:
            best = min(best, (time.perf_counter_ns() - began) / messages)
    return best if messages else 0.0


if __name__ == "__main__":
    main()
