"""The running part that a backend consumer (:mod:`devices.consumer`) and a work-queue worker
(:mod:`devices.worker`) share: one client that subscribes once connected and stays
connected, reconnecting when the broker goes away, until it is stopped, a duration passes
or its owner has had enough messages.

The owner keeps what differs between the two: the client it builds, how it subscribes and
what a refused subscription is, what it counts and reports. It hands this its session and
its error handler, and calls :meth:`Subscriber.stop`, :meth:`Subscriber.lost_while_stopping`
and :meth:`Subscriber.subscribed` from them. ::

    subscriber = Subscriber(client)
    await subscriber.run(session, backoff=Backoff(0.5), on_error=on_error,
                         task_status=task_status, started_with=owner)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from devices.client import Backoff, Client, run_with_reconnect
from mqttd import codec


@attrs.define(eq=False)
class Subscriber:
    """One owner's client, kept connected and subscribed until stopped."""

    client: Client
    _stop: trio.Event = attrs.field(init=False, factory=trio.Event)
    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _task_status: Any = attrs.field(init=False, default=None)
    _started_with: Any = attrs.field(init=False, default=None)

    def stop(self) -> None:
        """Disconnect and end :meth:`run` (at once if not connected: no reconnecting)."""
        self._stop.set()
        if not self.client.is_connected:
            self._scope.cancel()

    def lost_while_stopping(self) -> bool:
        """For the owner's error handler: a connection lost after :meth:`stop` is the end,
        not a reason to reconnect, so this ends :meth:`run` and returns True."""
        if self._stop.is_set():
            self._scope.cancel()
            return True
        return False

    async def subscribed(self) -> bool:
        """The rest of a session once the owner has subscribed: the first time, tell the
        caller of :meth:`run` it has started; then wait for :meth:`stop`. Returns True, which
        tells :func:`run_with_reconnect` not to connect again."""
        if self._task_status is not None:
            self._task_status.started(self._started_with)
            self._task_status = None
        await self._stop.wait()
        return True

    async def run(
        self,
        session: Callable[[Client, codec.ConnAck], Awaitable[bool]],
        *,
        backoff: Backoff,
        on_error: Callable[[BaseException], None],
        task_status: Any,
        started_with: Any,
        report_loop: Callable[[], Awaitable[None]] | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Connect and run ``session`` (reconnecting) until :meth:`stop` or ``duration_s``;
        ``report_loop`` runs alongside. Reports ``started_with`` to ``task_status`` once
        the owner's session has subscribed."""
        self._task_status = task_status
        self._started_with = started_with
        async with trio.open_nursery() as nursery:
            if report_loop is not None:
                nursery.start_soon(report_loop)
            if duration_s is not None:
                nursery.start_soon(self._stop_after, duration_s)
            with self._scope:
                await run_with_reconnect(self.client, session, on_error=on_error, backoff=backoff)
            nursery.cancel_scope.cancel()

    async def _stop_after(self, duration_s: float) -> None:
        await trio.sleep(duration_s)
        self.stop()
