"""The start-up banner and its warnings, from a configuration and bound listeners."""

from __future__ import annotations

from mqttd.config import TLS, Config, Http, Listener, Persistence, Security
from mqttd.server.banner import banner, warnings
from mqttd.server.listeners import BoundListener


def bound(listener: Listener, index: int = 0) -> BoundListener:
    host = listener.host
    return BoundListener(listener, index, addresses=[(host, listener.port or 40000 + index)])


def test_banner_names_the_source_listeners_dashboard_and_store():
    tls = TLS(certfile="c.pem", keyfile="k.pem")
    listeners = [
        bound(Listener(host="127.0.0.1", port=1883)),
        bound(Listener(host="::1", port=8883, tls=tls), 1),
        bound(Listener(host="127.0.0.1", port=8080, protocol="websockets"), 2),
        bound(Listener(host="0.0.0.0", port=8081, protocol="websockets", tls=tls), 3),
    ]
    config = Config(
        listeners=tuple(b.config for b in listeners),
        persistence=Persistence(db_file=":memory:"),
        security=Security(password_file="users.pw"),
    )
    text = banner(config, "site.yaml", listeners, [("127.0.0.1", 18083)], "1.2.3")
    assert text.splitlines() == [
        "mqttd 1.2.3 serving MQTT 3.1.1, 3.1 and 5.0",
        "  config:    site.yaml",
        "  mqtt:      127.0.0.1:1883 tcp, anonymous clients allowed",
        "  mqtt:      [::1]:8883 tls, anonymous clients allowed",
        "  mqtt:      127.0.0.1:8080 ws path /mqtt, anonymous clients allowed",
        "  mqtt:      0.0.0.0:8081 wss path /mqtt, user name and password required",
        "  dashboard: http://127.0.0.1:18083/ (metrics /metrics, health /healthz)",
        "  store:     in memory (nothing survives a restart)",
        "  passwords: users.pw",
    ]
    assert warnings(config, listeners) == []


def test_banner_of_the_defaults_without_the_operations_listener(tmp_path):
    config = Config(persistence=Persistence(data_dir=str(tmp_path)), http=Http(enabled=False))
    text = banner(config, None, [bound(config.listeners[0])], [], "1.2.3")
    assert "  config:    built-in defaults" in text
    assert "  dashboard: off (--http-port PORT, or http.enabled in the config)" in text
    assert f"  store:     {tmp_path / 'mqttd.db'} (SQLite, durability process_crash)" in text


def test_anonymous_clients_from_the_network_are_warned_about():
    listener = Listener(host="0.0.0.0", port=1883, allow_anonymous=True)
    config = Config(listeners=(listener,))
    (warning,) = warnings(config, [bound(listener)])
    assert warning.startswith("listener 0.0.0.0:1883 accepts anonymous clients from the network")


def test_a_listener_nobody_can_log_in_on_is_warned_about():
    listener = Listener(host="0.0.0.0", port=1883)  # anonymous refused off loopback
    config = Config(listeners=(listener,))
    (warning,) = warnings(config, [bound(listener)])
    assert "no client can log in on it" in warning
    with_passwords = Config(listeners=(listener,), security=Security(password_file="pw"))
    assert warnings(with_passwords, [bound(listener)]) == []
