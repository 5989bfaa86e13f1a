"""Sans-IO MQTT codec: packet values, an incremental decoder, encoders. No I/O, no trio."""

from mqttd.codec.decoder import MAX_PACKET_SIZE, Decoder
from mqttd.codec.errors import (
    ClientIdRejected,
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
from mqttd.codec.packets import *  # noqa: F403
from mqttd.codec.packets import encode_publish_parts

__all__ = [
    "MAX_PACKET_SIZE", "Decoder", "ClientIdRejected", "MalformedPacket", "MQTTError",
    "PacketTooLarge", "ProtocolError", "TopicNameInvalid", "UnsupportedProtocolVersion",
    "encode_publish_parts",
]
