"""The claim-check pattern for large payloads: the file goes to a blob store, the MQTT
message carries only a reference to it (URL, SHA-256, size), and the consumer fetches the
file and checks it against the reference before using it.

MQTT brokers are built for many small messages; a firmware image or a camera frame of
several megabytes held in a queue costs every subscriber's budget and every store commit.
``python -m devices claim-check send FILE`` puts FILE into a content-addressed directory
(``--store``, the stand-in for an object store such as S3 or an HTTP file server) and
publishes the claim check at QoS 1; ``python -m devices claim-check fetch`` subscribes,
downloads each file from its URL (``file://`` or ``http(s)://``), verifies size and
SHA-256 and writes it to ``--out``. A file whose bytes do not match is not kept.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import pathlib
import secrets
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import attrs
import trio

from devices.client import Client
from mqttd import codec

DEFAULT_TOPIC = "site/{id}/files"
DEFAULT_FILTER = "site/+/files"
CHUNK = 1 << 16


@attrs.frozen
class ClaimCheck:
    """What travels over MQTT instead of the file."""

    url: str
    sha256: str
    size: int
    name: str
    content_type: str = "application/octet-stream"

    def encode(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> ClaimCheck:
        """The claim check in a message; ValueError when it is not one."""
        try:
            fields = json.loads(payload)
            check = cls(**{f.name: fields[f.name] for f in attrs.fields(cls)
                           if f.name in fields})
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a claim check: {exc}") from None
        if not isinstance(check.size, int) or len(check.sha256) != 64:
            raise ValueError("not a claim check: size or sha256 missing")
        return check


def _digest(path: pathlib.Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def store_file(path: pathlib.Path, store: pathlib.Path, base_url: str | None = None) -> ClaimCheck:
    """Copy ``path`` into the content-addressed ``store`` (as its SHA-256) and return its
    claim check; the URL is ``base_url/<sha256>`` when the store is served over HTTP, else a
    ``file://`` URL."""
    sha256, size = _digest(path)
    store.mkdir(parents=True, exist_ok=True)
    target = store / sha256
    if not target.exists():
        partial = store / f".{sha256}.{secrets.token_hex(4)}"
        shutil.copyfile(path, partial)
        os.replace(partial, target)  # readers never see half a file
    url = (f"{base_url.rstrip('/')}/{sha256}" if base_url is not None
           else target.resolve().as_uri())
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return ClaimCheck(url, sha256, size, path.name, content_type)


def fetch_verified(check: ClaimCheck, out: pathlib.Path, timeout_s: float = 30.0) -> pathlib.Path:
    """Download the file of ``check`` into ``out`` (named as in the check, never outside
    ``out``) and return its path; ValueError (and nothing kept) when its size or SHA-256
    differ from the check's."""
    if urllib.parse.urlsplit(check.url).scheme not in ("file", "http", "https"):
        raise ValueError(f"refusing to fetch {check.url!r}: not a file or http(s) URL")
    out.mkdir(parents=True, exist_ok=True)
    name = pathlib.PurePath(check.name).name or check.sha256
    sha, size = hashlib.sha256(), 0
    fd, partial = tempfile.mkstemp(dir=out, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(check.url, timeout=timeout_s) as r:
            while chunk := r.read(CHUNK):
                size += len(chunk)
                if size > check.size:
                    raise ValueError(f"{name}: more than the {check.size} bytes announced")
                sha.update(chunk)
                f.write(chunk)
        if size != check.size or sha.hexdigest() != check.sha256:
            raise ValueError(f"{name}: got {size} bytes with SHA-256 {sha.hexdigest()}, "
                             f"the claim check says {check.size} bytes, {check.sha256}")
        target = out / name
        os.replace(partial, target)
        return target
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


async def send(
    host: str, port: int, device: str, path: pathlib.Path, store: pathlib.Path,
    base_url: str | None = None, topic: str = DEFAULT_TOPIC, timeout_s: float = 10.0,
) -> ClaimCheck:
    """Store the file, publish its claim check (QoS 1) and wait for the broker's PUBACK."""
    check = store_file(path, store, base_url)
    client = Client(host, port, device, keepalive_s=0, connect_timeout_s=timeout_s)
    with trio.fail_after(timeout_s):
        async with client.connected():
            await client.publish(topic.format(id=device), check.encode(), qos=1)
            await client.wait_acked()
    return check


async def fetch(
    host: str, port: int, out: pathlib.Path, client_id: str = "claim-check-fetcher",
    topic_filter: str = DEFAULT_FILTER, count: int | None = None,
    report: Callable[[str], None] = print, task_status: Any = trio.TASK_STATUS_IGNORED,
) -> tuple[int, int]:
    """Fetch and verify the file of every claim check published on ``topic_filter`` (QoS 1),
    until ``count`` have arrived (or forever); returns (kept, rejected)."""
    arrived: trio.MemorySendChannel[codec.Publish]
    arrived, incoming = trio.open_memory_channel[codec.Publish](1000)
    client = Client(host, port, client_id, keepalive_s=30, on_message=arrived.send_nowait)
    kept = rejected = 0
    async with client.connected():
        await client.subscribe((topic_filter, 1))
        task_status.started()
        async for message in incoming:
            try:
                check = ClaimCheck.decode(message.payload)
                target = await trio.to_thread.run_sync(fetch_verified, check, out)
            except (ValueError, OSError) as exc:
                rejected += 1
                report(f"{message.topic}: rejected: {exc}")
            else:
                kept += 1
                report(f"{message.topic}: {target} ({check.size} bytes, sha256 verified)")
            if count is not None and kept + rejected >= count:
                break
    return kept, rejected
