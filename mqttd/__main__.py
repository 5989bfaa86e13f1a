"""Command line: ``mqttd [serve] [-c FILE] [--host H] [-p PORT] [--data-dir DIR]
[--http-port PORT] [--cluster URL[,URL...]] [--node-name NAME]`` (serve is the default
command), ``mqttd check FILE`` (also ``mqttd --check-config FILE``), ``mqttd passwd ...``
(:func:`mqttd.auth.passwd_main`), ``mqttd ctl ...`` (:mod:`mqttd.ctl`), or
``python -m mqttd ...``.

Serving logs a banner once the listeners are bound, tells systemd (``$NOTIFY_SOCKET``) when
it is ready, reloading and stopping, and pings its watchdog. SIGHUP reloads the password
file, the ACL file and TLS certificates; SIGINT and SIGTERM stop in order."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

import trio

from mqttd import build_info
from mqttd.broker import Broker
from mqttd.config import Config, ConfigError, load_config
from mqttd.engine.systopics import version
from mqttd.logs import configure_logging
from mqttd.security.hooks import SecurityFileError
from mqttd.server import banner
from mqttd.server.sdnotify import Notifier
from persistence.store import StoreError

log = logging.getLogger("mqttd")

COMMANDS = ("serve", "check", "passwd", "ctl")
USAGE = """\
mqttd [serve] [-c FILE] [--host H] [-p PORT] [--data-dir DIR] [--http-port PORT]
             [--cluster URL[,URL...]] [--node-name NAME]
       mqttd check FILE
       mqttd passwd [-c] [-b] [-D] FILE USER [PASSWORD]
       mqttd ctl ...
       mqttd --version"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqttd", usage=USAGE,
        description="An MQTT broker (MQTT 3.1.1, 3.1 and 5.0) for IoT fleets, on trio.",
        epilog="With no command, mqttd serves: `mqttd -c FILE` is `mqttd serve -c FILE`. "
        "`mqttd COMMAND --help` describes a command.",
    )
    parser.add_argument(
        "--version", action="version", version=f"mqttd {version()} ({build_info.describe()})"
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", prog="mqttd serve", help="run the broker (the default command)",
        description="Run the broker until SIGINT or SIGTERM; SIGHUP reloads the password "
        "file, the ACL file and TLS certificates.",
    )
    _serve_options(serve)
    check = commands.add_parser(
        "check", prog="mqttd check", help="check a configuration file and exit",
        description="Check a configuration file: exit 0 if it is valid, 1 with every "
        "problem named by its key path otherwise.",
    )
    check.add_argument("file", metavar="FILE", help="the YAML file")
    # their own argument handling (main() hands them the rest of the command line)
    commands.add_parser(
        "passwd", add_help=False,
        help="add, change or delete users in a password file",
    )
    commands.add_parser(
        "ctl", add_help=False, help="operate a running broker through its HTTP API"
    )
    return parser


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="YAML configuration file (default: built in)"
    )
    parser.add_argument("--host", help="listen on this address instead of the configured ones")
    parser.add_argument(
        "-p", "--port", type=int, help="listen on this port instead of the configured ones"
    )
    parser.add_argument("--data-dir", metavar="DIR", help="directory for the broker's data")
    parser.add_argument(
        "--http-port", type=int, metavar="PORT",
        help="serve the operations listener (dashboard, metrics, health) on this port "
        "(0: a free one); with --host or -p it is off unless this is given",
    )
    parser.add_argument(
        "--cluster", metavar="URL[,URL...]",
        help="cluster mode (preview) on these NATS servers (nats://host:port, comma "
        "separated): turns cluster.enabled on and replaces cluster.nats_servers",
    )
    parser.add_argument(
        "--node-name", metavar="NAME",
        help="this node's name in the cluster (default: cluster.node_name, else the host name)",
    )
    parser.add_argument(
        "--check-config", metavar="FILE", help="the same as `mqttd check FILE`"
    )


