"""The headers a message carries between nodes (mqttd.clustering.wire)."""

from __future__ import annotations

import pytest

from mqttd.cluster.nats_protocol import decode_headers
from mqttd.clustering import wire
from mqttd.codec.packets import ExpiringPublish, Publish


def round_trip(message: Publish, **options: object) -> wire.Received:
    block = wire.header_block("n1 1700000000000 ", 42, message, **options)  # type: ignore[arg-type]
    headers, status, _ = decode_headers(block)
    assert status is None
    return wire.decode(message.topic, message.payload, headers)


def test_plain_message() -> None:
    message = Publish("a/b", b"x", 1, False)
    block = wire.header_block("n1 7 ", 3, message)
    assert block == b"NATS/1.0\r\nMqttd-Msg: n1 7 3 10\r\n\r\n"
    received = round_trip(message)
    assert received == wire.Received("n1", 1700000000000, 42, message, False)


@pytest.mark.parametrize(("qos", "retain"), [(0, False), (1, True), (2, False), (2, True)])
def test_qos_and_retain(qos: int, retain: bool) -> None:
    message = round_trip(Publish("t", b"", qos, retain)).message
    assert (message.qos, message.retain) == (qos, retain)


def test_5_0_properties_and_expiry_are_kept() -> None:
    props = {
        "payload_format_indicator": 1, "content_type": "text/plain",
        "response_topic": "r/1", "correlation_data": b"\x00\x01",
        "user_property": [("k", "v"), ("k", "w")],
    }
    message = ExpiringPublish("t", b"hi", 1, True, False, 0, props, expires_at=1.5e9 + 0.25)
    received = round_trip(message).message
    assert received.properties == props
    assert received.expires_at == 1.5e9 + 0.25
    assert (received.topic, received.payload, received.qos, received.retain) == (
        "t", b"hi", 1, True)


def test_retained_stream_headers() -> None:
    message = Publish("t", b"", 0, True)
    block = wire.header_block("n1 7 ", 3, message, msg_id="n1.7.3", delete=True)
    headers, _, _ = decode_headers(block)
    assert headers["Nats-Msg-Id"] == ["n1.7.3"]
    assert wire.decode("t", b"", headers).deleted


@pytest.mark.parametrize(
    "headers",
    [
        None, {}, {"Other": ["x"]}, {"Mqttd-Msg": ["n1 1 2"]}, {"Mqttd-Msg": ["n1 1 2 3"]},
        {"Mqttd-Msg": ["n1 1 2 31"]}, {"Mqttd-Msg": ["n1 x 2 10"]},
        {"Mqttd-Msg": ["n1 1 2 10"], "Mqttd-Props": ["***"]},
        {"Mqttd-Msg": ["n1 1 2 10"], "Mqttd-Expires": ["soon"]},
    ],
)
def test_foreign_or_bad_headers_are_refused(headers: dict[str, list[str]] | None) -> None:
    with pytest.raises(ValueError):
        wire.decode("t", b"", headers)


def test_hpub_frame_is_the_clients_encoding() -> None:
    from mqttd.cluster.nats_protocol import pub

    message = Publish("a/b", b"payload", 1, True)
    block = wire.header_block("n1 7 ", 3, message)
    assert wire.hpub("mqttd.t.a.b", block, b"payload") == pub(
        "mqttd.t.a.b", b"payload", None, block)
    assert wire.hpub("mqttd.t.caf\u00e9", block, b"") == pub("mqttd.t.caf\u00e9", b"", None, block)
