"""``mqttd ctl``: the operator's command line over the operations API (mqttd.server.http).

    mqttd ctl [--url URL] [--token T] [-c FILE] [--data-dir DIR] [--json] [--timeout S] COMMAND

Commands: ``clients``, ``client ID``, ``kick ID``, ``session rm ID``, ``subscriptions``,
``retained ls [FILTER]``, ``retained rm TOPIC``, ``bridges``, ``stats [--watch [S]]``,
``health``, ``cluster``. Tables for people, ``--json`` (the API's own documents) for
scripts. Standard library only (urllib); a configuration given with ``-c`` is read with
mqttd.config.

Exit status: 0 done; 1 the API refused or answered an error (its message on stderr); 2 a
usage error; 3 the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqttd.config import Config

PROG = "mqttd ctl"
DEFAULT_URL = "http://127.0.0.1:18083"
DEFAULT_DATA_DIR = "./data"
TOKEN_FILE = "api-token"  # mqttd.service.API_TOKEN_FILE (not imported: the service needs trio)
API = "/api/v1/"
EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
PAGE = 100  # clients, subscriptions, retained messages shown without --all or --limit
MAX_PAGE = 1000  # the API's largest page (mqttd.engine.views.MAX_PAGE)
PAYLOAD_SHOWN_CHARS = 40
STATS_SHOWN = (
    "connections", "connected_sessions", "sessions", "subscriptions", "retained",
    "messages_received", "messages_sent", "bytes_received", "bytes_sent", "inflight",
    "queued", "dropped", "dropped_qos0", "refused", "store_pending", "storage_ok",
)
RATED = ("messages_received", "messages_sent")  # shown per second under --watch
NOT_RUNNING = (
    "is the broker running with its operations listener on? "
    "(http: in the config, or --http-port)"
)


class CtlError(Exception):
    """Ends the command: ``message`` on stderr, ``status`` the exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Token:
    """The credential sent (``value``), and where it came from or where it was looked for."""

    value: str | None
    source: str


@dataclass(frozen=True)
class Target:
    url: str  # the listener's base URL, without a trailing slash
    token: Token
    timeout_s: float
    http_off: bool = False  # the configuration given turns the listener off


# -- where the broker is, and its credential ---------------------------------------------


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """The URL: --url, else the listener of the configuration (-c), else MQTTD_URL, else
    the default. The token: --token, MQTTD_TOKEN, http.token of the configuration, else the
    api-token file in the data directory (--data-dir, the configuration's, or ./data)."""
    config = _load_config(args.config) if args.config else None
    url = args.url or (_config_url(config) if config else None)
    url = _checked_url(url or environ.get("MQTTD_URL") or DEFAULT_URL)
    return Target(
        url, _token(args, environ, config), args.timeout,
        http_off=config is not None and not config.http.enabled,
    )


def _load_config(path: str) -> Config:
    from mqttd.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CtlError(EXIT_USAGE, str(exc)) from None


def _config_url(config: Config) -> str:
    host, port = config.http.host, config.http.port
    if port == 0:
        raise CtlError(EXIT_USAGE, (
            "the configuration's http.port is 0 (a free port chosen at start): pass --url "
            "with the port the broker logged"
        ))
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _checked_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CtlError(EXIT_USAGE, f"not an http:// URL: {url!r}")
    return url.rstrip("/")


def _token(args: argparse.Namespace, environ: Mapping[str, str], config: Config | None) -> Token:
    if args.token:
        return Token(args.token, "--token")
    if environ.get("MQTTD_TOKEN"):
        return Token(environ["MQTTD_TOKEN"], "the environment (MQTTD_TOKEN)")
    if config is not None and config.http.token:
        return Token(config.http.token, f"http.token in {args.config}")
    if args.data_dir is None and config is not None and config.persistence.in_memory:
        return Token(None, (
            f"{args.config} keeps its store in memory, so the broker's token is not in a "
            "file: set http.token there, or pass --token"
        ))
    data_dir = args.data_dir or (config.persistence.data_dir if config else DEFAULT_DATA_DIR)
    path = Path(data_dir) / TOKEN_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return Token(None, (
            f"none given (--token, MQTTD_TOKEN, http.token) and no {path}: pass --token, "
            "or --data-dir (or -c) naming the broker's data directory"
        ))
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else str(exc)
        return Token(None, f"cannot read {path}: {problem} (run as the broker's user, or "
                     "pass --token)")
    return Token(value or None, str(path) if value else f"{path} is empty")


