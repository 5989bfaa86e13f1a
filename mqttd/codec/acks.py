"""The acknowledgements of a PUBLISH exchange (PUBACK, PUBREC, PUBREL, PUBCOMP) as the broker
sends them: one encoder, so that the rules below hold in one place.

- 3.1 / 3.1.1: packet identifier only (remaining length 2).
- 5.0: remaining length 2 for Success, 3 with any other reason code (5.0 section 3.4.2.1). A
  reason string goes only with an error code (0x80 and up), only when the client allows
  problem information (MQTT-3.1.2-29) and only when the ack still fits the client's Maximum
  Packet Size (MQTT-3.4.2-2 and its siblings). Never on Success or 0x10 (No matching
  subscribers): strict client implementations accept an ack of remaining length 2, 3 or 4
  only, and mosquitto and EMQX send no properties there either.
"""

from __future__ import annotations

from mqttd.codec.kinds import PUBACK, PUBCOMP, PUBREC, PUBREL
from mqttd.codec.packets import PROTOCOL_5

_FIRST_BYTE = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70}
_REASON_STRING = 0x1F
_ERROR = 0x80


def encode_ack(
    kind: int,
    packet_id: int,
    code: int = 0,
    *,
    level: int = PROTOCOL_5,
    reason: str = "",
    max_size: int = 0,
) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP (``kind``) for ``packet_id``. ``code`` and
    ``reason`` are used at level 5 only, ``reason`` only with an error code and when the
    result is at most ``max_size`` bytes (0: no limit)."""
    first = _FIRST_BYTE[kind]
    pid_hi, pid_lo = packet_id >> 8, packet_id & 0xFF
    if level != PROTOCOL_5 or not code:
        return bytes((first, 2, pid_hi, pid_lo))
    if code >= _ERROR and reason:
        text = reason.encode()
        size = 2 + 3 + 1 + 3 + len(text)  # header, id + code, property length, string
        # (one-byte lengths: the broker's reason strings are short; a longer one is left out)
        if size - 2 <= 127 and (not max_size or size <= max_size):
            return bytes((
                first, size - 2, pid_hi, pid_lo, code, 3 + len(text), _REASON_STRING,
                len(text) >> 8, len(text) & 0xFF,
            )) + text
    return bytes((first, 3, pid_hi, pid_lo, code))


__all__ = ["encode_ack"]
