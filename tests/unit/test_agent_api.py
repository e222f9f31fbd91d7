"""strata agent: the HTTP API on 127.0.0.1, signed with real Ed25519 keys."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_fakes import Machine, make_machine, openssh_public, ready_machine, start_api
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from strata_agent.api import ApiServer
from strata_agent.auth import Authenticator, NonceStore, sign_request

Reply = tuple[int, dict[str, object]]


ADMIN = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()


@dataclass
class Api:
    machine: Machine
    server: ApiServer

    def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def signed(
        self, method: str, path: str, body: bytes = b"", key: Ed25519PrivateKey = ADMIN, **kw: object
    ) -> Reply:
        return self.send(method, path, body, sign_request(key, method, path, body, **kw))  # type: ignore[arg-type]

    def restart(self, admin_keys: list[str] | None = None) -> None:
        self.server.stop()
        self.server = start_server(self.machine, admin_keys)


def start_server(machine: Machine, admin_keys: list[str] | None = None) -> ApiServer:
    agent, _ = machine.agent()
    return start_api(
        agent, machine, [openssh_public(ADMIN, "admin@test")] if admin_keys is None else admin_keys
    )


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    started: list[Api] = []

    def make(*, ready: bool = False, admin_keys: list[str] | None = None) -> Api:
        machine = ready_machine(tmp_path)[0] if ready else make_machine(tmp_path, activation=None)
        api = Api(machine, start_server(machine, admin_keys))
        started.append(api)
        return api

    yield make
    for api in started:
        api.server.stop()


@dataclass(frozen=True)
class Endpoint:
    path: str
    body: bytes
    needs_ready: bool
    expected: int


ACTIVATE_BODY = json.dumps({"hostname": "apibox", "admin": {"user": "ops"}}).encode()
ENDPOINTS = {
    "activate": Endpoint("/activate", ACTIVATE_BODY, needs_ready=False, expected=202),
    "reboot": Endpoint("/reboot", b"", needs_ready=False, expected=202),
    "shutdown": Endpoint("/shutdown", b"", needs_ready=False, expected=202),
    "rerun": Endpoint("/steps/wait-workloads/rerun", b"", needs_ready=True, expected=202),
}
endpoints = pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=list(ENDPOINTS))


@endpoints
def test_missing_headers_401(make_api: Callable[..., Api], endpoint: Endpoint) -> None:
    api = make_api(ready=endpoint.needs_ready)
    status, reply = api.send("POST", endpoint.path, endpoint.body)
    assert status == 401 and "signed request required" in str(reply["error"])
    partial = sign_request(ADMIN, "POST", endpoint.path, endpoint.body)
    del partial["X-Strata-Signature"]
    assert api.send("POST", endpoint.path, endpoint.body, partial)[0] == 401


@endpoints
def test_other_key_403(make_api: Callable[..., Api], endpoint: Endpoint) -> None:
    api = make_api(ready=endpoint.needs_ready)
    status, reply = api.signed("POST", endpoint.path, endpoint.body, key=STRANGER)
    assert status == 403 and "bad signature" in str(reply["error"])


@endpoints
def test_tampered_body_or_path_403(make_api: Callable[..., Api], endpoint: Endpoint) -> None:
    api = make_api(ready=endpoint.needs_ready)
    headers = sign_request(ADMIN, "POST", endpoint.path, endpoint.body)
    assert api.send("POST", endpoint.path, endpoint.body + b" ", headers)[0] == 403
    headers = sign_request(ADMIN, "POST", endpoint.path, endpoint.body)
    assert api.send("POST", endpoint.path + "?x=1", endpoint.body, headers)[0] == 403
    headers = sign_request(ADMIN, "PUT", endpoint.path, endpoint.body)
    assert api.send("POST", endpoint.path, endpoint.body, headers)[0] == 403


@endpoints
@pytest.mark.parametrize("skew", [-301, 301, -86400])
def test_timestamp_outside_window_403(make_api: Callable[..., Api], endpoint: Endpoint, skew: int) -> None:
    api = make_api(ready=endpoint.needs_ready)
    status, reply = api.signed("POST", endpoint.path, endpoint.body, timestamp=int(time.time()) + skew)
    assert status == 403 and "window" in str(reply["error"])


@endpoints
def test_valid_request_then_replay_403_also_after_restart(
    make_api: Callable[..., Api], endpoint: Endpoint
) -> None:
    api = make_api(ready=endpoint.needs_ready)
    headers = sign_request(ADMIN, "POST", endpoint.path, endpoint.body, timestamp=int(time.time()) - 250)
    status, _ = api.send("POST", endpoint.path, endpoint.body, headers)
    assert status == endpoint.expected
    status, reply = api.send("POST", endpoint.path, endpoint.body, headers)
    assert status == 403 and "nonce already used" in str(reply["error"])
    api.restart()
    assert api.send("POST", endpoint.path, endpoint.body, headers)[0] == 403
    fresh = sign_request(ADMIN, "POST", endpoint.path, endpoint.body)
    assert api.send("POST", endpoint.path, endpoint.body, fresh)[0] != 403  # the restarted API does answer


@endpoints
def test_no_admin_keys_403_naming_the_setting(make_api: Callable[..., Api], endpoint: Endpoint) -> None:
    api = make_api(ready=endpoint.needs_ready, admin_keys=[])
    status, reply = api.signed("POST", endpoint.path, endpoint.body)
    assert status == 403 and "layers.agent.admin_keys" in str(reply["error"])


def test_nonce_recorded_only_after_the_signature_verifies(make_api: Callable[..., Api]) -> None:
    api = make_api()
    forged = sign_request(STRANGER, "POST", "/reboot", nonce="n" * 20)
    assert api.send("POST", "/reboot", b"", forged)[0] == 403
    assert api.signed("POST", "/reboot", nonce="n" * 20)[0] == 202


@pytest.mark.parametrize("nonce", ["short", "x" * 65, "has space in it!!", "ünïcödé-nonce-1234"])
def test_malformed_nonce_403(make_api: Callable[..., Api], nonce: str) -> None:
    api = make_api()
    headers = sign_request(ADMIN, "POST", "/reboot")
    headers["X-Strata-Nonce"] = nonce.encode().decode("latin-1")
    assert api.send("POST", "/reboot", b"", headers)[0] == 403


def test_garbage_signature_and_timestamp_403(make_api: Callable[..., Api]) -> None:
    api = make_api()
    headers = sign_request(ADMIN, "POST", "/reboot")
    assert api.send("POST", "/reboot", b"", {**headers, "X-Strata-Signature": "not base64!"})[0] == 403
    assert api.send("POST", "/reboot", b"", {**headers, "X-Strata-Timestamp": "soon"})[0] == 403


def test_reboot_and_shutdown_run_systemctl_after_answering(make_api: Callable[..., Api]) -> None:
    api = make_api()
    assert api.signed("POST", "/reboot") == (202, {"action": "reboot"})
    assert api.signed("POST", "/shutdown") == (202, {"action": "poweroff"})
    deadline = time.monotonic() + 5
    while len(api.machine.system.power) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(api.machine.system.power) == ["poweroff", "reboot"]


def test_unknown_paths_and_methods_are_authenticated_first(make_api: Callable[..., Api]) -> None:
    api = make_api()
    unknown = [("GET", "/nope"), ("POST", "/nope"), ("DELETE", "/status"), ("GET", "/"), ("PURGE", "/x")]
    for method, path in unknown:
        status, reply = api.send(method, path)
        assert status == 401, (method, path)
        assert "error" in reply
    assert api.signed("GET", "/nope")[0] == 404
    assert api.signed("DELETE", "/status")[0] == 404
    assert api.signed("PURGE", "/x")[0] == 404
    assert api.signed("POST", "/steps/no-such-step/rerun")[0] == 404


def test_status_is_open_and_free_of_secrets(make_api: Callable[..., Api]) -> None:
    api = make_api(ready=True)
    status, reply = api.send("GET", "/status")
    assert status == 200
    assert (reply["state"], reply["node_name"], reply["node_ip"]) == ("ready", "box1-0123abcd", "10.0.0.5")
    assert reply["hostname"] == "box1" and reply["activation_source"] == "file"
    assert reply["addresses"] == [{"interface": "eth0", "address": "10.0.0.5", "prefix": 24}]
    assert reply["gpu"]["present"] is True and reply["version"]
    steps = reply["steps"]
    assert isinstance(steps, list) and [s["status"] for s in steps] == ["done"] * 10
    text = json.dumps(reply)
    token = json.loads(api.machine.paths.identity_file.read_text())["token"]
    assert token not in text and "$6$salt$hash" not in text and "password_hash" not in text
    assert api.send("GET", "/status?verbose=1")[0] == 200


def test_activate_via_api(make_api: Callable[..., Api]) -> None:
    api = make_api()
    assert api.signed("POST", "/activate", b'{"hostname": "Bad_Name"}')[0] == 400
    status, reply = api.signed("POST", "/activate", b'{"hostnam": "x"}')
    assert status == 400 and "unknown key 'hostnam'" in str(reply["error"])
    assert api.signed("POST", "/activate", b"not json")[0] == 400
    status, reply = api.signed("POST", "/activate", ACTIVATE_BODY)
    assert (status, reply["state"]) == (202, "activating")
    assert api.machine.state()["activation"]["source"] == "api"
    assert api.machine.state()["activation"]["admin"]["user"] == "ops"
    status, reply = api.signed("POST", "/activate", ACTIVATE_BODY)
    assert status == 409 and "already activated" in str(reply["error"])


def test_rerun_conflicts(make_api: Callable[..., Api]) -> None:
    api = make_api()
    status, reply = api.signed("POST", "/steps/hostname/rerun")
    assert status == 409 and "not activated" in str(reply["error"])
    assert api.signed("POST", "/activate", ACTIVATE_BODY)[0] == 202
    api.server.agent.state.current_step = "hostname"
    status, reply = api.signed("POST", "/steps/gpu/rerun")
    assert status == 409 and "running" in str(reply["error"])


def test_rerun_marks_steps_pending(make_api: Callable[..., Api]) -> None:
    api = make_api(ready=True)
    assert api.signed("POST", "/steps/write-manifests/rerun") == (202, {"rerun": "write-manifests"})
    state = api.machine.state()
    assert state["state"] == "deploying"
    assert state["steps"]["write-manifests"]["status"] == "pending"
    assert state["steps"]["wait-node"]["status"] == "done"


def test_query_string_is_part_of_the_signature(make_api: Callable[..., Api]) -> None:
    api = make_api()
    assert api.signed("POST", "/reboot?when=now")[0] == 202


def test_nonces_are_pruned_after_the_window(tmp_path: Path) -> None:
    store = NonceStore(tmp_path / "nonces.json")
    assert store.use("a" * 16, expires=1000, now=900)
    assert not store.use("a" * 16, expires=1000, now=999)
    assert store.use("b" * 16, expires=2000, now=1001)  # prunes a...
    assert json.loads((tmp_path / "nonces.json").read_text()) == {"b" * 16: 2000}
    assert not NonceStore(tmp_path / "nonces.json").use("b" * 16, expires=2000, now=1500)


def test_non_ed25519_and_broken_admin_keys_are_skipped() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    ecdsa_line = ecdsa.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    lines = [ecdsa_line, "ssh-ed25519 garbage", openssh_public(ADMIN, "me")]
    auth = Authenticator(lines, 300, NonceStore(None))
    assert [key.comment for key in auth.keys] == ["me"]