GC_YOUNG_THRESHOLD = 10_000


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["passwd"]:
        from mqttd.auth import passwd_main

        return passwd_main(argv[1:])
    if argv[:1] == ["ctl"]:
        from mqttd.ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "serve")  # serve is the default command
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.file)
    if args.check_config is not None:
        return check(args.check_config)
    return serve(args)


def check(path: str) -> int:
    """``mqttd check FILE`` and ``mqttd --check-config FILE``: 0 if the file is a valid
    configuration, 1 with every problem on stderr (:mod:`mqttd.config_check`)."""
    from mqttd.config_check import main as check_main

    return check_main(path)


def serve(args: argparse.Namespace) -> int:
    """``mqttd serve``: 0 after an ordered stop, 1 if the broker cannot start."""
    try:
        config = load_config(args.config).with_overrides(
            host=args.host, port=args.port, data_dir=args.data_dir, http_port=args.http_port,
            cluster=args.cluster, node_name=args.node_name,
        )
        configure_logging(config.logging)  # a log file that cannot be opened: ConfigError
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    # the cyclic GC (collecting is not needed for correctness: reference counting frees
    # nearly everything): young collections every GC_YOUNG_THRESHOLD allocations, not 700,
    # and what exists once the broker serves (modules, configuration, restored sessions) is
    # frozen out of the full collections (run below). With the defaults, 10,000 clients
    # connecting spent 2.2 s of their 2.8 CPU s collecting, 78% of it in full collections
    # re-scanning the ~150,000 objects of the start-up.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        trio.run(run, config, args.config)
    except (OSError, StoreError, BaseExceptionGroup) as exc:
        error = _startup_error(exc)
        if error is None:
            raise
        log.error("cannot start: %s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _startup_error(exc: BaseException) -> Exception | None:
    """An error that stops the broker from starting, with a message for the user (address
    in use, a database from a newer mqttd), even inside a nursery's exception group."""
    if isinstance(exc, OSError | StoreError | SecurityFileError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _startup_error(inner)) is not None:
                return found
    return None


async def run(config: Config, source: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down in order; SIGHUP reloads. ``source``
    (the configuration file, None: built in) is named in the banner."""
    broker = Broker(config)
    notifier = Notifier.from_environ()
    stop = (signal.SIGINT, signal.SIGTERM)
    try:
        with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
            async with trio.open_nursery() as watchdog:
                watchdog.start_soon(notifier.watchdog)  # from the start: restoring may be long
                async with trio.open_nursery() as nursery:
                    await nursery.start(broker.serve)
                    gc.collect()
                    gc.freeze()  # (see serve)
                    _announce(broker, source)
                    notifier.ready(_status(broker))
                    async for signum in signals:
                        log.info("received %s", signal.Signals(signum).name)
                        if signum == signal.SIGHUP:
                            notifier.reloading()
                            reloaded = broker.reload()  # keeps the previous files if broken
                            suffix = "" if reloaded else "; reload failed, previous files kept"
                            notifier.ready(_status(broker) + suffix)
                            continue
                        notifier.stopping()
                        broker.shutdown()
                        break
                watchdog.cancel_scope.cancel()
    finally:
        notifier.close()


def _announce(broker: Broker, source: str | None) -> None:
    """The start-up banner (after binding: the real ports) and its warnings."""
    listeners = broker.server.listeners if broker.server is not None else []
    log.info(
        "%s", banner.banner(broker.config, source, listeners, broker.http_addresses, version())
    )
    log.info("build: %s", build_info.describe())
    for warning in banner.warnings(broker.config, listeners):
        log.warning("%s", warning)


def _status(broker: Broker) -> str:
    """systemd's one-line STATUS= while serving."""
    addresses = ", ".join(
        f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in broker.addresses
    )
    return f"serving MQTT on {addresses}"


if __name__ == "__main__":
    sys.exit(main())
