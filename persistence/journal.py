"""What the broker's sans-IO code needs of the store writer: submit typed operations and
message bodies, and a ticket to tell whether handling a packet wrote anything.

:class:`persistence.writer.GroupCommitWriter` is the implementation (trio); this Protocol
lets sessions and the engine be typed against the store without importing trio."""

from __future__ import annotations

from typing import Protocol

from persistence.ops import Op


class Journal(Protocol):
    ticket: int  # operations submitted so far
    next_message_id: int

    def submit(self, op: Op) -> None: ...

    def add_message(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: bytes | None = None,
        expires_at: float | None = None,
    ) -> int: ...
