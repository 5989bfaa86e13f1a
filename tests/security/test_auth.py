"""Password files (mosquitto's formats), ``mqttd passwd``, CONNECT authentication, anonymous
access per listener, and the failed-login limit: without I/O and over real sockets."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import threading
from typing import Any

import attrs
import pytest
import trio

from mqttd.auth import (
    HASH_ITERATIONS,
    PasswordFile,
    PasswordHash,
    SecurityFileError,
    hash_password,
    passwd_main,
)
from mqttd.broker import Broker, running
from mqttd.codec import Decoder, MQTTError
from mqttd.codec.errors import BadUserNameOrPassword, NotAuthorized
from mqttd.codec.packets import (
    ConnAck,
    Connect,
    PingReq,
    PingResp,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
    Will,
)
from mqttd.config import TLS, Config, Listener, Persistence, Security
from mqttd.security.gatekeeper import LoginRateLimiter, peer_host
from tests.conftest import NO_HTTP
from tests.rawclient import RawClient

REPO = pathlib.Path(__file__).resolve().parents[2]
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO = shutil.which("mosquitto")
LOOPBACK = Listener(host="127.0.0.1", port=0)
ANY_ADDRESS = Listener(host="0.0.0.0", port=0)
FAST = 101  # iterations for test entries that need not exercise the slow path


def sha512_entry(password: bytes, salt: bytes) -> str:
    """A mosquitto 1.x ``$6$`` hash made from the documented algorithm: one SHA-512 over
    password + salt, both parts base64."""
    digest = hashlib.sha512(password + salt).digest()
    return f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_passwords(path: pathlib.Path, users: dict[str, str], iterations: int = FAST) -> str:
    path.write_text("".join(f"{u}:{hash_password(p, iterations)}\n" for u, p in users.items()))
    return str(path)


def security_config(
    *,
    password_file: str | None = None,
    acl_file: str | None = None,
    listeners: tuple[Listener, ...] = (LOOPBACK,),
    max_failures: int = 10,
) -> Config:
    return Config(
        listeners=listeners,
        persistence=Persistence(db_file=":memory:"),
        http=NO_HTTP,
        security=Security(
            password_file=password_file,
            acl_file=acl_file,
            max_login_failures_per_minute=max_failures,
        ),
    )


class Client:
    """One connection to a broker driven without I/O (see tests/logic/test_broker_logic.py)."""

    def __init__(
        self,
        broker: Broker,
        peer: str = "192.0.2.1:50000",
        listener: Listener | None = None,
        tls_identity: str | None = None,
    ) -> None:
        self.broker = broker
        self.conn = broker.new_connection(peer, listener, tls_identity)
        self.decoder = Decoder(protocol_level=4)
        self._next_id = 1
        self.pending: list[Any] = []

    def send(self, *packets: Any) -> None:
        self.broker.handle_data(self.conn, b"".join(p.encode() for p in packets))

    def received(self) -> list[Any]:
        return self.decoder.feed(self.conn.data_to_send())

    def connect(
        self,
        client_id: str,
        username: str | None = None,
        password: bytes | None = None,
        will: Will | None = None,
    ) -> int:
        """Send CONNECT; the CONNACK return code (a refusal is answered as the I/O layer
        does: protocol_error, which sends CONNACK and closes)."""
        try:
            self.send(Connect(client_id, username=username, password=password, will=will))
        except MQTTError as exc:
            self.broker.protocol_error(self.conn, exc)
            assert self.conn.closing
        packets = self.received()
        assert isinstance(packets[0], ConnAck), packets
        self.pending = packets[1:]
        return packets[0].return_code  # type: ignore[no-any-return]

    def next_id(self) -> int:
        packet_id = self._next_id
        self._next_id += 1
        return packet_id

    def subscribe(self, *filters: str, qos: int = 0) -> tuple[int, ...]:
        packet_id = self.next_id()
        self.send(Subscribe(packet_id, tuple(Subscription(f, qos) for f in filters)))
        packets = self.received()
        assert isinstance(packets[0], SubAck) and packets[0].packet_id == packet_id, packets
        self.pending = packets[1:]
        return packets[0].return_codes  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        packet_id = self.next_id() if qos else 0
        self.send(Publish(topic, payload, qos, retain, packet_id=packet_id))

    def lose(self) -> None:
        self.broker.connection_lost(self.conn)


# -- hashes and password files -------------------------------------------------------------


def test_7_entry_round_trip_and_layout() -> None:
    entry = hash_password("s3cret")
    _, scheme, iterations, salt, digest = entry.split("$")
    assert (scheme, int(iterations)) == ("7", HASH_ITERATIONS)
    assert len(base64.b64decode(salt)) == 12  # the salt length mosquitto 2.0 reads
    assert len(base64.b64decode(digest)) == 64
    parsed = PasswordHash.parse(entry)
    assert parsed.verify(b"s3cret")
    assert not parsed.verify(b"s3cret ")
    assert hash_password("s3cret") != entry  # a random salt each time


def test_hand_made_7_entry_is_pbkdf2_sha512() -> None:
    salt = b"0123456789ab"
    digest = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101, 64)
    entry = f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert PasswordHash.parse(entry).verify(b"pw")
    assert not PasswordHash.parse(entry).verify(b"pW")


def test_hand_made_6_entry_is_sha512_over_password_and_salt() -> None:
    entry = sha512_entry(b"legacy", os.urandom(12))
    parsed = PasswordHash.parse(entry)
    assert parsed.iterations == 0
    assert parsed.verify(b"legacy")
    assert not parsed.verify(b"legacy2")


def test_password_file_with_comments_blank_lines_and_both_formats() -> None:
    text = (
        "# users\n\n"
        f"alice:{hash_password('a-pass', FAST)}\n"
        f"bob:{sha512_entry(b'b-pass', b'saltsaltsalt')}\r\n"
        "   \n"
    )
    passwords = PasswordFile.parse(text, "pw")
    assert len(passwords) == 2
    assert passwords.authenticate("c", "alice", b"a-pass")
    assert passwords.authenticate("c", "bob", b"b-pass")
    assert not passwords.authenticate("c", "alice", b"b-pass")
    assert not passwords.authenticate("c", "carol", b"a-pass")
    assert not passwords.authenticate("c", "alice", None)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("carol:hunter2", "user 'carol': unknown password hash format"),
        ("carol:$5$abc$def", "user 'carol': unknown password hash format"),
        ("carol:$7$many$YWJj$ZGVm", "the iteration count is not a number"),
        ("carol:$7$0$YWJj$ZGVm", "iteration count 0 out of range"),
        ("carol:$7$101$not base64!$ZGVm", "not valid base64"),
        ("carol:$6$$ZGVm", "empty salt or hash"),
        ("carol", "expected user:hash"),
        (":$6$YWJj$ZGVm", "expected user:hash"),
    ],
)
def test_unusable_lines_are_refused_naming_the_line(line: str, problem: str) -> None:
    text = f"# header\nalice:{hash_password('x', FAST)}\n{line}\n"
    with pytest.raises(SecurityFileError) as info:
        PasswordFile.parse(text, "users.pw")
    assert str(info.value).startswith("users.pw:3: ")
    assert problem in str(info.value)
    assert "hunter2" not in str(info.value)  # a plain-text password is never echoed


def test_every_unusable_line_is_a_problem(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "users.pw"
    text = f"carol\nalice:{hash_password('x', FAST)}\nbob:$6$$ZGVm\n"
    path.write_text(text, encoding="utf-8")
    assert [str(p) for p in PasswordFile.problems(path)] == [
        f"{path}:1: expected user:hash",
        f"{path}:3: user 'bob': empty salt or hash",
    ]
    assert [str(p) for p in PasswordFile.problems(tmp_path)] == [
        f"{tmp_path}: cannot read password file: Is a directory"
    ]


def test_missing_password_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SecurityFileError, match="cannot read password file"):
        PasswordFile.load(tmp_path / "absent")


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_file_made_by_mosquitto_passwd_is_accepted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mosquitto.pw"
    run = [MOSQUITTO_PASSWD]
    subprocess.run([*run, "-c", "-b", str(path), "modern", "pbkdf2-pass"], check=True)
    subprocess.run([*run, "-H", "sha512", "-b", str(path), "legacy", "sha512-pass"], check=True)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("modern:$7$101$") and lines[1].startswith("legacy:$6$")
    passwords = PasswordFile.load(path)
    assert passwords.authenticate("c", "modern", b"pbkdf2-pass")
    assert passwords.authenticate("c", "legacy", b"sha512-pass")
    assert not passwords.authenticate("c", "modern", b"sha512-pass")
    assert not passwords.authenticate("c", "legacy", b"pbkdf2-pass")


def test_example_password_file_holds_the_documented_users() -> None:
    passwords = PasswordFile.load(REPO / "config" / "passwd.example")
    for user in ("sensor-1", "backend", "dashboard"):
        assert passwords.authenticate("c", user, f"{user}-secret".encode()), user
        assert not passwords.authenticate("c", user, b"wrong")


def test_successful_slow_checks_are_remembered_failures_are_not() -> None:
    passwords = PasswordFile.parse(f"dev:{hash_password('pw', 6000)}\n")
    assert passwords.is_slow("dev", b"pw")
    assert passwords.is_slow("unknown", b"pw")  # unknown users cost as much as known ones
    assert not passwords.authenticate("c", "dev", b"nope")
    assert passwords.is_slow("dev", b"nope")
    assert passwords.authenticate("c", "dev", b"pw")
    assert not passwords.is_slow("dev", b"pw")  # remembered: one HMAC from now on
    assert passwords.is_slow("dev", b"nope")
    assert passwords.authenticate("c", "dev", b"pw")
    assert not passwords.authenticate("c", "dev", b"nope")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
async def test_mosquitto_accepts_the_entries_we_write(tmp_path: pathlib.Path) -> None:
    """The other direction: a file written by ``mqttd passwd`` works in mosquitto 2.x."""
    path = tmp_path / "users.pw"
    assert passwd_main(["-c", "-b", str(path), "modern", "m-pw"]) == 0  # default iterations
    assert passwd_main(["-b", "--iterations", "101", str(path), "light", "l-pw"]) == 0
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {path}\n"
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"  # as root, keep root (reads the file)
    )
    process = await trio.lowlevel.open_process(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
            for username, password, expected in (
                ("modern", b"m-pw", 0), ("light", b"l-pw", 0), ("modern", b"l-pw", 5)
            ):
                _, code = await connect_raw(port, "c", username, password)
                assert code == expected, username  # mosquitto says 5 for a wrong password
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()


# -- mqttd passwd ------------------------------------------------------------------------


def test_passwd_create_add_replace_delete(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "users.pw"
    assert passwd_main(["-c", "-b", "--iterations", "1000", str(path), "alice", "one"]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert passwd_main(["-b", str(path), "bob", "two"]) == 0
    entries = PasswordFile.load(path).entries
    assert entries["alice"].iterations == 1000
    assert entries["bob"].iterations == HASH_ITERATIONS
    with path.open("a") as f:
        f.write("# a comment that stays\n")
    assert passwd_main(["-b", "--iterations", "1000", str(path), "alice", "uno"]) == 0
    passwords = PasswordFile.load(path)
    assert passwords.authenticate("c", "alice", b"uno")
    assert not passwords.authenticate("c", "alice", b"one")
    assert passwords.authenticate("c", "bob", b"two")
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "# a comment that stays"]
    assert passwd_main(["-D", str(path), "bob"]) == 0
    assert list(PasswordFile.load(path).entries) == ["alice"]
    assert passwd_main(["-D", str(path), "bob"]) == 1  # not there any more
    assert passwd_main(["-c", "-b", "--iterations", "1000", str(path), "carol", "3"]) == 0
    assert list(PasswordFile.load(path).entries) == ["carol"]  # -c starts a new file


def test_passwd_errors(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "users.pw"
    assert passwd_main(["-b", str(path), "alice", "pw"]) == 1  # no file and no -c
    assert "use -c to create it" in capsys.readouterr().err
    assert passwd_main(["-c", "-b", str(path), "al:ice", "pw"]) == 1
    assert "':'" in capsys.readouterr().err
    assert passwd_main(["-c", "-b", str(path), "alice", ""]) == 1
    assert not path.exists()
    for argv in (["-b", str(path), "alice"], [str(path), "alice", "pw"], ["-D", "-c", "f", "u"]):
        with pytest.raises(SystemExit) as info:
            passwd_main(argv)
        assert info.value.code == 2


def test_passwd_prompts_twice(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users.pw"
    answers = iter(["typed", "typed", "first", "second"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert passwd_main(["-c", "--iterations", "1000", str(path), "alice"]) == 0
    assert prompts == ["Password: ", "Reenter password: "]
    assert PasswordFile.load(path).authenticate("c", "alice", b"typed")
    assert passwd_main(["--iterations", "1000", str(path), "alice"]) == 1  # mismatch
    assert PasswordFile.load(path).authenticate("c", "alice", b"typed")  # unchanged


# -- CONNECT without I/O ---------------------------------------------------------------------


@pytest.fixture
def password_file(tmp_path: pathlib.Path) -> str:
    return write_passwords(tmp_path / "users.pw", {"alice": "alice-pw", "bob": "bob-pw"})


def test_right_password_is_accepted_and_the_user_name_kept(password_file: str) -> None:
    broker = Broker(security_config(password_file=password_file))
    client = Client(broker, listener=ANY_ADDRESS)
    assert client.connect("c1", "alice", b"alice-pw") == 0
    session = broker.sessions["c1"]
    assert (session.username, session.login_known) == ("alice", True)


@pytest.mark.parametrize(
    ("username", "password"), [("alice", b"bob-pw"), ("alice", None), ("mallory", b"alice-pw")]
)
def test_wrong_password_or_unknown_user_gets_connack_4(
    password_file: str, username: str, password: bytes | None
) -> None:
    broker = Broker(security_config(password_file=password_file))
    client = Client(broker, listener=LOOPBACK)  # a password file applies on loopback too
    assert client.connect("c1", username, password) == 4
    assert client.conn.closing and "c1" not in broker.sessions
    assert broker.stats()["auth_failures"] == 1


def test_refusal_is_an_mqtt_error_with_the_wire_answer(password_file: str) -> None:
    broker = Broker(security_config(password_file=password_file))
    client = Client(broker)
    with pytest.raises(BadUserNameOrPassword) as info:
        client.send(Connect("c1", username="alice", password=b"nope"))
    assert (info.value.connack_code, info.value.reason_code) == (0x04, 0x86)
    client = Client(broker, listener=ANY_ADDRESS)
    with pytest.raises(NotAuthorized) as info2:
        client.send(Connect("c2"))
    assert (info2.value.connack_code, info2.value.reason_code) == (0x05, 0x87)


def test_refusals_are_logged_without_the_password(
    password_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mqttd")
    broker = Broker(security_config(password_file=password_file))
    assert Client(broker, "198.51.100.7:4000").connect("c1", "alice", b"Tr0ub4dor") == 4
    refusals = [r.getMessage() for r in caplog.records if "alice" in r.getMessage()]
    assert len(refusals) == 1
    assert "198.51.100.7" in refusals[0] and "wrong password" in refusals[0]
    assert not any("Tr0ub4dor" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("listener", "allowed"),
    [
        (None, True),  # driven without I/O: treated as loopback
        (LOOPBACK, True),
        (Listener(host="::1", port=0), True),
        (ANY_ADDRESS, False),
        (attrs.evolve(ANY_ADDRESS, allow_anonymous=True), True),
        (attrs.evolve(LOOPBACK, allow_anonymous=False), False),
    ],
)
def test_anonymous_access_per_listener(listener: Listener | None, allowed: bool) -> None:
    broker = Broker(security_config())
    client = Client(broker, listener=listener)
    assert client.connect("anon") == (0 if allowed else 5)
    if allowed:
        assert broker.sessions["anon"].username is None


@pytest.mark.parametrize(
    ("listener", "allowed"),
    [
        (LOOPBACK, True),
        (ANY_ADDRESS, False),
        (attrs.evolve(ANY_ADDRESS, allow_anonymous=True), True),
    ],
)
def test_user_name_without_a_password_file_follows_the_anonymous_rule(
    listener: Listener, allowed: bool
) -> None:
    broker = Broker(security_config())
    client = Client(broker, listener=listener)
    assert client.connect("c1", "whoever", b"anything") == (0 if allowed else 5)
    if allowed:
        assert broker.sessions["c1"].username == "whoever"  # for the ACL


def test_password_file_with_anonymous_allowed(password_file: str) -> None:
    broker = Broker(security_config(password_file=password_file))
    open_listener = attrs.evolve(ANY_ADDRESS, allow_anonymous=True)
    assert Client(broker, listener=open_listener).connect("guest") == 0
    assert Client(broker, listener=open_listener).connect("u", "alice", b"alice-pw") == 0
    assert Client(broker, listener=open_listener).connect("v", "alice", b"bad") == 4


def test_tls_identity_as_user_name(password_file: str) -> None:
    tls = TLS(certfile="server.pem", keyfile="server.key", require_certificate=True,
              use_identity_as_username=True)
    listener = Listener(host="0.0.0.0", port=8883, tls=tls)
    broker = Broker(security_config(password_file=password_file))
    # the certificate is the credential: CONNECT's user name and password are ignored
    client = Client(broker, listener=listener, tls_identity="device-7")
    assert client.connect("c1", "alice", b"not-alices-password") == 0
    assert broker.sessions["c1"].username == "device-7"
    assert Client(broker, listener=listener).connect("c2") == 5  # no certificate identity
    plain_tls = attrs.evolve(listener, tls=attrs.evolve(tls, use_identity_as_username=False))
    client = Client(broker, listener=plain_tls, tls_identity="device-7")
    assert client.connect("c3", "alice", b"alice-pw") == 0
    assert broker.sessions["c3"].username == "alice"


def test_failed_login_does_not_take_over_the_session(password_file: str) -> None:
    broker = Broker(security_config(password_file=password_file))
    owner = Client(broker)
    assert owner.connect("shared", "alice", b"alice-pw") == 0
    intruder = Client(broker, peer="203.0.113.9:1")
    assert intruder.connect("shared", "bob", b"wrong") == 4
    assert not owner.conn.closing
    assert broker.sessions["shared"].connection is owner.conn


def test_will_topic_needs_write_access(tmp_path: pathlib.Path, password_file: str) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic write alice/#\n")
    broker = Broker(security_config(password_file=password_file, acl_file=str(acl)))
    client = Client(broker)
    assert client.connect("c1", "alice", b"alice-pw", will=Will("alice/status", b"gone")) == 0
    client = Client(broker)
    assert client.connect("c2", "alice", b"alice-pw", will=Will("bob/status", b"gone")) == 5
    assert broker.stats()["auth_failures"] == 0  # not a credential failure


# -- failed-login limit ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_rate_limiter_window() -> None:
    clock = FakeClock()
    limiter = LoginRateLimiter(3, clock=clock)
    for _ in range(3):
        assert not limiter.blocked("h")
        limiter.failed("h")
        clock.now += 10
    assert limiter.blocked("h") and not limiter.blocked("other")
    clock.now = 1000.0 + 60  # the first failure leaves the window
    assert not limiter.blocked("h")
    limiter.failed("h")
    assert limiter.blocked("h")
    clock.now += 1000
    limiter.prune()
    assert len(limiter) == 0


def test_peer_host() -> None:
    assert peer_host("192.0.2.1:1883") == "192.0.2.1"
    assert peer_host("::1:5000") == "::1"
    assert peer_host("?") == "?"


def test_failed_logins_are_rate_limited_per_address_and_recover(password_file: str) -> None:
    broker = Broker(security_config(password_file=password_file, max_failures=3))
    clock = FakeClock()
    broker.gate.limiter.clock = clock
    attacker = "203.0.113.5"
    for i in range(3):
        assert Client(broker, f"{attacker}:{4000 + i}").connect(f"x{i}", "alice", b"guess") == 4
        clock.now += 5
    # over the limit: refused without checking, even with the right password
    assert Client(broker, f"{attacker}:5000").connect("ok", "alice", b"alice-pw") == 5
    assert Client(broker, f"{attacker}:5001").connect("anon") == 5
    # other addresses are unaffected
    assert Client(broker, "198.51.100.1:1").connect("elsewhere", "bob", b"bob-pw") == 0
    stats = broker.stats()
    assert (stats["auth_failures"], stats["auth_rate_limited"]) == (3, 2)
    clock.now += 60  # the failures leave the window
    assert Client(broker, f"{attacker}:5002").connect("ok", "alice", b"alice-pw") == 0


# -- hooks and reload --------------------------------------------------------------------


@attrs.define
class RecordingAuthenticator:
    allowed: dict[str, bytes]
    calls: list[tuple[Any, ...]] = attrs.Factory(list)

    def authenticate(
        self, client_id: str, username: str, password: bytes | None, *, peer: str,
        listener: Listener | None,
    ) -> bool:
        self.calls.append((client_id, username, password, peer, listener))
        return self.allowed.get(username) == password


def test_custom_authenticator_wins_over_the_password_file(password_file: str) -> None:
    hook = RecordingAuthenticator({"svc": b"token"})
    broker = Broker(security_config(password_file=password_file), authenticator=hook)
    assert Client(broker, "192.0.2.4:7", ANY_ADDRESS).connect("c1", "svc", b"token") == 0
    assert hook.calls == [("c1", "svc", b"token", "192.0.2.4:7", ANY_ADDRESS)]
    assert Client(broker, listener=ANY_ADDRESS).connect("c2", "alice", b"alice-pw") == 4
    assert Client(broker, listener=ANY_ADDRESS).connect("c3") == 5  # anonymous: the listener


def test_failing_authenticator_answers_server_unavailable() -> None:
    class Broken:
        def authenticate(self, *args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("database down")

    broker = Broker(security_config(), authenticator=Broken())
    assert Client(broker).connect("c1", "u", b"p") == 3


def test_reload_password_file(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users.pw"
    write_passwords(path, {"alice": "old"})
    broker = Broker(security_config(password_file=str(path)))
    assert Client(broker).connect("c1", "alice", b"old") == 0
    write_passwords(path, {"alice": "new"})
    assert broker.reload()
    assert Client(broker).connect("c2", "alice", b"new") == 0
    assert Client(broker).connect("c3", "alice", b"old") == 4
    path.write_text("alice:plain-text\n")
    caplog.set_level(logging.ERROR, logger="mqttd")
    assert not broker.reload()
    assert "users.pw:1" in caplog.text and "keeping the password file" in caplog.text
    assert Client(broker).connect("c4", "alice", b"new") == 0  # the previous file stays


def test_unusable_password_file_stops_the_start(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "users.pw"
    path.write_text("alice:$1$md5$crypt\n")
    broker = Broker(security_config(password_file=str(path)))
    with pytest.raises(SecurityFileError, match=r"users\.pw:1: user 'alice'"):
        broker.open_store()


# -- over real sockets -----------------------------------------------------------------------


async def connect_raw(
    port: int, client_id: str, username: str | None = None, password: bytes | None = None
) -> tuple[RawClient, int]:
    client = await RawClient.open(port)
    await client.send(Connect(client_id, username=username, password=password))
    connack = await client.expect(ConnAck)
    return client, connack.return_code  # type: ignore[attr-defined]


async def test_password_file_over_tcp(tmp_path: pathlib.Path) -> None:
    # the default iteration count: checked in a worker thread
    path = write_passwords(tmp_path / "users.pw", {"dev": "dev-pw"}, HASH_ITERATIONS)
    config = security_config(password_file=path, listeners=(ANY_ADDRESS,))
    async with running(config) as broker:
        with trio.fail_after(20):
            client, code = await connect_raw(broker.port, "c1", "dev", b"dev-pw")
            assert code == 0
            await client.send(PingReq())
            await client.expect(PingResp)
            for username, password, expected in (
                ("dev", b"wrong", 4), ("nobody", b"dev-pw", 4), (None, None, 5)
            ):
                refused, code = await connect_raw(broker.port, "c2", username, password)
                assert code == expected
                assert await refused.expect_closed() == []
            _, code = await connect_raw(broker.port, "c3", "dev", b"dev-pw")
            assert code == 0  # remembered: no second PBKDF2 run
            stats = broker.stats()
            assert stats["auth_failures"] == 2 and stats["connections"] == 2


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
async def test_mosquitto_passwd_file_over_tcp(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mosquitto.pw"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), "m", "m-pw"], check=True)
    with path.open("a") as f:
        f.write(f"legacy:{sha512_entry(b'l-pw', os.urandom(12))}\n")
    config = security_config(password_file=str(path), listeners=(ANY_ADDRESS,))
    async with running(config) as broker:
        with trio.fail_after(10):
            assert (await connect_raw(broker.port, "a", "m", b"m-pw"))[1] == 0
            assert (await connect_raw(broker.port, "b", "legacy", b"l-pw"))[1] == 0
            assert (await connect_raw(broker.port, "c", "legacy", b"m-pw"))[1] == 4


@attrs.define
class BlockingAuthenticator:
    """Slow on purpose: checked in a worker thread, which waits for ``release``."""

    release: threading.Event = attrs.Factory(threading.Event)
    started: threading.Event = attrs.Factory(threading.Event)
    threads: list[str] = attrs.Factory(list)

    def is_slow(self, username: str, password: bytes | None) -> bool:
        return True

    def authenticate(self, client_id: str, username: str, password: bytes | None, **_: Any) -> bool:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(10)
        return password == b"right"


async def test_slow_check_runs_off_the_event_loop_and_keeps_pipelined_packets() -> None:
    hook = BlockingAuthenticator()
    async with running(security_config(), authenticator=hook) as broker:
        with trio.fail_after(10):
            client = await RawClient.open(broker.port)
            # CONNECT and, before any CONNACK, a SUBSCRIBE and a retained PUBLISH
            await client.send(
                Connect("slow", username="u", password=b"right").encode()
                + Subscribe(1, (Subscription("s/#", 0),)).encode()
                + Publish("s/x", b"early", retain=True).encode()
            )
            await trio.to_thread.run_sync(hook.started.wait)
            # the broker keeps serving others meanwhile
            other, _ = await RawClient.connected(broker.port, "other")
            await other.send(PingReq())
            await other.expect(PingResp)
            hook.release.set()
            assert await client.expect(ConnAck) == ConnAck(False, 0)
            assert await client.expect(SubAck) == SubAck(1, (0,))
            message = await client.expect(Publish)
            assert (message.topic, message.payload) == ("s/x", b"early")  # type: ignore[attr-defined]
            await client.send(PingReq())
            await client.expect(PingResp)
    assert hook.threads and hook.threads[0] != threading.main_thread().name


async def test_concurrent_guesses_from_one_address_meet_the_limit() -> None:
    hook = BlockingAuthenticator()
    hook.release.set()
    async with running(security_config(max_failures=2), authenticator=hook) as broker:
        with trio.fail_after(10):
            clients = [await RawClient.open(broker.port) for _ in range(5)]
            for i, client in enumerate(clients):
                await client.send(Connect(f"g{i}", username="u", password=b"guess"))
            codes = sorted([(await c.expect(ConnAck)).return_code for c in clients])  # type: ignore[attr-defined]
            assert codes == [4, 4, 5, 5, 5]
            assert broker.stats()["auth_failures"] == 2
            assert broker.stats()["auth_rate_limited"] == 3
