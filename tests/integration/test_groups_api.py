"""Consumer groups in the operator API (GET /api/v1/groups) and in the Prometheus metrics
(mqttd_group_*, mqttd_delayed_*), over real HTTP, after real traffic."""

from __future__ import annotations

import json

import attrs
import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, PubAck, Publish
from mqttd.config import Http, WorkQueues
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.integration.test_http_ops import get, parse_metrics
from tests.rawclient import RawClient

TIMEOUT_S = 30.0


async def test_groups_show_members_jobs_and_counters() -> None:
    config = attrs.evolve(
        make_config(), http=Http(port=0),
        work_queues=WorkQueues(retry_delay_initial_s=600.0, max_deliveries=2),
    )
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            worker, _ = await RawClient.connected(broker.port, "w5", protocol_level=PROTOCOL_5)
            await worker.subscribe("$share/billing/jobs/#", qos=1)
            other, _ = await RawClient.connected(broker.port, "w311")
            await other.subscribe("$share/reports/jobs/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "producer")
            await pub.publish("jobs/1", b"one", qos=1)
            await pub.publish("jobs/2", b"two", qos=1)
            await pub.publish("$delayed/600/jobs/3", b"later", qos=1)
            first = await worker.take(Publish)
            second = await worker.take(Publish)
            await worker.send(PubAck(first.packet_id, 0x80))  # rejected: waits 600 s
            # the 3.1.1 member of "reports" holds both, unacknowledged
            await other.take(Publish)
            await other.take(Publish)
            await wait_until(lambda: broker.stats()["jobs_waiting_retry"] == 1)

            status, _, body = await get(broker, "/api/v1/groups")
            assert status == 200
            page = json.loads(body)
            assert page["total"] == 2 and page["delayed"]["delayed_held"] == 1
            billing, reports = page["groups"]
            assert (billing["name"], billing["group"], billing["filter"]) == (
                "$share/billing/jobs/#", "billing", "jobs/#")
            assert (billing["members"], billing["connected_members"], billing["in_progress"],
                    billing["queued"], billing["waiting_retry"], billing["rejected"],
                    billing["dead_lettered"]) == (1, 1, 1, 1, 1, 1, 0)
            assert (reports["group"], reports["in_progress"], reports["queued"]) == (
                "reports", 2, 0)
            status, _, body = await get(broker, "/api/v1/groups?group=rep*")
            assert [g["group"] for g in json.loads(body)["groups"]] == ["reports"]

            await worker.send(PubAck(second.packet_id))
            await wait_until(lambda: broker.stats()["jobs_acked"] == 1)
            status, _, text = await get(broker, "/metrics")
            types, values = parse_metrics(text)
            labels = '{group="billing",filter="jobs/#"}'
            assert types["mqttd_group_rejected_total"] == "counter"
            assert values["mqttd_group_rejected_total" + labels] == 1
            assert values["mqttd_group_acked_total" + labels] == 1
            assert values["mqttd_group_queued_jobs" + labels] == 1
            assert values['mqttd_group_in_progress_jobs{group="reports",filter="jobs/#"}'] == 2
            assert values["mqttd_delayed_messages"] == 1
