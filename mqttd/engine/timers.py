"""Timers as data: the engine schedules callbacks at wall-clock instants (5.0 will delays,
session expiry); the service's timer loop sleeps until :meth:`TimerQueue.next_deadline` and
calls :meth:`TimerQueue.run_due`. No trio here."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable


class TimerQueue:
    """Callbacks ordered by when they are due (epoch seconds), first come first served for
    equal instants."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, when: float, callback: Callable[[], object]) -> bool:
        """Schedule ``callback`` at ``when``; True when it is now the first one due (the
        service's loop must wake up to sleep less)."""
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, callback))
        return self._heap[0][2] is callback

    def next_deadline(self) -> float:
        """When the first callback is due (infinity when none is scheduled)."""
        return self._heap[0][0] if self._heap else math.inf

    def run_due(self, now: float, limit: int = 0) -> int:
        """Call every callback that was scheduled before this call and is due at ``now``; at
        most ``limit`` of them when ``limit`` is set. Returns how many ran. Callbacks that
        the callbacks schedule wait for the next call (the service's loop makes it at once
        when they are due), so that a periodic callback cannot loop for ever when ``now``
        is far ahead (a test making "all the time in the world" pass)."""
        heap = self._heap
        started = self._seq
        later = []
        ran = 0
        while heap and heap[0][0] <= now and (not limit or ran < limit):
            entry = heapq.heappop(heap)
            if entry[1] > started:
                later.append(entry)
                continue
            entry[2]()
            ran += 1
        for entry in later:
            heapq.heappush(heap, entry)
        return ran
