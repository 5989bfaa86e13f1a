"""The operations listener: HTTP/1.1 (h11, on trio) for operators and their tools.

``GET /metrics`` (Prometheus text), ``GET /healthz`` (the process answers), ``GET /readyz``
(listeners bound, store open and accepting, its writer keeping up; 503 with the reason
otherwise), the dashboard at ``/`` (its files: mqttd/server/dashboard.py). Everything is
read from the engine in the trio thread. On by default on 127.0.0.1 (``http:`` in the
configuration, ``--http-port``); reading is open there.
Requests are small and bounded (headers 16 KiB, no bodies, 10 s per request).
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import trio

from mqttd import metrics
from mqttd.config import is_loopback as _loopback
from mqttd.engine import admin, views
from mqttd.server import dashboard
from mqttd.server.bind import open_listeners

if TYPE_CHECKING:
    from mqttd.config import Http
    from mqttd.engine.dispatch import Engine as Broker

log = logging.getLogger("mqttd.http")

MAX_HEADER_BYTES = 16_384
REQUEST_TIMEOUT_S = 10.0
RECEIVE_SIZE = 16_384
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_PREFIX = "/api/v1/clients/"
SESSION_PREFIX = "/api/v1/sessions/"
RETAINED_PREFIX = "/api/v1/retained/"
OPEN_PATHS = frozenset({"/healthz", "/readyz", *dashboard.ASSETS})  # GET without the token
Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[dict[str, str], "str | None"], Response]


class OpsServer:
    def __init__(self, broker: Broker, config: Http, token: str) -> None:
        self.broker = broker
        self.config = config
        self.token = token  # the credential of requests that change state
        self.open_reads = _loopback(config.host)  # reading needs no credential on loopback
        self.addresses: list[tuple[str, int]] = []
        self.requests = 0
        self._clients = config.metrics_clients

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners("http", self.config.host, self.config.port)
        self.addresses = [tuple(ls.socket.getsockname()[:2]) for ls in listeners]  # type: ignore[misc]
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            log.info("mqttd operations (HTTP) on http://%s:%d/ (metrics: /metrics)", shown, port)
        task_status.started(self.addresses)
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
                    request = await _next_request(stream, conn)
                if scope.cancelled_caught or request is None:
                    return
                self.requests += 1
                if self._allowed(request):
                    status, content_type, body = self.respond(request)
                else:
                    status, content_type, body = _json(401, {
                        "error": "this request needs the credential: Authorization: Bearer "
                        "<http.token, or the api-token file in the data directory>"
                    })
                await _send_response(stream, conn, status, content_type, body)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    def _allowed(self, request: h11.Request) -> bool:
        """Reading is open on loopback; anything else needs the token, but for the health
        checks (for probes) and the dashboard's files (they hold no data; the page sends the
        token the operator enters)."""
        if request.method == b"GET" and (
            (self.open_reads and _loopback_host(request)) or _path(request) in OPEN_PATHS
        ):
            return True
        expected = b"bearer " + self.token.encode()
        for name, value in request.headers:
            if name == b"authorization":
                return hmac.compare_digest(value.lower().strip(), expected.lower())
        return False

    def respond(self, request: h11.Request) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        target = urllib.parse.urlsplit(request.target.decode("latin-1"))
        path = urllib.parse.unquote(target.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(target.query).items()}
        routes: dict[str, Route] = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
            "/api/v1/stats": self._stats, "/api/v1/clients": self._clients_page,
            "/api/v1/bridges": self._bridges, "/api/v1/subscriptions": self._subscriptions,
            "/api/v1/retained": self._retained, "/api/v1/groups": self._groups,
            "/api/v1/cluster": self._cluster,
        }
        handler: Route | None = routes.get(path)
        argument: str | None = None
        if handler is None and path.startswith(CLIENT_PREFIX) and len(path) > len(CLIENT_PREFIX):
            handler = self._client
            argument = path[len(CLIENT_PREFIX):]
        elif handler is None and path in dashboard.ASSETS:
            handler, argument = self._dashboard, path
        if request.method == b"DELETE":
            return self._delete(path)
        if handler is None:
            return _json(404, {"error": f"no such resource: {path}"})
        if request.method != b"GET":
            return _json(405, {"error": f"{request.method.decode()} is not allowed on {path}"})
        try:
            return handler(query, argument)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})

    def _delete(self, path: str) -> Response:
        """DELETE /api/v1/clients/{id} (kick), /api/v1/sessions/{id}, /api/v1/retained/{topic}
        (the topic percent-encoded or as it is: ``/api/v1/retained/a/b``)."""
        for prefix, action, what, key in (
            (CLIENT_PREFIX, admin.kick, "connected client", "client_id"),
            (SESSION_PREFIX, admin.delete_session, "session", "client_id"),
            (RETAINED_PREFIX, admin.delete_retained, "retained message", "topic"),
        ):
            if path.startswith(prefix) and len(path) > len(prefix):
                name = path[len(prefix):]
                if not action(self.broker, name):
                    return _json(404, {"error": f"no {what} {name!r}"})
                return _json(200, {"done": what, key: name})
        return _json(405, {"error": f"DELETE is not allowed on {path}"})

    def _stats(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        return _json(200, self.broker.stats())

    def _bridges(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        return _json(200, {"bridges": self.broker.bridge_stats()})

    def _clients_page(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        connected = query.get("connected")
        if connected not in (None, "true", "false"):
            raise ValueError(f"connected must be true or false, got {connected!r}")
        return _json(200, views.clients(
            self.broker, query.get("id"),
            None if connected is None else connected == "true",
            _number(query, "offset", 0), _number(query, "limit", 100),
        ))

    def _subscriptions(self, query: dict[str, str], _: str | None) -> Response:
        return _json(200, views.subscriptions(
            self.broker, query.get("client_id"), query.get("filter"), query.get("match"),
            _number(query, "offset", 0), _number(query, "limit", 100),
        ))

    def _retained(self, query: dict[str, str], _: str | None) -> Response:
        return _json(200, views.retained(
            self.broker, query.get("filter", "#"),
            _number(query, "offset", 0), _number(query, "limit", 100),
        ))

    def _groups(self, query: dict[str, str], _: str | None) -> Response:
        return _json(200, views.groups(self.broker, query.get("group")))

    def _cluster(self, query: dict[str, str], _: str | None) -> Response:
        overview = self.broker.cluster_overview()
        if overview is None:
            return _json(404, {"error": "not in cluster mode (cluster.enabled is false): "
                               "this broker is a single node"})
        return _json(200, overview)

    def _client(self, query: dict[str, str], client_id: str | None) -> tuple[int, str, bytes]:
        detail = views.client_detail(self.broker, client_id or "")
        if detail is None:
            return _json(404, {"error": f"no client {client_id!r}"})
        return _json(200, detail)

    def _metrics(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        broker = self.broker
        clients = None
        pattern = self._clients
        if pattern is not None:
            clients = {
                cid: stats for cid in broker.sessions
                if fnmatch.fnmatchcase(cid, pattern) and (stats := broker.client_stats(cid))
            }
        text = metrics.render(broker.stats(), broker.bridge_stats(), clients,
                              groups=broker.work_queues.group_stats(),
                              cluster_nodes=broker.cluster_nodes(),
                              cluster=broker.cluster_overview())
        return 200, PROMETHEUS_TEXT, text.encode()

    def _dashboard(self, query: dict[str, str], path: str | None) -> Response:
        return dashboard.asset(path or "/")

    def _healthz(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        return _json(200, {"status": "ok"})

    def _readyz(self, query: dict[str, str], _: str | None) -> tuple[int, str, bytes]:
        problems = self.broker.not_ready()
        if problems:
            return _json(503, {"status": "not ready", "problems": problems})
        return _json(200, {"status": "ready"})


def _loopback_host(request: h11.Request) -> bool:
    """Whether the request names this machine in its Host header (127.0.0.1, [::1],
    localhost). Open reads need it: a web page whose name was made to resolve to 127.0.0.1
    (DNS rebinding) sends its own name, and so gets no data without the token."""
    for name, value in request.headers:
        if name == b"host":
            host = value.decode("latin-1").strip()
            if host.startswith("["):
                host = host[1:].partition("]")[0]
            else:
                host = host.partition(":")[0]
            return _loopback(host)
    return False


def _path(request: h11.Request) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(request.target.decode("latin-1")).path)


def _number(query: dict[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ValueError(f"{name} must be a number of 0 or more, got {value!r}")
    return int(value)


def _json(status: int, document: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode() + b"\n"


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The next request, its (empty) body read; None when the client is done."""
    request = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send_response(
    stream: trio.SocketStream, conn: h11.Connection, status: int, content_type: str, body: bytes
) -> None:
    headers = [
        ("content-type", content_type), ("content-length", str(len(body))),
        ("cache-control", "no-store"), ("server", "mqttd"),
    ]
    if content_type in dashboard.CONTENT_TYPES:
        headers += dashboard.SECURITY_HEADERS
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body)) or b""  # type: ignore[operator]
    data += conn.send(h11.EndOfMessage()) or b""  # type: ignore[operator]
    await stream.send_all(data)  # type: ignore[arg-type]
