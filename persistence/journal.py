"""What the broker's sans-IO code needs of the store writer: submit typed operations and
message bodies, a ticket to tell whether handling a packet wrote anything, and how far behind
the writer is.

:class:`persistence.writer.GroupCommitWriter` is the implementation (trio); this Protocol
lets sessions and the engine be typed against the store without importing trio."""

from __future__ import annotations

from typing import Protocol

from persistence.ops import Op
from persistence.store import Usage


class Journal(Protocol):
    ticket: int  # operations submitted so far
    next_message_id: int
    commits: int
    ops_written: int
    accepting: bool  # room on disk for new data
    storage_problem: str  # why not, while not accepting
    storage_failures: int  # commits the disk could not take (tried again)
    usage: Usage | None  # the database's size and its filesystem's free bytes

    @property
    def pending(self) -> int:
        """Operations submitted and not committed yet."""
        ...

    @property
    def congested(self) -> bool:
        """Too many pending operations: stop reading from clients until it drains."""
        ...

    def submit(self, op: Op) -> None: ...

    def add_message(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: bytes | None = None,
        expires_at: float | None = None,
    ) -> int: ...
