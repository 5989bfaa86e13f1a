"""Crash test for bridges: ``kill -9`` the bridging broker while a publisher streams QoS 1
messages into it and its bridge forwards them upstream, twice, then restart it: every message
it PUBACKed reaches the upstream broker (duplicates allowed: QoS 1)."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from mqttd.broker import running
from mqttd.config import Listener
from tests.conftest import make_config
from tests.crash.harness import (
    Publisher,
    broker_process,
    check_queue_delivery,
    collect,
    subscribe_and_leave,
)
from tests.crash.test_crash import publish_then_kill
from tests.security.test_auth import free_port

ROUNDS = 2
ROUND_TIMEOUT_S = 30.0
UPSTREAM_TOPIC = "edge/crash/data"


def edge_config(directory: Path, upstream_port: int) -> Path:
    path = directory / "edge.yaml"
    path.write_text(f"""
limits:
  max_queued_messages: 1000000
bridges:
  - name: up
    port: {upstream_port}
    client_id: edge-crash
    reconnect_delay_min_s: 0.05
    reconnect_delay_max_s: 0.2
    max_queued_messages: 1000000
    topics:
      - pattern: "crash/#"
        direction: out
        qos: 1
        remote_prefix: "edge/"
""")
    return path




async def test_acked_messages_reach_the_upstream_broker_across_kill_9(tmp_path):
    port = free_port()
    config = edge_config(tmp_path, port)
    upstream_config = attrs.evolve(
        make_config(data_dir=tmp_path / "upstream", max_queued_messages=1_000_000),
        listeners=(Listener(host="127.0.0.1", port=port),),
    )
    acked: set[int] = set()
    sent: set[int] = set()
    next_number = 1
    with trio.fail_after(ROUNDS * ROUND_TIMEOUT_S + 90):
        async with running(upstream_config) as upstream:
            await subscribe_and_leave(upstream.port, "backend", "edge/#")
            for round_no in range(1, ROUNDS + 1):
                async with broker_process(tmp_path / "edge", config) as edge:
                    publisher = Publisher(
                        edge.port, next_number, lambda n: "crash/data",
                        client_id=f"crash-pub-{round_no}",
                    )
                    await publish_then_kill(edge, publisher, f"round {round_no}")
                acked |= publisher.acked
                sent.update(publisher.sent)
                next_number = publisher.next_number
            async with broker_process(tmp_path / "edge", config) as edge:
                delivery = await collect(
                    upstream.port, "backend", clean_session=False,
                    done=lambda d: acked <= set(d.numbers), overall_s=60.0,
                )
                log_tail = edge.tail()
    problems, summary = check_queue_delivery(acked, sent, delivery, UPSTREAM_TOPIC)
    print(summary)
    assert not problems, "\n".join([*problems, summary, "edge log tail:", log_tail])
