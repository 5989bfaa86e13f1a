"""``mqttd --check-config``'s deep check (mqttd/config_check.py): a table of broken files, each
with the exact problem lines; good files, the shipped ones included."""

from __future__ import annotations

import pathlib
import socket

import pytest
import trio
import trustme

from mqttd.config_check import check_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "config"
TIME_LIMIT_S = 30  # name lookups included


@pytest.fixture
def files(tmp_path: pathlib.Path) -> pathlib.Path:
    """tmp_path with a CA, a server certificate and its key, another key, a file that is not
    PEM, a password file and an ACL file (both good)."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    server.private_key_pem.write_to_path(tmp_path / "server.key")
    ca.issue_cert("other").private_key_pem.write_to_path(tmp_path / "other.key")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "users.pw").write_text(
        "# users\nbackend:$6$BWicBPzh9HIzFLzn$ejNPhyckfzwjPuqpSI0F3DnSgPTAYQMo/OoGXAzUBSuON6ZXA"
        "+pOQQxTy+bNwV088QRexFjcdEmKzU5D/+Nslw==\n"
    )
    (tmp_path / "good.acl").write_text("topic read public/#\nuser backend\ntopic readwrite #\n")
    return tmp_path


def unresolvable_reason() -> str:
    """What this machine's resolver says of a name under the reserved .invalid TLD."""
    with pytest.raises(OSError) as excinfo:
        socket.getaddrinfo("mqttd-check.invalid", 0, type=socket.SOCK_STREAM)
    return str(excinfo.value.strerror)


async def check(path: pathlib.Path) -> list[str]:
    with trio.fail_after(TIME_LIMIT_S):
        return await trio.to_thread.run_sync(check_config, path, abandon_on_cancel=True)


TLS = "{certfile: DIR/server.pem, keyfile: DIR/server.key}"

BROKEN = [
    pytest.param(
        "limits: {max_queued_mesages: 5}\nlimts: {}\n",
        [
            "limits.max_queued_mesages: unknown key (did you mean max_queued_messages?)",
            "limts: unknown key (did you mean limits?)",
        ],
        id="unknown keys with suggestions",
    ),
    pytest.param(
        "limits: {max_inflight_messages: 0, max_queued_messages: x, overflow_policy: later}\n",
        [
            "limits.max_inflight_messages: must be at least 1, got 0",
            "limits.max_queued_messages: expected int, got 'x'",
            "limits.overflow_policy: must be one of drop_oldest, drop_new, refuse, disconnect, "
            "got 'later'",
        ],
        id="several bad values in one section",
    ),
    pytest.param(
        "listeners: [{port: 1883}, {port: 70000, protocol: carrier-pigeon}]\n",
        [
            "listeners[1].port: must be between 0 and 65535, got 70000",
            "listeners[1].protocol: must be one of mqtt, websockets, got 'carrier-pigeon'",
        ],
        id="bad list item",
    ),
    pytest.param(
        "listeners: [{port: 0, tls: {certfile: DIR/missing.pem, keyfile: DIR/server.key}}]\n",
        ["listeners[0].tls.certfile: cannot read 'DIR/missing.pem': No such file or directory"],
        id="missing TLS file",
    ),
    pytest.param(
        "listeners:\n"
        "  - {port: 0, tls: {certfile: DIR/junk.pem, keyfile: DIR/server.key, cafile: DIR}}\n"
        "  - {port: 0, tls: {certfile: DIR/server.pem, keyfile: DIR/junk.pem}}\n",
        [
            "listeners[0].tls.certfile: 'DIR/junk.pem' holds no PEM certificate",
            "listeners[0].tls.cafile: cannot read 'DIR': Is a directory",
            "listeners[1].tls.keyfile: 'DIR/junk.pem' holds no PEM private key",
        ],
        id="unparsable certificate and key",
    ),
    pytest.param(
        "listeners:\n"
        "  - {port: 0, tls: {certfile: DIR/server.pem, keyfile: DIR/other.key}}\n"
        "  - port: 0\n"
        f"    tls: {TLS[:-1]}, require_certificate: true}}\n",
        [
            "listeners[0].tls.keyfile: 'DIR/other.key' is not the key of the certificate in "
            "'DIR/server.pem'",
            "listeners[1].tls: TLS require_certificate needs a cafile to verify client "
            "certificates with",
        ],
        id="key of another certificate, client certificates without a CA",
    ),
    pytest.param(
        "bridges:\n"
        "  - {name: up, topics: [{pattern: a/#}], tls: {cafile: DIR/junk.pem}}\n"
        "  - {name: up2, topics: [{pattern: a/#}], tls: {keyfile: DIR/server.key}}\n",
        [
            "bridges[0].tls.cafile: 'DIR/junk.pem' holds no PEM certificate",
            "bridges[1].tls.keyfile: is only used with certfile (the client certificate)",
        ],
        id="bridge TLS files",
    ),
    pytest.param(
        "security: {password_file: DIR/bad.pw}\n",
        [
            "security.password_file: DIR/bad.pw:2: expected user:hash",
            "security.password_file: DIR/bad.pw:3: user 'carol': unknown password hash format "
            "(expected $7$ PBKDF2-SHA512 or $6$ SHA-512, as written by mosquitto_passwd or "
            "mqttd passwd)",
        ],
        id="password file with bad lines",
    ),
    pytest.param(
        "security: {acl_file: DIR/bad.acl, password_file: DIR/none.pw}\n",
        [
            "security.password_file: DIR/none.pw: cannot read password file: No such file or "
            "directory",
            "security.acl_file: DIR/bad.acl:3: unknown keyword 'subscribe' (expected 'topic', "
            "'user' or 'pattern')",
        ],
        id="ACL file with a bad line, missing password file",
    ),
    pytest.param(
        "listeners: [{host: broker.invalid, port: 1883}, {host: 192.0.2.1, port: 1883}]\n"
        "bridges: [{name: up, host: cloud.invalid, topics: [{pattern: a/#}]}]\n",
        [
            "listeners[0].host: cannot resolve 'broker.invalid': REASON",
            "listeners[1].host: cannot listen on 192.0.2.1: Cannot assign requested address",
            "bridges[0].host: cannot resolve 'cloud.invalid': REASON",
        ],
        id="unresolvable hosts, an address of another machine",
    ),
    pytest.param(
        "listeners:\n"
        "  - {port: 18830}\n"
        "  - {port: 0}\n"
        "  - {host: 0.0.0.0, port: 18830}\n"
        "  - {port: 0}\n"
        "  - {port: 18083}\n",
        [
            "listeners[2]: same address as listeners[0] (0.0.0.0:18830)",
            "http: same address as listeners[4] (127.0.0.1:18083)",
        ],
        id="duplicate listeners",
    ),
    pytest.param(
        "limits:\n  max_inflight_messages: 1\n  bad: : x\n",
        ["line 3, column 8: invalid YAML: mapping values are not allowed here"],
        id="bad YAML syntax",
    ),
    pytest.param(
        "limits: {max_connections: 0}\n"
        "listeners: [{port: 0, tls: {certfile: DIR/missing.pem, keyfile: DIR/server.key}}]\n"
        "security: {acl_file: DIR/bad.acl}\n",
        [
            "listeners[0].tls.certfile: cannot read 'DIR/missing.pem': No such file or directory",
            "limits.max_connections: must be -1 (no limit) or at least 1, got 0",
            "security.acl_file: DIR/bad.acl:3: unknown keyword 'subscribe' (expected 'topic', "
            "'user' or 'pattern')",
        ],
        id="a bad value does not hide missing files in other sections",
    ),
]


