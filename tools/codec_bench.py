"""Codec micro-benchmark: the hot path (PUBLISH decode, ``encode_publish_parts``).

    python -m tools.codec_bench [--repeat 7] [--number 200]

Prints the best per-packet time of several timeit runs for:

* decoding one 64 KiB-ish read holding a batch of 64-byte QoS 1 PUBLISHes at level 4;
* ``encode_publish_parts`` of a 64-byte QoS 1 PUBLISH (level 4);
* the same two at level 5 (with and without properties) when the codec supports it.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from mqttd import codec
from mqttd.codec.packets import Publish

BATCH = 1000


def _publish_bytes(level: int, properties: dict[str, object] | None) -> bytes:
    # topic of 16 bytes, packet id, payload to make the whole packet 64 bytes at level 4
    topic = "fleet/sensor/001"
    payload = bytes(range(64 - 2 - 2 - len(topic) - 2))
    packet = Publish(topic, payload, qos=1, packet_id=7, properties=properties)
    return packet.encode(level)


def _bench(name: str, fn: Callable[[], object], per_call: int, repeat: int, number: int) -> None:
    best = min(timeit.repeat(fn, repeat=repeat, number=number))
    per_packet_ns = best / number / per_call * 1e9
    print(f"{name:<52} {per_packet_ns:8.1f} ns/packet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args(argv)

    one = _publish_bytes(4, None)
    assert len(one) == 64, len(one)
    batch = one * BATCH

    def decode_v4() -> object:
        return codec.Decoder(protocol_level=4).feed(batch)

    _bench(f"decode {BATCH} x 64-byte QoS1 PUBLISH, level 4", decode_v4, BATCH, args.repeat,
           args.number)

    topic = "fleet/sensor/001"
    payload = bytes(42)

    def encode_v4() -> object:
        return codec.encode_publish_parts(topic, payload, 1, False)

    _bench("encode_publish_parts QoS1, level 4", encode_v4, 1, args.repeat, args.number * 1000)

    v5_parts = getattr(codec, "encode_publish_parts_v5", None)
    if v5_parts is None:
        return
    for label, props in (("no properties", None),
                         ("3 properties", {"message_expiry_interval": 60,
                                           "content_type": "application/json",
                                           "user_property": [("site", "a1")]})):
        batch5 = _publish_bytes(5, props) * BATCH

        def decode_v5(data: bytes = batch5) -> object:
            return codec.Decoder(protocol_level=5).feed(data)

        _bench(f"decode {BATCH} x QoS1 PUBLISH, level 5, {label}", decode_v5, BATCH,
               args.repeat, args.number)

        def encode_v5(p: dict[str, object] | None = props) -> object:
            return v5_parts(topic, payload, 1, False, False, p)

        _bench(f"encode_publish_parts_v5 QoS1, {label}", encode_v5, 1, args.repeat,
               args.number * 1000)


if __name__ == "__main__":
    main()
