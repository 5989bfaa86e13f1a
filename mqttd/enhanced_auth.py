"""MQTT 5.0 enhanced authentication (section 4.12): CONNECT with an Authentication Method,
then AUTH packets back and forth until the broker accepts or refuses; re-authentication
with AUTH 0x19 on a live connection.

mqttd offers no method of its own. A program embedding the broker may pass an
:class:`EnhancedAuthenticator` (``Broker(config, enhanced_authenticator=...)``); without one,
or for a method it does not list, CONNECT gets CONNACK 0x8C Bad authentication method and
an AUTH packet DISCONNECT 0x82 Protocol error.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from mqttd.codec import MQTTError, ProtocolError, reason
from mqttd.codec.errors import BadAuthenticationMethod
from mqttd.codec.packets import PROTOCOL_5, Auth, Connect

if TYPE_CHECKING:
    from mqttd.connection import Connection

SUCCESS = reason.SUCCESS
CONTINUE = reason.CONTINUE_AUTHENTICATION
REAUTHENTICATE = reason.RE_AUTHENTICATE


class EnhancedAuthenticator(Protocol):
    """One step of an authentication exchange, on the event loop (keep it quick).

    ``state`` is None on the first step and then whatever the previous step returned.
    Returns (reason code, authentication data to send, state): 0x00 accept, 0x18 continue
    (the data goes to the client in AUTH and its answer comes to the next step), or a
    CONNACK/DISCONNECT error code such as 0x86 or 0x87 to refuse."""

    methods: Collection[str]

    def step(
        self, client_id: str, method: str, data: bytes | None, state: Any
    ) -> tuple[int, bytes | None, Any]: ...


@attrs.define(eq=False)
class Exchange:
    """An exchange in progress on one connection."""

    method: str
    state: Any
    connect: Connect | None  # the CONNECT waiting for the outcome (None: accepted)
    waiting: bool = False  # we sent AUTH 0x18 and wait for the client's AUTH 0x18


def start(hook: EnhancedAuthenticator | None, conn: Connection, packet: Connect
          ) -> Connect | None:
    """A CONNECT with an Authentication Method: the CONNECT when the client is accepted at
    once, None while the exchange goes on (the caller holds the connection's other packets
    until it ends). Raises MQTTError."""
    props = packet.properties or {}
    method = props["authentication_method"]
    if hook is None or method not in hook.methods:
        raise BadAuthenticationMethod(f"authentication method {method!r} is not supported")
    exchange = Exchange(method, None, packet)
    conn.auth_exchange = exchange
    return _step(hook, conn, exchange, props.get("authentication_data"))


def on_auth(hook: EnhancedAuthenticator | None, conn: Connection, packet: Auth
            ) -> Connect | None:
    """An AUTH packet: the CONNECT waiting for the exchange when it is now accepted, else
    None (the exchange goes on, or a re-authentication succeeded). Raises MQTTError."""
    exchange = conn.auth_exchange
    props = packet.properties or {}
    method = props.get("authentication_method")
    if exchange is None or method != exchange.method or hook is None:
        raise ProtocolError("AUTH without (or with another) authentication method")
    if exchange.waiting:
        if packet.reason_code != CONTINUE:
            raise ProtocolError("AUTH must continue the exchange (0x18)")
    elif exchange.connect is None and packet.reason_code == REAUTHENTICATE:
        exchange.state = None  # re-authentication starts over
    else:
        raise ProtocolError(f"unexpected AUTH with reason code {packet.reason_code:#04x}")
    return _step(hook, conn, exchange, props.get("authentication_data"))


def _step(hook: EnhancedAuthenticator, conn: Connection, exchange: Exchange,
          data: bytes | None) -> Connect | None:
    code, reply, exchange.state = hook.step(conn.client_id, exchange.method, data, exchange.state)
    props: dict[str, Any] = {"authentication_method": exchange.method}
    if reply is not None:
        props["authentication_data"] = reply
    exchange.waiting = code == CONTINUE
    if code == CONTINUE:
        conn.send(Auth(CONTINUE, props).encode(PROTOCOL_5))
        return None
    if code != SUCCESS:
        raise MQTTError(f"authentication refused by {exchange.method!r}", reason_code=code)
    if exchange.connect is None:  # re-authenticated
        conn.send(Auth(SUCCESS, props).encode(PROTOCOL_5))
        return None
    connect, exchange.connect = exchange.connect, None
    if conn.connack_properties is not None:
        conn.connack_properties.update(props)
    return connect