@pytest.mark.parametrize(("text", "problems"), BROKEN)
async def test_broken_file(files: pathlib.Path, text: str, problems: list[str]) -> None:
    (files / "bad.pw").write_text("# users\ncarol\ncarol:hunter2\n")
    (files / "bad.acl").write_text("topic read a\n\nsubscribe a\n")
    path = files / "mqttd.yaml"
    path.write_text(text.replace("DIR", str(files)))
    expected = [
        f"{path}: {line}".replace("DIR", str(files)).replace("REASON", unresolvable_reason())
        for line in problems
    ]
    assert await check(path) == expected


async def test_good_file_with_files(files: pathlib.Path) -> None:
    path = files / "mqttd.yaml"
    path.write_text(f"""
listeners:
  - {{port: 0}}
  - {{port: 0, tls: {TLS}}}
  - port: 0
    protocol: websockets
    tls: {{certfile: DIR/server.pem, keyfile: DIR/server.key, cafile: DIR/ca.pem,
           require_certificate: true}}
security: {{password_file: DIR/users.pw, acl_file: DIR/good.acl}}
bridges:
  - name: up
    host: localhost
    topics: [{{pattern: a/#}}]
    tls: {{cafile: DIR/ca.pem, certfile: DIR/server.pem, keyfile: DIR/server.key}}
""".replace("DIR", str(files)))
    assert await check(path) == []


async def test_shipped_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file under config/ passes but the TLS example, whose files are the system's."""
    monkeypatch.chdir(CONFIG_DIR.parent)  # auth-example.yaml names its files from there
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        problems = await check(path)
        if path.name == "tls-websocket.yaml":
            assert problems and all("cannot read '/etc/mqttd/" in p for p in problems[:-1])
            assert problems[-1].endswith("/etc/mqttd/passwd: cannot read password file: "
                                         "No such file or directory")
        else:
            assert problems == [], path


async def test_unreadable_config_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "none.yaml"
    assert await check(path) == [f"{path}: cannot read: No such file or directory"]