# -- HTTP -----------------------------------------------------------------------------------


class Api:
    """Requests to the operations listener; errors become CtlError."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # no proxy from the environment: the listener is usually on loopback
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, query: Mapping[str, object] | None = None) -> Any:
        return self.call("GET", API + path, query)[1]

    def delete(self, path: str) -> Any:
        return self.call("DELETE", API + path)[1]

    def call(
        self, method: str, path: str, query: Mapping[str, object] | None = None,
        ok: Container[int] = (200,),
    ) -> tuple[int, Any]:
        """(status, JSON document) of one request; a status not in ``ok`` raises."""
        url = self.target.url + path
        if query:
            url += "?" + urllib.parse.urlencode(
                {key: value for key, value in query.items() if value is not None}
            )
        request = urllib.request.Request(url, method=method, headers={"Accept": "application/json"})
        if self.target.token.value is not None:
            request.add_header("Authorization", f"Bearer {self.target.token.value}")
        try:
            with self._opener.open(request, timeout=self.target.timeout_s) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, exc.read()
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        document = _decode(body)
        if status not in ok:
            raise self._refused(status, document)
        if document is None:
            raise CtlError(EXIT_API, f"{url}: HTTP {status}, but not the JSON of mqttd's API")
        return status, document

    def _refused(self, status: int, document: Any) -> CtlError:
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            message = document["error"]
        else:
            message = f"HTTP {status} from {self.target.url}"
        if status == 401:
            token = self.target.token
            if token.value is None:
                message += f"\n  no token was sent: {token.source}"
            else:
                message += f"\n  the token sent (from {token.source}) is not the broker's"
        return CtlError(EXIT_API, message)

    def _unreachable(self, reason: object) -> CtlError:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, TimeoutError):
            why = f"no answer within {self.target.timeout_s:g} s"
        elif isinstance(reason, socket.gaierror):
            why = f"unknown host ({reason.strerror})"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        else:
            why = str(reason) or type(reason).__name__
        message = f"cannot reach {self.target.url}: {why} — {NOT_RUNNING}"
        if self.target.http_off:
            message += "; the configuration given turns it off (http.enabled: false)"
        return CtlError(EXIT_UNREACHABLE, message)


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _quoted(name: str) -> str:
    """A client id or a topic as one path segment (the API unquotes it)."""
    return urllib.parse.quote(name, safe="")


# -- output ---------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """``text`` with control characters escaped (ids and payloads come from clients)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _printable(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]],
          right: Container[int] = ()) -> str:
    """Aligned columns, two spaces apart; the columns in ``right`` (numbers) right-aligned."""
    cells = [list(headers)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        line = "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        lines.append(line.rstrip())
    return "\n".join(lines)


def _fields(items: Iterable[tuple[str, object]], indent: str = "") -> str:
    """``key: value`` lines, the values aligned."""
    pairs = [(f"{key}:", _field(key, value)) for key, value in items]
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{indent}{key:<{width}} {value}".rstrip() for key, value in pairs)


def _field(key: str, value: object) -> str:
    if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
        return _when(value)
    return _cell(value)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _json_out(document: object, *, compact: bool = False) -> None:
    print(json.dumps(document, ensure_ascii=False, indent=None if compact else 2), flush=True)


def _more(shown: int, total: int, noun: str) -> None:
    if shown < total:
        print(f"({shown} of {total} {noun} shown: --all for every one, or --limit N)")


# -- commands -------------------------------------------------------------------------------


def _pages(api: Api, path: str, key: str, query: dict[str, object],
           args: argparse.Namespace) -> dict[str, Any]:
    """The API's page of ``key`` (``--limit``), or with ``--all`` every page of it joined
    into one document (``--limit`` then the page size)."""
    size = args.limit if args.limit is not None else MAX_PAGE if args.all else PAGE
    offset = 0
    items: list[Any] = []
    while True:
        page = api.get(path, {**query, "offset": offset, "limit": size})
        batch = page[key]
        items += batch
        if not args.all:
            return page  # type: ignore[no-any-return]
        offset += len(batch)
        if not batch or offset >= page["total"]:
            return {**page, "offset": 0, "limit": len(items), key: items}


def cmd_clients(api: Api, args: argparse.Namespace) -> int:
    connected = True if args.connected else False if args.disconnected else None
    query: dict[str, object] = {"id": args.id}
    if connected is not None:
        query["connected"] = "true" if connected else "false"
    page = _pages(api, "clients", "clients", query, args)
    if args.json:
        _json_out(page)
        return EXIT_OK
    rows = [
        (c["client_id"], c["connected"], c["protocol"], c["address"], c["queued"],
         c["inflight"], c["sent"], c["dropped"],
         _when(c["connected_at"] if c["connected"] else c["disconnected_at"]))
        for c in page["clients"]
    ]
    print(table(("CLIENT ID", "CONN", "PROTO", "ADDRESS", "QUEUED", "INFLIGHT", "SENT",
                 "DROPPED", "SINCE"), rows, right=(4, 5, 6, 7)))
    _more(len(rows), page["total"], "clients")
    return EXIT_OK


def cmd_client(api: Api, args: argparse.Namespace) -> int:
    detail = api.get("clients/" + _quoted(args.client_id))
    if args.json:
        _json_out(detail)
        return EXIT_OK
    subscriptions = detail.get("subscriptions", [])
    shown = [(key, value) for key, value in detail.items() if key != "subscriptions"]
    print(_fields([*shown, ("subscriptions", len(subscriptions) or "none")]))
    if not subscriptions:
        return EXIT_OK
    rows = [(s["filter"], s["qos"]) for s in subscriptions]
    print("\n".join("  " + line for line in table(("FILTER", "QOS"), rows, right=(1,))
                    .splitlines()))
    return EXIT_OK


def cmd_kick(api: Api, args: argparse.Namespace) -> int:
    reply = api.delete("clients/" + _quoted(args.client_id))
    if args.json:
        _json_out(reply)
    else:
        print(f"disconnected client {args.client_id!r}")
    return EXIT_OK


def cmd_session_rm(api: Api, args: argparse.Namespace) -> int:
    reply = api.delete("sessions/" + _quoted(args.client_id))
    if args.json:
        _json_out(reply)
    else:
        print(f"deleted the session of {args.client_id!r} (its subscriptions and queue)")
    return EXIT_OK


def cmd_subscriptions(api: Api, args: argparse.Namespace) -> int:
    query = {"client_id": args.client, "filter": args.filter, "match": args.match}
    page = _pages(api, "subscriptions", "subscriptions", query, args)
    if args.json:
        _json_out(page)
        return EXIT_OK
    rows = [(s["client_id"], s["filter"], s["qos"], s["share_group"], s["connected"])
            for s in page["subscriptions"]]
    print(table(("CLIENT ID", "FILTER", "QOS", "GROUP", "CONN"), rows, right=(2,)))
    _more(len(rows), page["total"], "subscriptions")
    return EXIT_OK


def cmd_retained_ls(api: Api, args: argparse.Namespace) -> int:
    page = _pages(api, "retained", "retained", {"filter": args.filter}, args)
    if args.json:
        _json_out(page)
        return EXIT_OK
    rows = [(m["topic"], m["qos"], m["payload_bytes"], payload_shown(m))
            for m in page["retained"]]
    print(table(("TOPIC", "QOS", "BYTES", "PAYLOAD"), rows, right=(1, 2)))
    _more(len(rows), page["total"], "retained messages")
    return EXIT_OK


def payload_shown(message: Mapping[str, Any]) -> str:
    """A retained message's payload for a table: its text, cut to about 40 characters, or
    ``<binary N bytes>``."""
    text = message.get("payload")
    if text is None:
        return f"<binary {message['payload_bytes']} bytes>"
    text = _printable(text)
    if len(text) > PAYLOAD_SHOWN_CHARS or message.get("truncated"):
        return text[: PAYLOAD_SHOWN_CHARS - 3] + "..."
    return text


def cmd_retained_rm(api: Api, args: argparse.Namespace) -> int:
    reply = api.delete("retained/" + _quoted(args.topic))
    if args.json:
        _json_out(reply)
    else:
        print(f"deleted the retained message of {args.topic!r}")
    return EXIT_OK


def cmd_bridges(api: Api, args: argparse.Namespace) -> int:
    document = api.get("bridges")
    if args.json:
        _json_out(document)
        return EXIT_OK
    rows = [(b["name"], b["state"], b["remote"], b["forwarded"], b["received"], b["queued"],
             b["dropped"], b["last_error"]) for b in document["bridges"]]
    print(table(("NAME", "STATE", "REMOTE", "FORWARDED", "RECEIVED", "QUEUED", "DROPPED",
                 "LAST ERROR"), rows, right=(3, 4, 5, 6)))
    return EXIT_OK


def cmd_stats(api: Api, args: argparse.Namespace) -> int:
    """The key counters; with --watch again every SECONDS (until --count refreshes, or
    Ctrl-C), with messages received and sent per second since the refresh before."""
    previous: tuple[float, dict[str, Any]] | None = None
    refreshes = 0
    try:
        while True:
            stats = api.get("stats")
            now = time.monotonic()
            if args.json:
                _json_out(stats, compact=args.watch is not None)
            else:
                if args.watch is not None:
                    if previous is not None:
                        print()
                    print(f"{time.strftime('%H:%M:%S')}  {api.target.url}")
                print(_stats_block(stats, _rates(previous, now, stats)), flush=True)
            previous = now, stats
            refreshes += 1
            if args.watch is None or (args.count is not None and refreshes >= args.count):
                return EXIT_OK
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK


def _rates(previous: tuple[float, dict[str, Any]] | None, now: float,
           stats: Mapping[str, Any]) -> dict[str, float]:
    if previous is None:
        return {}
    elapsed = max(now - previous[0], 1e-9)
    return {key: (stats[key] - previous[1][key]) / elapsed
            for key in RATED if key in stats and key in previous[1]}


def _stats_block(stats: Mapping[str, Any], rates: Mapping[str, float]) -> str:
    lines = []
    for key in STATS_SHOWN:
        if key in stats:
            rate = f"  ({rates[key]:.1f}/s)" if key in rates else ""
            lines.append((key, f"{stats[key]}{rate}"))
    return _fields(lines)


CLUSTER_COLUMNS = (  # (header, counter) of ``mqttd ctl cluster``
    ("CONN", "connections"), ("SESSIONS", "sessions"), ("MSGS IN", "messages_received"),
    ("MSGS OUT", "messages_sent"), ("QUEUED", "queued"), ("DROPPED", "dropped"),
    ("RETAINED", "retained"),
)


def cmd_cluster(api: Api, args: argparse.Namespace) -> int:
    """Every node of the cluster (as the heartbeats say) and the totals over those up."""
    document = api.get("cluster")
    if args.json:
        _json_out(document)
        return EXIT_OK
    print(cluster_table(document))
    return EXIT_OK


def cluster_table(document: Mapping[str, Any]) -> str:
    """The nodes, one a line (this node marked ``*``), then a TOTAL line over those up."""
    this = document["node"]
    rows: list[list[object]] = []
    for node in document["nodes"]:
        counters = node["counters"]
        rows.append([
            node["node"] + (" *" if node["node"] == this else ""),
            "up" if node["up"] else "down", node["state"],
            f"{node['heartbeat_age_s']:.1f}s",
            *(counters.get(key) for _, key in CLUSTER_COLUMNS),
        ])
    totals = document["totals"]
    rows.append([f"TOTAL ({document['nodes_up']} up)", "", "", "",
                 *(totals.get(key) for _, key in CLUSTER_COLUMNS)])
    headers = ("NODE", "UP", "STATE", "HEARTBEAT", *(header for header, _ in CLUSTER_COLUMNS))
    numbers = range(3, len(headers))
    return (table(headers, rows, right=numbers) + "\n"
            f"(* the node answering: {this}; totals over the nodes up, from their last "
            "heartbeats; RETAINED total: the largest, each node holds the cluster's set)")


def cmd_health(api: Api, args: argparse.Namespace) -> int:
    _, healthz = api.call("GET", "/healthz")
    status, readyz = api.call("GET", "/readyz", ok=(200, 503))
    if args.json:
        _json_out({"healthz": healthz, "readyz": readyz})
    else:
        ready = readyz.get("status", "?")
        problems = "; ".join(readyz.get("problems", []))
        print(_fields([("healthz", healthz.get("status", "?")),
                       ("readyz", f"{ready}: {problems}" if problems else ready)]))
    return EXIT_OK if status == 200 else EXIT_API


# -- the command line -----------------------------------------------------------------------


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
        return value

    return parse


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options of every command, before or after its name (after it, a default does
    not replace what was given before it)."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=default(None), help=(
        "the operations listener (default: the http: section of -c, else MQTTD_URL, else "
        f"{DEFAULT_URL})"))
    parser.add_argument("--token", default=default(None), help=(
        "credential for changes (default: MQTTD_TOKEN, http.token of -c, else the "
        f"{TOKEN_FILE} file in the data directory)"))
    parser.add_argument("-c", "--config", metavar="FILE", default=default(None),
                        help="the broker's configuration: where its listener and token are")
    parser.add_argument("--data-dir", metavar="DIR", default=default(None), help=(
        f"the broker's data directory, where it keeps {TOKEN_FILE} (default: the one of -c, "
        f"else {DEFAULT_DATA_DIR})"))
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON instead of tables")
    parser.add_argument("--timeout", metavar="S", type=_positive(float), default=default(5.0),
                        help="seconds to wait for an answer (default: 5)")


