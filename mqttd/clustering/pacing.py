"""Flow control across nodes: a node whose subscribers fall behind paces the nodes that feed
them (mqttd.engine.flow, extended over NATS).

On one node a backlogged subscriber holds the publishers whose messages reach it. A message
from another node has no publisher here, so each origin node gets a stand-in connection
while its messages are routed (``flow.current``): a backlogged subscriber holds it as it
would hold a local publisher. While the stand-in of node X is held, this node stops reading
its NATS connection (what other nodes sent waits in its NATS server, which buffers up to
its ``max_pending`` per connection) and tells X so on ``mqttd.pace.<X>`` (``<this node>
on``, repeated every ``REFRESH_S``), then ``off`` once the subscribers it waits for have
drained and it has read what its NATS server had queued for it (a short read: else the
origin would add to that backlog again at once, until the server cut the connection as a
slow consumer), or stalled (a stalled subscriber stops pacing, as on one node: its QoS 0
messages are dropped over its buffer, QoS 1/2 queued within its budget, everything
counted).

Node X, while any node paces it, stops reading its clients' sockets (``congested``: every
publisher on X, not only those feeding the slow subscriber, which X cannot tell apart), so
TCP slows them down and nothing is lost in between. A pace that is not repeated expires
after ``EXPIRE_S`` (its node died, or the ``off`` was lost).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import attrs
import trio

from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import NatsError
from mqttd.connection import Connection

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext

log = logging.getLogger("mqttd.cluster")

PREFIX = "mqttd.pace."
REFRESH_S = 0.5
EXPIRE_S = 2.0
CHECK_S = 0.05


@attrs.define(eq=False)
class RemotePacing:
    node: NodeContext
    stand_ins: dict[str, Connection] = attrs.Factory(dict)  # origin node -> stand-in
    pacing: dict[str, float] = attrs.Factory(dict)  # origin -> when "on" was last sent
    paced_by: dict[str, float] = attrs.Factory(dict)  # node -> when its pace expires
    _changed: trio.Event = attrs.Factory(trio.Event)
    _free: trio.Event = attrs.Factory(trio.Event)  # set when no stand-in is held
    # counters
    paces_sent: int = 0  # times this node told another to pause
    paces_received: int = 0  # times another node told this one to pause

    def install(self) -> None:
        self.node.client.subscribe_nowait(PREFIX + self.node.node, callback=self._on_pace)
        self.node.client.read_gate = self.wait_readable
        self._free.set()

    def blocked(self) -> bool:
        """Whether a backlogged subscriber here holds some node's stand-in (the NATS
        reader waits then; the pace stays on after that until the reader caught up)."""
        stand_ins = self.stand_ins
        return any(stand_ins[origin].held_by for origin in self.pacing)

    async def wait_readable(self) -> None:
        """The NATS reader waits here while this node's subscribers are behind on what
        other nodes sent (it stays in the NATS server meanwhile, and the origin pauses)."""
        while self.pacing and self.blocked():
            if self._free.is_set():
                self._free = trio.Event()
            await self._free.wait()

    # -- as the subscribers' node ------------------------------------------------------------

    def stand_in(self, origin: str) -> Connection:
        conn = self.stand_ins.get(origin)
        if conn is None:
            conn = self.stand_ins[origin] = Connection(peer=f"node {origin}",
                                                       client_id=f"(node {origin})")
        return conn

    def routed(self, origin: str, conn: Connection) -> None:
        """After routing a message of ``origin``: tell it to pause if it is now held."""
        if conn.held_by and origin not in self.pacing:
            self._send(origin, "on")
            self._changed.set()

    def _send(self, origin: str, state: str) -> None:
        if state == "on":  # (an "off" follows its removal from ``pacing``: not put back)
            self.pacing[origin] = trio.current_time()
        try:
            self.node.client.publish_nowait(PREFIX + origin,
                                            f"{self.node.node} {state}".encode())
        except (trio.WouldBlock, NatsError):
            return  # "on" is sent again; a lost "off" expires at the other end
        if state == "on":
            self.paces_sent += 1

    async def run(self) -> None:
        """Release stand-ins held by stalled subscribers, say ``off`` when one is free,
        repeat ``on``; expire the paces of other nodes."""
        flow = self.node.engine.flow
        while True:
            if not self.pacing and not self.paced_by:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            await trio.sleep(CHECK_S)
            now = trio.current_time()
            caught_up = self.node.client.caught_up
            for origin in list(self.pacing):
                conn = self.stand_ins[origin]
                if conn.held_by:
                    flow.release_stalled(conn, time.monotonic())
                if not conn.held_by and caught_up:
                    # drained, and what the NATS server had queued for this node is read:
                    # else the origin would add to that backlog again at once
                    del self.pacing[origin]
                    self._send(origin, "off")
                elif now - self.pacing[origin] >= REFRESH_S:
                    self._send(origin, "on")
            expired = [n for n, until in self.paced_by.items() if until <= now]
            for name in expired:
                del self.paced_by[name]
                log.info("cluster: node %s's request to pause expired", name)
            if expired:
                self.node.engine.notify_progress()
            if not self.blocked():
                self._free.set()

    # -- as the publishers' node --------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self.paced_by)

    def _on_pace(self, msg: Msg) -> None:
        try:
            name, state = msg.payload.decode().split(" ")
        except (UnicodeDecodeError, ValueError):
            return
        if state == "on":
            if name not in self.paced_by:
                self.paces_received += 1
            self.paced_by[name] = trio.current_time() + EXPIRE_S
            self._changed.set()
        elif self.paced_by.pop(name, None) is not None:
            self.node.engine.notify_progress()

    def stats(self) -> dict[str, int]:
        return {
            "cluster_paces_sent": self.paces_sent,
            "cluster_paces_received": self.paces_received,
            "cluster_paced_by": len(self.paced_by),
            "cluster_pacing": len(self.pacing),
        }
