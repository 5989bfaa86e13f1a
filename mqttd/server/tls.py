"""TLS for listeners: the server-side ``ssl.SSLContext`` of a listener's ``tls`` section,
the handshake (bounded by the CONNECT deadline) and the client certificate's identity; the
client-side context of a bridge's ``tls`` section.

The handshake is done before the MQTT connection starts, so a client that fails it never
reaches the broker: its socket is closed and one line is logged.
"""

from __future__ import annotations

import logging
import ssl

import trio

from mqttd.config import TLS, BridgeTLS

log = logging.getLogger(__name__)


class TLSSetupError(OSError):
    """A listener's certificate, key or CA file cannot be loaded. An ``OSError`` so that
    the command line reports it as a startup error (``cannot start: ...``)."""


def server_context(tls: TLS) -> ssl.SSLContext:
    """A server context for ``tls``: TLS 1.2 or later, the listener's certificate chain and
    key; with ``cafile``, client certificates signed by it are verified (required when
    ``require_certificate`` or ``use_identity_as_username`` is set, optional otherwise).
    Raises :class:`TLSSetupError` naming the file that could not be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ValueError) as exc:
        raise TLSSetupError(
            f"cannot load TLS certificate {tls.certfile!r} with key {tls.keyfile!r}: "
            f"{_describe(exc)}"
        ) from exc
    client_cert_needed = tls.require_certificate or tls.use_identity_as_username
    if tls.cafile is not None:
        try:
            context.load_verify_locations(cafile=tls.cafile)
        except (OSError, ValueError) as exc:
            raise TLSSetupError(
                f"cannot load TLS CA file {tls.cafile!r}: {_describe(exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED if client_cert_needed else ssl.CERT_OPTIONAL
    elif client_cert_needed:
        what = "require_certificate" if tls.require_certificate else "use_identity_as_username"
        raise TLSSetupError(f"TLS {what} needs a cafile to verify client certificates with")
    return context


def client_context(tls: BridgeTLS) -> ssl.SSLContext:
    """The client-side TLS context of a bridge (files read once, at start-up: a missing or
    broken file stops the broker with the reason)."""
    context = ssl.create_default_context(cafile=tls.cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certfile is not None:
        context.load_cert_chain(tls.certfile, tls.keyfile)
    context.check_hostname = tls.verify_hostname
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)


def certificate_cn(cert: dict[str, object] | None) -> str | None:
    """The first subject commonName of a certificate as ``SSLObject.getpeercert()`` gives it
    (only verified certificates are given), or None."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None


async def handshake(
    stream: trio.SocketStream, context: ssl.SSLContext, peer: str, deadline: float
) -> trio.SSLStream[trio.SocketStream] | None:
    """Wrap ``stream`` in TLS and do the server handshake by ``deadline``. On failure or
    timeout log one line, close the socket and return None."""
    # https_compatible: a client that closes its socket without close_notify is an EOF like
    # on TCP (MQTT's own framing shows truncation), and closing does not wait for the peer
    ssl_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    problem = None
    with trio.move_on_at(deadline) as scope:
        try:
            await ssl_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            problem = str(exc.__cause__ or exc) or type(exc).__name__
    if scope.cancelled_caught:
        problem = "no handshake within the CONNECT timeout"
    if problem is None:
        return ssl_stream
    log.warning("client %s: TLS handshake failed: %s", peer, problem)
    await trio.aclose_forcefully(ssl_stream)
    return None
