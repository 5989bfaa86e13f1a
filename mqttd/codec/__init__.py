"""Sans-IO MQTT codec: packet values, an incremental decoder, encoders. No I/O, no trio.

MQTT 3.1, 3.1.1 and 5.0. For 5.0:

* ``Decoder(max_packet_size, accept_v5=True)`` decodes a level-5 CONNECT and everything after
  it with the 5.0 layout (without the flag a level-5 CONNECT is refused as before:
  UnsupportedProtocolVersion, CONNACK 0x01). A client sets ``protocol_level=5``.
* Decoded 5.0 packets have ``properties`` as a dict keyed by snake_case names (see
  ``mqttd.codec.properties.PROPERTIES``), empty when there are none, and their reason codes.
* ``packet.encode(5)`` writes the 5.0 layout; ``encode_publish_parts_v5(topic, payload, qos,
  retain, dup, properties)`` is the 5.0 ``encode_publish_parts`` (``properties`` a dict or a
  block from ``encode_properties(props, PUBLISH)``); the packet id goes between the parts.
* ``mqttd.codec.reason`` has every 5.0 reason code, ``VALID[packet_type]`` and
  ``reason_name``.
"""

from mqttd.codec.decoder import MAX_PACKET_SIZE, Decoder
from mqttd.codec.errors import (
    ClientIdRejected,
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    QuotaExceeded,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_31,
    PROTOCOL_311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    encode_publish_parts,
    encode_publish_parts_v5,
)
from mqttd.codec.properties import Properties, decode_properties, encode_properties

__all__ = [
    "MAX_PACKET_SIZE",
    "PROTOCOL_5",
    "PROTOCOL_31",
    "PROTOCOL_311",
    "Auth",
    "ClientIdRejected",
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MQTTError",
    "MalformedPacket",
    "Packet",
    "PacketTooLarge",
    "PingReq",
    "PingResp",
    "Properties",
    "ProtocolError",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "QuotaExceeded",
    "ReceiveMaximumExceeded",
    "SubAck",
    "Subscribe",
    "Subscription",
    "TopicAliasInvalid",
    "TopicNameInvalid",
    "UnsubAck",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "decode_properties",
    "encode_properties",
    "encode_publish_parts",
    "encode_publish_parts_v5",
]
