"""Command line: ``mqttd [-c FILE] [--host H] [-p PORT] [--data-dir DIR]``,
``mqttd --check-config FILE``, ``mqttd passwd [-c] [-b] [-D] FILE USER [PASSWORD]``, or
``python -m mqttd``. SIGHUP reloads the password file, the ACL file and TLS certificates."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from mqttd.broker import Broker
from mqttd.config import Config, ConfigError, load_config
from mqttd.engine.systopics import version
from mqttd.security.hooks import SecurityFileError
from persistence.store import StoreError

log = logging.getLogger("mqttd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqttd",
        description="An MQTT broker (MQTT 3.1.1, 3.1 and 5.0) for IoT fleets, on trio.",
    )
    parser.add_argument("--version", action="version", version=f"mqttd {version()}")
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
        help="serve the operations listener (metrics, health) on this port (0: a free one); "
        "with --host or -p it is off unless this is given",
    )
    parser.add_argument(
        "--check-config", metavar="FILE", help="check a configuration file and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["passwd"]:
        from mqttd.auth import passwd_main

        return passwd_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.check_config is not None:
        from mqttd.config_check import main as check_main

        return check_main(args.check_config)
    try:
        config = load_config(args.config).with_overrides(
            host=args.host, port=args.port, data_dir=args.data_dir, http_port=args.http_port
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(run, config)
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


async def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down in order; SIGHUP reloads."""
    broker = Broker(config)
    stop = (signal.SIGINT, signal.SIGTERM)
    with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    broker.reload()  # keeps the previous files if a new one is broken
                    continue
                broker.shutdown()
                break


if __name__ == "__main__":
    sys.exit(main())
