"""Return codes (MQTT 3.1/3.1.1) and reason codes (MQTT 5.0) used on the wire.

The 5.0 reason codes follow table 2-6 of the 5.0 specification (section 2.4). One value can
have several names depending on the packet (0x00 is Success, Normal disconnection and Granted
QoS 0); :func:`reason_name` gives the name for a packet type, :func:`is_valid` tells whether a
code may be sent on a packet type and :data:`VALID` lists them per packet type.
"""

from mqttd.codec.kinds import (
    AUTH,
    CONNACK,
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
)

# MQTT 3.1 / 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3)
CONNACK_ACCEPTED = 0x00
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 0x01
CONNACK_IDENTIFIER_REJECTED = 0x02
CONNACK_SERVER_UNAVAILABLE = 0x03
CONNACK_BAD_USERNAME_OR_PASSWORD = 0x04
CONNACK_NOT_AUTHORIZED = 0x05

# SUBACK return code for a refused subscription (3.1.1); same value as UNSPECIFIED_ERROR in 5.0
SUBACK_FAILURE = 0x80

# MQTT 5.0 reason codes (5.0 section 2.4, table 2-6)
SUCCESS = 0x00
NORMAL_DISCONNECTION = 0x00
GRANTED_QOS_0 = 0x00
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL_MESSAGE = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_IDENTIFIER_IN_USE = 0x91
PACKET_IDENTIFIER_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
USE_ANOTHER_SERVER = 0x9C
SERVER_MOVED = 0x9D
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

_CA, _PA, _RC, _RL, _CO = CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP
_SA, _UA, _DI, _AU = SUBACK, UNSUBACK, DISCONNECT, AUTH

# (code, name, packet types it is valid on) - table 2-6 row by row
TABLE: tuple[tuple[int, str, frozenset[int]], ...] = tuple(
    (code, name, frozenset(kinds))
    for code, name, kinds in (
        (0x00, "Success", (_CA, _PA, _RC, _RL, _CO, _UA, _AU)),
        (0x00, "Normal disconnection", (_DI,)),
        (0x00, "Granted QoS 0", (_SA,)),
        (0x01, "Granted QoS 1", (_SA,)),
        (0x02, "Granted QoS 2", (_SA,)),
        (0x04, "Disconnect with Will Message", (_DI,)),
        (0x10, "No matching subscribers", (_PA, _RC)),
        (0x11, "No subscription existed", (_UA,)),
        (0x18, "Continue authentication", (_AU,)),
        (0x19, "Re-authenticate", (_AU,)),
        (0x80, "Unspecified error", (_CA, _PA, _RC, _SA, _UA, _DI)),
        (0x81, "Malformed Packet", (_CA, _DI)),
        (0x82, "Protocol Error", (_CA, _DI)),
        (0x83, "Implementation specific error", (_CA, _PA, _RC, _SA, _UA, _DI)),
        (0x84, "Unsupported Protocol Version", (_CA,)),
        (0x85, "Client Identifier not valid", (_CA,)),
        (0x86, "Bad User Name or Password", (_CA,)),
        (0x87, "Not authorized", (_CA, _PA, _RC, _SA, _UA, _DI)),
        (0x88, "Server unavailable", (_CA,)),
        (0x89, "Server busy", (_CA, _DI)),
        (0x8A, "Banned", (_CA,)),
        (0x8B, "Server shutting down", (_DI,)),
        (0x8C, "Bad authentication method", (_CA, _DI)),
        (0x8D, "Keep Alive timeout", (_DI,)),
        (0x8E, "Session taken over", (_DI,)),
        (0x8F, "Topic Filter invalid", (_SA, _UA, _DI)),
        (0x90, "Topic Name invalid", (_CA, _PA, _RC, _DI)),
        (0x91, "Packet Identifier in use", (_PA, _RC, _SA, _UA)),
        (0x92, "Packet Identifier not found", (_RL, _CO)),
        (0x93, "Receive Maximum exceeded", (_DI,)),
        (0x94, "Topic Alias invalid", (_DI,)),
        (0x95, "Packet too large", (_CA, _DI)),
        (0x96, "Message rate too high", (_DI,)),
        (0x97, "Quota exceeded", (_CA, _PA, _RC, _SA, _DI)),
        (0x98, "Administrative action", (_DI,)),
        (0x99, "Payload format invalid", (_CA, _PA, _RC, _DI)),
        (0x9A, "Retain not supported", (_CA, _DI)),
        (0x9B, "QoS not supported", (_CA, _DI)),
        (0x9C, "Use another server", (_CA, _DI)),
        (0x9D, "Server moved", (_CA, _DI)),
        (0x9E, "Shared Subscriptions not supported", (_SA, _DI)),
        (0x9F, "Connection rate exceeded", (_CA, _DI)),
        (0xA0, "Maximum connect time", (_DI,)),
        (0xA1, "Subscription Identifiers not supported", (_SA, _DI)),
        (0xA2, "Wildcard Subscriptions not supported", (_SA, _DI)),
    )
)

# packet type -> the reason codes a sender may use on it
VALID: dict[int, frozenset[int]] = {
    kind: frozenset(code for code, _, kinds in TABLE if kind in kinds)
    for kind in (CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH)
}

_NAMES: dict[tuple[int, int], str] = {
    (code, kind): name for code, name, kinds in TABLE for kind in kinds
}
_FIRST_NAMES: dict[int, str] = {}
for _code, _name, _ in TABLE:
    _FIRST_NAMES.setdefault(_code, _name)


def is_valid(code: int, packet_type: int) -> bool:
    """Whether ``code`` is a 5.0 reason code a sender may put on ``packet_type``."""
    return code in VALID.get(packet_type, ())


def reason_name(code: int, packet_type: int | None = None) -> str:
    """The spec's name for ``code`` (on ``packet_type`` when given), e.g. ``"Quota exceeded"``;
    an unknown code gives ``"reason code 0x.."``."""
    if packet_type is not None and (code, packet_type) in _NAMES:
        return _NAMES[code, packet_type]
    return _FIRST_NAMES.get(code, f"reason code {code:#04x}")


def is_error(code: int) -> bool:
    """Reason codes of 0x80 and above indicate failure (5.0 section 2.4)."""
    return code >= 0x80
