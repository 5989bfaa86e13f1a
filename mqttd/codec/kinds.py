"""Protocol levels and control packet types (no imports: every codec module may use these)."""

PROTOCOL_31 = 3
PROTOCOL_311 = 4
PROTOCOL_5 = 5
# A bridge may set the top bit of the protocol level in its CONNECT (mosquitto's try_private):
# "I am a broker", so that the remote does not send its own messages back.
BRIDGE_LEVEL_FLAG = 0x80

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15
# Not a packet type: the Will Properties in a CONNECT payload have their own set (5.0 3.1.3.2).
WILL = 16

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH", WILL: "Will Properties",
}