def _paging(parser: argparse.ArgumentParser, noun: str) -> None:
    parser.add_argument("--limit", metavar="N", type=_positive(int),
                        help=f"at most N {noun} (default {PAGE}; with --all, per request)")
    parser.add_argument("--all", action="store_true", help=f"every {noun[:-1]}, page by page")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Look at and manage a running mqttd over its operations API.",
        epilog="Exit status: 0 done, 1 the API refused (its message on stderr), 2 a usage "
        "error, 3 the broker cannot be reached.",
    )
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)

    def command(name: str, run: Callable[[Api, argparse.Namespace], int], text: str,
                under: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = under.add_parser(
            name, parents=[common], help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    sub = command("clients", cmd_clients, "list clients (connected, and away with a session)")
    sub.add_argument("--id", metavar="PATTERN", help="client ids matching PATTERN (*, ?, [..])")
    state = sub.add_mutually_exclusive_group()
    state.add_argument("--connected", action="store_true", help="only connected clients")
    state.add_argument("--disconnected", action="store_true",
                       help="only clients away (persistent sessions)")
    _paging(sub, "clients")
    command("client", cmd_client, "one client, with its subscriptions").add_argument(
        "client_id", metavar="ID")
    command("kick", cmd_kick, "disconnect a client (a persistent session stays)").add_argument(
        "client_id", metavar="ID")
    session = command("session", _no_subcommand, "sessions: session rm ID")
    command("rm", cmd_session_rm, "delete a session, its subscriptions and queue",
            session.add_subparsers(dest="action", required=True, metavar="ACTION")
            ).add_argument("client_id", metavar="ID")
    sub = command("subscriptions", cmd_subscriptions, "list subscriptions")
    sub.add_argument("--client", metavar="PATTERN", help="of the clients matching PATTERN")
    sub.add_argument("--filter", metavar="F", help="with exactly the filter F")
    sub.add_argument("--match", metavar="TOPIC", help="whose filter matches TOPIC")
    _paging(sub, "subscriptions")
    retained = command("retained", _no_subcommand, "retained messages: retained ls|rm")
    actions = retained.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = command("ls", cmd_retained_ls, "list retained messages", actions)
    sub.add_argument("filter", nargs="?", default="#", metavar="FILTER",
                     help="a topic filter (default: #)")
    _paging(sub, "messages")
    command("rm", cmd_retained_rm, "delete the retained message of a topic (nothing is "
            "published)", actions).add_argument("topic", metavar="TOPIC")
    command("bridges", cmd_bridges, "list bridges and their state")
    sub = command("stats", cmd_stats, "the broker's key counters")
    sub.add_argument("--watch", metavar="SECONDS", nargs="?", const=2.0, type=_positive(float),
                     help="print again every SECONDS (default 2), with rates per second")
    sub.add_argument("--count", metavar="N", type=_positive(int),
                     help="with --watch: stop after N refreshes")
    command("health", cmd_health, "liveness (/healthz) and readiness (/readyz)")
    command("cluster", cmd_cluster, "cluster mode: every node (up or down, its counters) "
            "and the totals")
    return parser


def _no_subcommand(api: Api, args: argparse.Namespace) -> int:
    raise AssertionError("argparse requires the subcommand")  # pragma: no cover


def main(argv: list[str]) -> int:
    """``mqttd ctl ...``: the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "count", None) is not None and args.watch is None:
            parser.error("--count needs --watch")
    except SystemExit as exc:  # --help (0), or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    url = "the broker"
    try:
        target = resolve(args, os.environ)
        url = target.url
        return int(args.run(Api(target), args))
    except CtlError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.status
    except (KeyError, TypeError, AttributeError) as exc:  # JSON, but not the API's shape
        print(f"{PROG}: unexpected answer from {url} ({exc!r}): is it "
              "mqttd's operations listener, of this version?", file=sys.stderr)
        return EXIT_API
    except BrokenPipeError:  # the reader went away (``mqttd ctl clients --all | head``)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
