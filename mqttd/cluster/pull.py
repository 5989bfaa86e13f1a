"""Durable pull consumers: a work queue read by several processes, each asking for as many
messages as it can take.

* ``ensure_durable``: create a durable consumer with explicit acks (or keep the one that
  exists: a durable created again with the same configuration is the same consumer);
* :class:`PullConsumer`: a literal reply subscription of its own (nats-server 2.9.10 does
  not deliver to an interest that is only a wildcard) and ``fetch``: one
  ``$JS.API.CONSUMER.MSG.NEXT`` request at a time for ``batch`` messages, waiting up to
  ``expires_s``. Messages are handed to the callback in the client's reader task, as they
  come (no buffering here); the fetch ends when the batch is full or the server ends the
  request (408 request timeout, 404 no messages, 409 consumer deleted or too many
  waiting requests, 503 no such consumer);
* what a message's receiver answers, on its ack subject, fire and forget: ``ack``
  (``+ACK``), ``nak`` (``-NAK``, with a delay before the server delivers it again),
  ``term`` (``+TERM``: never again) and ``in_progress`` (``+WPI``: the ack wait starts
  again). An answer lost with the connection costs a redelivery after the ack wait.

A message's ack subject says how often it was delivered (:func:`delivery_of`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from mqttd.cluster.jetstream import NS, JetStream, JetStreamError
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import NatsError, Subscription

log = logging.getLogger("mqttd.cluster.jetstream")

# err_code of "consumer already exists" with another configuration (2.9.10: 10013 "consumer
# name already in use"; newer: 10148 "consumer already exists")
ERR_CONSUMER_EXISTS = (10013, 10148)
# the statuses that end a pull request
STATUS_NO_MESSAGES = 404
STATUS_REQUEST_TIMEOUT = 408
STATUS_CONFLICT = 409
STATUS_NO_RESPONDERS = 503  # no such consumer (or JetStream unavailable)
LOST = 0  # ended_by: no heartbeat came (see PullConsumer.fetch)
FETCH_GRACE_S = 2.0  # past expires_s: the server's 408 was lost (a reconnect, say)


@attrs.frozen
class Delivery:
    """What a message's ack subject says: ``delivered`` (this delivery included), the
    stream and consumer sequences, and how many messages are pending after it."""

    delivered: int
    stream_seq: int
    consumer_seq: int
    pending: int


def delivery_of(reply: str) -> Delivery | None:
    """``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens,
    2.9.10), or the later form with domain and account hash (12 tokens)."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    if len(tokens) == 9:
        base = 4
    elif len(tokens) >= 11:
        base = 6
    else:
        return None
    try:
        return Delivery(int(tokens[base]), int(tokens[base + 1]), int(tokens[base + 2]),
                        int(tokens[base + 4]))
    except ValueError:
        return None


@attrs.frozen
class DurableConfig:
    """A durable pull consumer with explicit acks on one subject filter."""

    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_deliver: int = -1  # -1: no limit (the caller counts deliveries)
    max_ack_pending: int = 20_000
    max_waiting: int = 512  # pull requests waiting at once
    num_replicas: int = 0  # 0: the stream's

    def to_api(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "durable_name": self.durable,
            "filter_subject": self.filter_subject,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": round(self.ack_wait_s * NS),
            "max_deliver": self.max_deliver,
            "max_ack_pending": self.max_ack_pending,
            "max_waiting": self.max_waiting,
            "replay_policy": "instant",
        }
        if self.num_replicas:
            config["num_replicas"] = self.num_replicas
        return config


async def ensure_durable(js: JetStream, stream: str, config: DurableConfig) -> dict[str, Any]:
    """Create the durable consumer, or take the one that exists (its configuration is
    reported, not changed: another node may have made it with other settings)."""
    request = {"stream_name": stream, "config": config.to_api()}
    try:
        return await js.api(f"CONSUMER.DURABLE.CREATE.{stream}.{config.durable}", request)
    except JetStreamError as exc:
        if exc.err_code not in ERR_CONSUMER_EXISTS:
            raise
        problem = exc.description
    info = await js.api(f"CONSUMER.INFO.{stream}.{config.durable}")
    log.info("consumer %s on %s exists with another configuration (%s): kept", config.durable,
             stream, problem)
    return info


async def create_ephemeral(
    js: JetStream, stream: str, filter_subject: str, *, start_seq: int = 0,
    inactive_s: float = 30.0, max_ack_pending: int = 65_536,
) -> str:
    """An ephemeral pull consumer (R1, in memory, gone after ``inactive_s`` without a
    fetch) on one subject, from ``start_seq`` (0: the first message), with cumulative acks
    (``+ACK`` of a message acknowledges every one before it) and an ack wait of a day (the
    reader acknowledges when it is done; nothing is redelivered meanwhile). Its name."""
    config: dict[str, Any] = {
        "filter_subject": filter_subject,
        "ack_policy": "all",
        "ack_wait": 86_400 * NS,
        "max_ack_pending": max_ack_pending,
        "max_waiting": 4,
        "replay_policy": "instant",
        "inactive_threshold": round(inactive_s * NS),
        "mem_storage": True,
        "num_replicas": 1,
    }
    if start_seq > 1:
        config.update(deliver_policy="by_start_sequence", opt_start_seq=start_seq)
    else:
        config["deliver_policy"] = "all"
    data = await js.api(f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})
    return str(data["name"])


