"""Device simulators: ``python -m devices {fleet,consume,worker,command,claim-check,
constrained} ...`` (also installed as ``mqttd-devices``)."""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from devices import claimcheck, constrained
from devices.consumer import Consumer, send_command
from devices.fleet import Fleet, FleetConfig, Topics
from devices.worker import Worker


def _say(line: str) -> None:
    print(line, flush=True)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    group.add_argument("-p", "--port", type=int, default=1883, help="default: %(default)s")
    group.add_argument("-u", "--username")
    group.add_argument("-P", "--password")


def _topic_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("topic templates ({id} is the device id)")
    defaults = Topics()
    for name in ("telemetry", "status", "command", "reply"):
        group.add_argument(f"--{name}-topic", default=getattr(defaults, name),
                           metavar="TEMPLATE", help="default: %(default)s")


def _topics(args: argparse.Namespace) -> Topics:
    return Topics(args.telemetry_topic, args.status_topic, args.command_topic, args.reply_topic)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


async def _until_signalled(on_first: Callable[[], None], scope: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: stop gracefully; the second: cancel."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = False
        async for _ in signals:
            if stopping:
                scope.cancel()
                return
            stopping = True
            _say("stopping (again to abort)")
            on_first()


def run_fleet_command(args: argparse.Namespace) -> int:
    config = FleetConfig(
        devices=args.devices, prefix=args.prefix, first=args.first, interval_s=args.interval,
        qos=args.qos, persistent=args.persistent, count=args.count, duration_s=args.duration,
        keepalive_s=args.keepalive, max_inflight=args.inflight, username=args.username,
        password=args.password, topics=_topics(args), connect_rate=args.connect_rate,
        backoff_max_s=args.backoff_max, report_interval_s=args.report_interval, seed=args.seed,
    )
    fleet = Fleet(args.host, args.port, config, report=_say)
    last = config.device_id(config.first + config.devices - 1)
    _say(f"fleet {fleet.run_id}: {config.devices} devices {config.device_id(config.first)}.."
         f"{last} -> {args.host}:{args.port}, one message every {config.interval_s:g}s each, "
         f"QoS {config.qos}, {'persistent' if config.persistent else 'clean'} sessions, "
         f"telemetry on {config.topics.telemetry}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signalled, fleet.stop, nursery.cancel_scope)
            await fleet.run()
            nursery.cancel_scope.cancel()

    trio.run(main)
    _say(fleet.stats.summary())
    stats = fleet.stats
    return 0 if config.qos == 0 or stats.acked == stats.published else 1


def run_consume_command(args: argparse.Namespace) -> int:
    consumer = Consumer(
        args.host, args.port, client_id=args.client_id, filter=args.filter, group=args.group,
        qos=args.qos, persistent=args.persistent, username=args.username,
        password=args.password, count=args.count, duration_s=args.duration, report=_say,
        report_interval_s=args.report_interval, show=args.show,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def consume(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await consumer.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_until_signalled, consumer.stop, nursery.cancel_scope)
            await nursery.start(consume)
            _say(f"{consumer.client_id}: subscribed to {consumer.subscription} "
                 f"(QoS {consumer.qos}, {'persistent' if args.persistent else 'clean'} session)")

    trio.run(main)
    _say(consumer.summary())
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    worker = Worker(
        args.host, args.port, client_id=args.client_id, filter=args.filter, group=args.group,
        qos=args.qos, fail_rate=args.fail_rate, fail_code=args.fail_code,
        persistent=args.persistent, username=args.username, password=args.password,
        count=args.count, duration_s=args.duration, seed=args.seed, report=_say,
        report_interval_s=args.report_interval,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def work(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await worker.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_until_signalled, worker.stop, nursery.cancel_scope)
            await nursery.start(work)
            _say(f"{worker.client_id}: working on {worker.subscription} (MQTT 5.0, QoS "
                 f"{worker.qos}), failing {worker.fail_rate:.0%} of the jobs with reason code "
                 f"{worker.fail_code:#04x}")

    trio.run(main)
    _say(worker.summary())
    return 0


def _worker_parser(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="a consumer-group worker (MQTT 5.0) that fails some jobs on purpose",
        description="Subscribe to $share/GROUP/FILTER and process each message as a job; "
        "reject a fraction of them (PUBACK reason code 0x80), which mqttd retries on another "
        "worker after a backoff and dead-letters after work_queues.max_deliveries.",
    )
    _connection_options(worker)
    worker.add_argument("--client-id", default="worker-1", help="default: %(default)s")
    worker.add_argument("-g", "--group", default="jobs", help="default: %(default)s")
    worker.add_argument("-t", "--filter", default="jobs/#", help="default: %(default)s")
    worker.add_argument("-q", "--qos", type=int, choices=(1, 2), default=1)
    worker.add_argument("--fail-rate", type=float, default=0.1,
                        help="fraction of the jobs rejected (default: %(default)s)")
    worker.add_argument("--fail-code", type=lambda text: int(text, 0), default=0x80,
                        help="reason code of a rejection, 0x80 or more (default: 0x80)")
    worker.add_argument("--persistent", action="store_true",
                        help="a session the broker keeps (an hour) while the worker is away")
    worker.add_argument("-c", "--count", type=_positive(int), help="stop after N jobs processed")
    worker.add_argument("-d", "--duration", type=_positive(float), help="seconds, then stop")
    worker.add_argument("--seed", type=int, help="random seed for which jobs fail")
    worker.add_argument("--report-interval", type=_positive(float), default=2.0)
    worker.set_defaults(handler=run_worker_command)


def run_command_command(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        return await send_command(
            args.host, args.port, args.device, args.json, topics=_topics(args),
            timeout_s=args.timeout, username=args.username, password=args.password,
        )

    try:
        reply = trio.run(main)
    except trio.TooSlowError:
        print(f"no reply from {args.device} within {args.timeout:g}s", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _say(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def run_claim_check_command(args: argparse.Namespace) -> int:
    try:
        if args.action == "send":
            check = trio.run(lambda: claimcheck.send(
                args.host, args.port, args.device, pathlib.Path(args.file),
                pathlib.Path(args.store), args.base_url, args.topic, args.timeout,
            ))
            _say(f"{args.file}: stored as {check.url}; claim check published on "
                 f"{args.topic.format(id=args.device)} ({check.size} bytes, sha256 "
                 f"{check.sha256[:16]}...)")
            return 0
        _, rejected = trio.run(lambda: claimcheck.fetch(
            args.host, args.port, pathlib.Path(args.out), args.client_id, args.filter,
            args.count, _say,
        ))
    except (OSError, trio.TooSlowError) as exc:
        print(f"error: {exc or 'timed out'}", file=sys.stderr)
        return 2
    return 0 if rejected == 0 else 1


def _claim_check_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "claim-check", help="large payloads: publish a reference, fetch and verify the file",
        description="The claim-check pattern: the file goes to a blob store, the message "
        "carries its URL, SHA-256 and size; the consumer fetches and verifies it.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    send = actions.add_parser("send", help="store FILE and publish its claim check")
    _connection_options(send)
    send.add_argument("file", help="the file to send")
    send.add_argument("--device", default="sensor-0001", help="client id (default: %(default)s)")
    send.add_argument("--store", default="data/blobs",
                      help="the blob store directory (default: %(default)s)")
    send.add_argument("--base-url", help="the store's URL when it is served over HTTP "
                      "(default: file:// URLs)")
    send.add_argument("--topic", default=claimcheck.DEFAULT_TOPIC,
                      help="default: %(default)s ({id} is the device)")
    send.add_argument("--timeout", type=_positive(float), default=10.0)
    fetch = actions.add_parser("fetch", help="fetch and verify the files of claim checks")
    _connection_options(fetch)
    fetch.add_argument("--out", default="data/received", help="default: %(default)s")
    fetch.add_argument("--client-id", default="claim-check-fetcher")
    fetch.add_argument("-t", "--filter", default=claimcheck.DEFAULT_FILTER,
                       help="default: %(default)s")
    fetch.add_argument("-c", "--count", type=_positive(int), help="stop after N claim checks")
    parser.set_defaults(handler=run_claim_check_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devices", description="MQTT device simulators for mqttd.",
        epilog="Run 'python -m devices COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fleet = sub.add_parser("fleet", help="a fleet of sensors publishing JSON telemetry",
                           description="N sensors, each its own MQTT client, publishing JSON "
                           "telemetry, answering commands, reconnecting with backoff.")
    _connection_options(fleet)
    _fleet_options(fleet)
    _topic_options(fleet)
    fleet.set_defaults(handler=run_fleet_command)

    consume = sub.add_parser("consume", help="a backend worker consuming telemetry",
                             description="Subscribe to the fleet's telemetry (QoS 1), print "
                             "rates, per-device counts and last values.")
    _connection_options(consume)
    _consume_options(consume)
    consume.set_defaults(handler=run_consume_command)

    _worker_parser(sub)

    command = sub.add_parser("command", help="send a command to a device, print its reply",
                             description="Publish a JSON command on the device's command "
                             "topic and wait for its reply: ping, set_interval, reboot.",
                             epilog='example: python -m devices command sensor-0001 '
                             '\'{"cmd": "set_interval", "seconds": 2}\'')
    _connection_options(command)
    _command_options(command)
    _topic_options(command)
    command.set_defaults(handler=run_command_command)

    _claim_check_parser(sub)
    sub.add_parser("constrained", add_help=False,
                   help="a constrained device: window of one, slow acks "
                   "(python -m devices constrained --help)")
    return parser


def _fleet_options(fleet: argparse.ArgumentParser) -> None:
    """The fleet's size, pace, QoS and session, and when it stops."""
    fleet.add_argument("-n", "--devices", type=_positive(int), default=10,
                       help="number of devices (default: %(default)s)")
    fleet.add_argument("--prefix", default="sensor-", help="client id prefix (default: "
                       "%(default)s, ids like sensor-0001)")
    fleet.add_argument("--first", type=int, default=1, help="number of the first device")
    fleet.add_argument("-i", "--interval", type=_positive(float), default=1.0,
                       help="seconds between two messages of one device (default: %(default)s)")
    fleet.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=1)
    fleet.add_argument("--persistent", action="store_true",
                       help="clean session 0: the broker keeps each device's session")
    fleet.add_argument("-c", "--count", type=_positive(int),
                       help="messages per device, then stop")
    fleet.add_argument("-d", "--duration", type=_positive(float), help="seconds, then stop")
    fleet.add_argument("--keepalive", type=int, default=60, help="seconds (default: 60)")
    fleet.add_argument("--inflight", type=_positive(int), default=10,
                       help="unacknowledged QoS 1/2 messages per device (default: 10)")
    fleet.add_argument("--connect-rate", type=_positive(float), default=500.0,
                       help="connections per second while starting (default: 500)")
    fleet.add_argument("--backoff-max", type=_positive(float), default=10.0,
                       help="longest wait between reconnects, seconds (default: 10)")
    fleet.add_argument("--report-interval", type=_positive(float), default=2.0,
                       help="seconds between progress lines (default: 2)")
    fleet.add_argument("--seed", type=int, help="random seed for the simulated values")


def _consume_options(consume: argparse.ArgumentParser) -> None:
    """What the worker subscribes to (alone or in a consumer group), and when it stops."""
    consume.add_argument("--client-id", default="backend-1", help="default: %(default)s")
    consume.add_argument("-t", "--filter", default="site/+/telemetry",
                         help="topic filter (default: %(default)s)")
    consume.add_argument("-g", "--group", default="workers",
                         help="consumer group: subscribe to $share/GROUP/FILTER, so the "
                         "workers of a group share the messages (default: %(default)s)")
    consume.add_argument("--no-group", dest="group", action="store_const", const=None,
                         help="subscribe to FILTER itself: every worker gets every message")
    consume.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=1)
    consume.add_argument("--persistent", action="store_true",
                         help="clean session 0: messages queue while the worker is away")
    consume.add_argument("-c", "--count", type=_positive(int), help="stop after N messages")
    consume.add_argument("-d", "--duration", type=_positive(float), help="seconds, then stop")
    consume.add_argument("--show", type=int, default=3,
                         help="devices listed in each report (default: 3)")
    consume.add_argument("--report-interval", type=_positive(float), default=2.0)


def _command_options(command: argparse.ArgumentParser) -> None:
    """The device, the command and how long to wait for its reply."""
    command.add_argument("device", help="device id, e.g. sensor-0001")
    command.add_argument("json", nargs="?", default='{"cmd": "ping"}',
                         help='the command (default: {"cmd": "ping"})')
    command.add_argument("--timeout", type=_positive(float), default=10.0,
                         help="seconds to wait for the reply (default: 10)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "constrained":
        return constrained.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
