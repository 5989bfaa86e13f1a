"""Protocol errors that know their answer on the wire.

Every error the codec or the broker raises for bad input is an :class:`MQTTError`.
It carries:

* ``reason_code`` - the MQTT 5.0 reason code (used in a CONNACK before the session
  starts, or in a DISCONNECT after it);
* ``connack_code`` - the MQTT 3.1/3.1.1 CONNACK return code when the error happens
  while handling CONNECT and the 3.x protocol has an answer for it, else ``None``
  (3.x has no DISCONNECT from the server: the connection is simply closed).

``packets_before`` is set by the decoder: the packets that were complete in the same
read before the bad one, so the caller can handle them first.
"""

from __future__ import annotations

from typing import Any

from mqttd.codec import reason


class MQTTError(Exception):
    reason_code: int = reason.UNSPECIFIED_ERROR
    connack_code: int | None = None

    def __init__(
        self,
        message: str,
        *,
        reason_code: int | None = None,
        connack_code: int | None = None,
    ) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code
        if connack_code is not None:
            self.connack_code = connack_code
        self.packets_before: list[Any] = []

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class MalformedPacket(MQTTError):
    """The bytes do not form a valid packet (3.1.1 section 4.8: close the connection)."""

    reason_code = reason.MALFORMED_PACKET


class ProtocolError(MQTTError):
    """A well-formed packet that the protocol does not allow here."""

    reason_code = reason.PROTOCOL_ERROR


class PacketTooLarge(MQTTError):
    reason_code = reason.PACKET_TOO_LARGE


class UnsupportedProtocolVersion(MQTTError):
    reason_code = reason.UNSUPPORTED_PROTOCOL_VERSION
    connack_code = reason.CONNACK_UNACCEPTABLE_PROTOCOL_VERSION


class ClientIdRejected(MQTTError):
    reason_code = reason.CLIENT_IDENTIFIER_NOT_VALID
    connack_code = reason.CONNACK_IDENTIFIER_REJECTED


class TopicNameInvalid(MQTTError):
    reason_code = reason.TOPIC_NAME_INVALID


class KeepAliveTimeout(MQTTError):
    reason_code = reason.KEEP_ALIVE_TIMEOUT


class SessionTakenOver(MQTTError):
    reason_code = reason.SESSION_TAKEN_OVER


class ServerShuttingDown(MQTTError):
    reason_code = reason.SERVER_SHUTTING_DOWN
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class ServerBusy(MQTTError):
    reason_code = reason.SERVER_BUSY
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class ServerUnavailable(MQTTError):
    """The broker cannot serve the client now (e.g. its authentication backlog is too long
    or an authentication hook failed); the client may retry later."""

    reason_code = reason.SERVER_UNAVAILABLE
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class BadUserNameOrPassword(MQTTError):
    """CONNECT refused: unknown user name or wrong password."""

    reason_code = reason.BAD_USERNAME_OR_PASSWORD
    connack_code = reason.CONNACK_BAD_USERNAME_OR_PASSWORD


class NotAuthorized(MQTTError):
    """CONNECT refused: anonymous access not allowed here, too many failed logins from the
    client's address, or a will topic the client may not publish to."""

    reason_code = reason.NOT_AUTHORIZED
    connack_code = reason.CONNACK_NOT_AUTHORIZED


# -- MQTT 5.0 only: these have no 3.x CONNACK return code unless one fits -------------------


class TopicFilterInvalid(MQTTError):
    reason_code = reason.TOPIC_FILTER_INVALID


class TopicAliasInvalid(ProtocolError):
    """A Topic Alias of 0, or above the Topic Alias Maximum the receiver announced
    (5.0 section 3.3.2.3.4): DISCONNECT with 0x94."""

    reason_code = reason.TOPIC_ALIAS_INVALID


class ReceiveMaximumExceeded(ProtocolError):
    """More unacknowledged QoS 1/2 PUBLISHes than the Receive Maximum (5.0 section 3.3.4)."""

    reason_code = reason.RECEIVE_MAXIMUM_EXCEEDED


class QuotaExceeded(MQTTError):
    reason_code = reason.QUOTA_EXCEEDED


class PayloadFormatInvalid(MQTTError):
    """The payload is not valid UTF-8 though its Payload Format Indicator says it is."""

    reason_code = reason.PAYLOAD_FORMAT_INVALID


class ImplementationSpecificError(MQTTError):
    reason_code = reason.IMPLEMENTATION_SPECIFIC_ERROR


class Banned(MQTTError):
    reason_code = reason.BANNED
    connack_code = reason.CONNACK_NOT_AUTHORIZED


class BadAuthenticationMethod(MQTTError):
    reason_code = reason.BAD_AUTHENTICATION_METHOD


class MessageRateTooHigh(MQTTError):
    reason_code = reason.MESSAGE_RATE_TOO_HIGH


class AdministrativeAction(MQTTError):
    reason_code = reason.ADMINISTRATIVE_ACTION


class RetainNotSupported(MQTTError):
    reason_code = reason.RETAIN_NOT_SUPPORTED


class QoSNotSupported(MQTTError):
    reason_code = reason.QOS_NOT_SUPPORTED


class UseAnotherServer(MQTTError):
    reason_code = reason.USE_ANOTHER_SERVER
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class ServerMoved(MQTTError):
    reason_code = reason.SERVER_MOVED
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class SharedSubscriptionsNotSupported(MQTTError):
    reason_code = reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED


class ConnectionRateExceeded(MQTTError):
    reason_code = reason.CONNECTION_RATE_EXCEEDED
    connack_code = reason.CONNACK_SERVER_UNAVAILABLE


class MaximumConnectTime(MQTTError):
    reason_code = reason.MAXIMUM_CONNECT_TIME


class SubscriptionIdentifiersNotSupported(MQTTError):
    reason_code = reason.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED


class WildcardSubscriptionsNotSupported(MQTTError):
    reason_code = reason.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