async def delete_consumer(js: JetStream, stream: str, name: str) -> None:
    await js.api(f"CONSUMER.DELETE.{stream}.{name}")


async def consumer_info(js: JetStream, stream: str, name: str) -> dict[str, Any]:
    return await js.api(f"CONSUMER.INFO.{stream}.{name}")


@attrs.define(eq=False)
class PullConsumer:
    """Fetch from a durable consumer; every message goes to ``on_message`` (in the NATS
    client's reader task: it must not block)."""

    js: JetStream
    stream: str
    durable: str
    on_message: Callable[[Msg], None]
    _sub: Subscription | None = None
    _received: int = 0  # messages of the open request
    _batch: int = 0
    _done: trio.Event = attrs.Factory(trio.Event)
    ended_by: int | None = None  # the status that ended the last fetch (None: batch full)
    fetches: int = 0
    lost: int = 0  # fetches ended for want of a heartbeat
    _seen: int = 0  # messages and statuses received

    def open(self) -> None:
        client = self.js.client
        self._sub = client.subscribe_nowait(client.new_inbox(), callback=self._on_msg)

    def close(self) -> None:
        """End the open fetch and drop the reply subscription (the server skips a pending
        request whose reply subject has no interest); the next fetch makes a new one."""
        if self._sub is not None:
            self.js.client._unsubscribe(self._sub)
            self._sub = None
        self._done.set()

    def _on_msg(self, msg: Msg) -> None:
        self._seen += 1
        status = msg.status
        if status is None:
            self._received += 1
            if self._received >= self._batch:
                self.ended_by = None
                self._done.set()
            self.on_message(msg)
            return
        if status in (STATUS_NO_MESSAGES, STATUS_REQUEST_TIMEOUT, STATUS_CONFLICT,
                      STATUS_NO_RESPONDERS):
            self.ended_by = status
            self._done.set()
        # 100 (idle heartbeat; counted in _seen) and anything else: the request goes on

    async def fetch(self, batch: int, expires_s: float, heartbeat_s: float | None = None
                    ) -> int:
        """Ask for up to ``batch`` messages, waiting up to ``expires_s`` for them; returns
        how many came (they went to ``on_message``). With ``heartbeat_s`` the server sends
        an idle heartbeat that often while the request waits; none (nor a message) for two
        intervals ends the fetch with ``ended_by`` LOST: the request did not reach the
        consumer's leader (a consumer created a moment ago, a leader election), or it died."""
        if self._sub is None:
            self.open()
        assert self._sub is not None
        self._received, self._batch, self._done = 0, batch, trio.Event()
        self.ended_by = None
        request: dict[str, Any] = {"batch": batch, "expires": round(expires_s * NS)}
        if heartbeat_s is not None:
            request["idle_heartbeat"] = round(heartbeat_s * NS)
        self.fetches += 1
        await self.js.client.publish(
            f"{self.js.prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
            json.dumps(request).encode(), reply=self._sub.subject,
        )
        deadline = trio.current_time() + expires_s + FETCH_GRACE_S
        seen = self._seen
        while not self._done.is_set():
            wait_until = deadline if heartbeat_s is None else min(
                deadline, trio.current_time() + 2 * heartbeat_s)
            with trio.move_on_at(wait_until):
                await self._done.wait()
            if self._done.is_set() or trio.current_time() >= deadline:
                break
            if self._seen == seen:  # nothing for two heartbeat intervals
                self.ended_by = LOST
                self.lost += 1
                break
            seen = self._seen
        return self._received


# -- answers on a message's ack subject --------------------------------------------------

ACK = b"+ACK"
TERM = b"+TERM"
IN_PROGRESS = b"+WPI"


def _answer(js: JetStream, reply: str, body: bytes) -> bool:
    """Queue an answer; False when it could not be queued (the client is closed or its
    output full: the server delivers the message again after the ack wait)."""
    try:
        js.client.publish_nowait(reply, body)
    except (trio.WouldBlock, NatsError):
        return False
    return True


def ack(js: JetStream, reply: str) -> bool:
    return _answer(js, reply, ACK)


def nak(js: JetStream, reply: str, delay_s: float = 0.0) -> bool:
    body = b"-NAK" if delay_s <= 0 else b"-NAK " + json.dumps(
        {"delay": round(delay_s * NS)}).encode()
    return _answer(js, reply, body)


def term(js: JetStream, reply: str) -> bool:
    return _answer(js, reply, TERM)


def in_progress(js: JetStream, reply: str) -> bool:
    return _answer(js, reply, IN_PROGRESS)

