"""MQTT 5.0 enhanced authentication over a real socket: the AUTH exchange with a hook, and
the answers without one."""

from __future__ import annotations

from typing import Any

import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, Auth, ConnAck, Connect, Disconnect, Publish
from tests.conftest import make_config
from tests.rawclient import RawClient

METHOD = "TEST-CHALLENGE"


class ChallengeResponse:
    """Two steps: the client says hello, gets a challenge, answers it."""

    methods = (METHOD,)

    def __init__(self) -> None:
        self.steps: list[tuple[str, bytes | None, Any]] = []

    def step(self, client_id: str, method: str, data: bytes | None, state: Any
             ) -> tuple[int, bytes | None, Any]:
        self.steps.append((client_id, data, state))
        if state is None:
            if data != b"hello":
                return 0x87, None, None
            return 0x18, b"challenge", "challenged"
        if data == b"challenge-answer":
            return 0x00, b"welcome", "done"
        return 0x87, None, None


async def open5(port: int) -> RawClient:
    client = await RawClient.open(port)
    client.protocol_level = client.decoder.protocol_level = PROTOCOL_5
    return client


def auth_connect(client_id: str, data: bytes) -> Connect:
    return Connect(client_id, protocol_level=PROTOCOL_5, properties={
        "authentication_method": METHOD, "authentication_data": data,
    })


async def test_challenge_response_exchange_then_reauthentication():
    hook = ChallengeResponse()
    with trio.fail_after(10):
        async with running(make_config(), enhanced_authenticator=hook) as broker:
            client = await open5(broker.port)
            await client.send(auth_connect("dev-1", b"hello"))
            challenge = await client.expect(Auth)
            assert challenge.reason_code == 0x18
            assert challenge.properties == {
                "authentication_method": METHOD, "authentication_data": b"challenge",
            }
            # a packet sent early waits until the exchange is over
            await client.send(Auth(0x18, {"authentication_method": METHOD,
                                          "authentication_data": b"challenge-answer"}))
            connack = await client.expect(ConnAck)
            assert connack.return_code == 0
            assert connack.properties["authentication_method"] == METHOD
            assert connack.properties["authentication_data"] == b"welcome"
            assert [s[2] for s in hook.steps] == [None, "challenged"]
            await client.subscribe("t", qos=1)
            await client.publish("t", b"in", qos=0)
            assert (await client.expect(Publish)).payload == b"in"
            # re-authentication on the live connection
            await client.send(Auth(0x19, {"authentication_method": METHOD,
                                          "authentication_data": b"hello"}))
            again = await client.expect(Auth)
            assert again.reason_code == 0x18
            await client.send(Auth(0x18, {"authentication_method": METHOD,
                                          "authentication_data": b"challenge-answer"}))
            done = await client.expect(Auth)
            assert done.reason_code == 0x00


async def test_a_wrong_answer_is_refused_with_the_hooks_code():
    with trio.fail_after(10):
        async with running(make_config(), enhanced_authenticator=ChallengeResponse()) as broker:
            client = await open5(broker.port)
            await client.send(auth_connect("dev-2", b"hello"))
            await client.expect(Auth)
            await client.send(Auth(0x18, {"authentication_method": METHOD,
                                          "authentication_data": b"wrong"}))
            got = await client.expect_closed()
            assert len(got) == 1 and isinstance(got[0], ConnAck)
            assert got[0].return_code == 0x87
            assert "sessions" in broker.stats() and "dev-2" not in broker.sessions


async def test_without_a_hook_the_method_is_refused_and_auth_is_a_protocol_error(broker):
    with trio.fail_after(10):
        client = await open5(broker.port)
        await client.send(auth_connect("dev-3", b"hello"))
        got = await client.expect_closed()
        assert isinstance(got[0], ConnAck) and got[0].return_code == 0x8C
        client, _ = await RawClient.connected(broker.port, "dev-4", protocol_level=PROTOCOL_5)
        await client.send(Auth(0x19, {"authentication_method": METHOD}))
        got = await client.expect_closed()
        assert isinstance(got[0], Disconnect) and got[0].reason_code == 0x82
