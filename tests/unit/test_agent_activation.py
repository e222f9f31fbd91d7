"""strata agent: activation documents and their sources (file, boot medium, kernel command line)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from agent_fakes import KEY_A, FakeRunner, FakeSystem, make_machine, make_root
from strata_agent.activation import ActivationError, ActivationSources, parse_activation, parse_cmdline
from strata_agent.config import Defaults
from strata_agent.paths import Paths

DEFAULTS = Defaults(hostname="strata", domain="strata.local", admin_user="strata")


def _sources(root: Path) -> tuple[ActivationSources, FakeRunner]:
    runner = FakeRunner(FakeSystem(root))
    return ActivationSources(Paths(root), runner, DEFAULTS), runner


def _boot_medium(root: Path, label: str, files: dict[str, str]) -> None:
    """A filesystem labelled `label`: /dev/disk/by-label/<label> -> a folder the fake mount copies."""
    medium = root / "media" / label
    medium.mkdir(parents=True)
    for name, text in files.items():
        (medium / name).write_text(text)
    by_label = root / "dev/disk/by-label"
    by_label.mkdir(parents=True, exist_ok=True)
    (by_label / label).symlink_to(medium)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# -- the document


def test_full_document() -> None:
    doc = {
        "hostname": "Box1",
        "domain": "Example.COM",
        "admin": {"user": "olares", "password_hash": "$6$s$h", "ssh_keys": [KEY_A, KEY_A]},
        "node_ip": "10.0.0.5",
        "join": {"server": "https://10.0.0.1:6443", "token": "K10abc"},
    }
    act = parse_activation(doc, "file", DEFAULTS)
    assert (act.hostname, act.domain, act.fqdn) == ("box1", "example.com", "box1.example.com")
    assert act.admin_user == "olares" and act.password_hash == "$6$s$h"
    assert act.ssh_keys == (KEY_A,)  # each key once
    assert act.node_ip == "10.0.0.5" and act.role == "agent"
    view = json.dumps(act.public_view())
    assert "$6$s$h" not in view and "K10abc" not in view and "https://10.0.0.1:6443" in view


def test_defaults_fill_an_empty_document() -> None:
    act = parse_activation(None, "file", DEFAULTS)
    assert (act.hostname, act.domain, act.admin_user, act.role) == (
        "strata",
        "strata.local",
        "strata",
        "server",
    )
    assert act.ssh_keys == () and act.password_hash is None and act.node_ip is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"hostnme": "x"}, "file: unknown key 'hostnme'"),
        ({"admin": {"user": "a", "sshkeys": []}}, "file: unknown key admin.'sshkeys'"),
        ({"join": {"server": "https://a:6443", "token": "t", "x": 1}}, "file: unknown key join.'x'"),
        ({"hostname": "-bad"}, "not an RFC 1123 label"),
        ({"hostname": "a" * 64}, "not an RFC 1123 label"),
        ({"hostname": "under_score"}, "not an RFC 1123 label"),
        ({"domain": "exa mple.com"}, "not a DNS name"),
        ({"admin": {"user": "Root!"}}, "user name 'Root!' is not valid"),
        ({"node_ip": "10.0.0.500"}, "is not an IP address"),
        ({"join": {"server": "https://10.0.0.1:6443"}}, "join needs both server and token"),
        ({"join": {"server": "http://10.0.0.1:6443", "token": "t"}}, "must be an https:// URL"),
        ({"admin": {"ssh_keys": "ssh-ed25519 AAAA"}}, "admin.ssh_keys must be a list"),
        ({"admin": {"password_hash": "a:b"}}, "crypt(3) hash"),
        ({"hostname": 12}, "hostname must be a non-empty single-line string"),
        (["hostname"], "must be a mapping"),
    ],
)
def test_invalid_documents_are_rejected_naming_the_problem(doc: object, message: str) -> None:
    with pytest.raises(ActivationError) as err:
        parse_activation(doc, "file", DEFAULTS)
    assert message in str(err.value)
    assert str(err.value).startswith("file: ")


# -- kernel command line


def test_cmdline_individual_keys() -> None:
    doc = parse_cmdline(
        "BOOT_IMAGE=/vmlinuz ro strata.hostname=edge7 strata.domain=lab.example strata.admin_user=ops "
        "strata.server=https://10.1.1.1:6443 strata.token=K10xyz quiet"
    )
    assert doc == {
        "hostname": "edge7",
        "domain": "lab.example",
        "admin": {"user": "ops"},
        "join": {"server": "https://10.1.1.1:6443", "token": "K10xyz"},
    }


def test_cmdline_base64_document_and_individual_keys_override_it() -> None:
    encoded = _b64("hostname: fromb64\nadmin: {user: ops, ssh_keys: ['" + KEY_A + "']}\n")
    doc = parse_cmdline(f"ro strata.admin_user=override strata.activation={encoded}")
    assert doc == {"hostname": "fromb64", "admin": {"user": "override", "ssh_keys": [KEY_A]}}


def test_cmdline_base64_json_is_accepted() -> None:
    assert parse_cmdline("strata.activation=" + _b64(json.dumps({"hostname": "j1"}))) == {"hostname": "j1"}


def test_cmdline_without_strata_keys_has_no_activation() -> None:
    assert parse_cmdline("BOOT_IMAGE=/vmlinuz root=UUID=1 ro console=ttyS0 strata") is None


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("strata.hostnme=x", "cmdline: unknown key strata.hostnme"),
        ("strata.activation=!!!notbase64", "not base64url"),
        ("strata.activation=" + _b64("- a list"), "must decode to a mapping"),
    ],
)
def test_cmdline_errors(cmdline: str, message: str) -> None:
    with pytest.raises(ActivationError) as err:
        parse_cmdline(cmdline)
    assert str(err.value).startswith("cmdline: ") and message in str(err.value)


# -- sources


def test_file_source(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation="hostname: filebox\n")
    sources, _ = _sources(root)
    act = sources.find()
    assert act is not None and act.hostname == "filebox" and act.source == "file"


def test_boot_medium_source_mounts_read_only_and_unmounts(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation=None)
    _boot_medium(root, "CIDATA", {"user-data": "#cloud-config\n", "activation.yaml": "hostname: seeded\n"})
    sources, runner = _sources(root)
    act = sources.find()
    assert act is not None and act.hostname == "seeded" and act.source == "boot-medium:CIDATA"
    mount = [call for call in runner.calls if call[0] == "mount"]
    assert len(mount) == 1 and mount[0][:4] == ("mount", "-o", "ro", str(root / "dev/disk/by-label/CIDATA"))
    assert runner.calls[-1] == ("umount", mount[0][4])
    assert runner.system.mounted == {}
    assert not Path(mount[0][4]).exists()  # the temporary mount point is gone


def test_boot_medium_without_activation_is_read_once(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation=None)
    _boot_medium(root, "cidata", {"user-data": "#cloud-config\n", "meta-data": "instance-id: x\n"})
    sources, runner = _sources(root)
    assert sources.find() is None
    assert sources.find() is None
    assert runner.count("mount") == 1 and runner.count("umount") == 1


def test_boot_medium_label_dir_is_configurable(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation=None)
    _boot_medium(root, "STRATA", {"activation.yaml": "hostname: custom\n"})
    elsewhere = tmp_path / "labels"
    (root / "dev/disk/by-label").rename(elsewhere)
    runner = FakeRunner(FakeSystem(root))
    assert ActivationSources(Paths(root), runner, DEFAULTS).find() is None
    found = ActivationSources(Paths(root), runner, DEFAULTS, label_dir=elsewhere).find()
    assert found is not None and found.hostname == "custom"


def test_cmdline_source(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation=None)
    (root / "proc/cmdline").write_text("ro quiet strata.hostname=kernel1\n")
    sources, _ = _sources(root)
    act = sources.find()
    assert act is not None and act.hostname == "kernel1" and act.source == "cmdline"


def test_precedence_file_then_boot_medium_then_cmdline(tmp_path: Path) -> None:
    root = make_root(tmp_path, activation="hostname: fromfile\n")
    _boot_medium(root, "cidata", {"activation.yaml": "hostname: frommedium\n"})
    (root / "proc/cmdline").write_text("strata.hostname=fromcmdline\n")
    sources, runner = _sources(root)
    assert sources.find().hostname == "fromfile"  # type: ignore[union-attr]
    assert runner.count("mount") == 0  # the medium is not even looked at
    (root / "etc/strata/activation.yaml").unlink()
    assert sources.find().hostname == "frommedium"  # type: ignore[union-attr]
    (root / "dev/disk/by-label/cidata").unlink()
    assert sources.find().hostname == "fromcmdline"  # type: ignore[union-attr]


def test_invalid_source_keeps_waiting_and_reports_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    machine = make_machine(tmp_path, activation="hostname: ok\ncolour: blue\n")
    agent, _ = machine.agent()
    assert not agent.poll_activation()
    assert not agent.poll_activation()
    assert agent.current_state == "waiting-for-activation"
    assert agent.activation_error is not None and "unknown key 'colour'" in agent.activation_error
    assert agent.status()["activation_error"] == agent.activation_error
    assert sum("activation rejected" in r.message for r in caplog.records) == 1
    # Fixed by hand: the next poll activates.
    (machine.root / "etc/strata/activation.yaml").write_text("hostname: ok\n")
    assert agent.poll_activation()
    assert agent.current_state == "activating" and agent.activation_error is None


def test_daemon_keeps_looking_until_a_source_appears(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, activation=None)
    agent, _ = machine.agent()
    assert not agent.poll_activation()
    (machine.root / "proc/cmdline").write_text("strata.hostname=late\n")
    assert agent.poll_activation()
    assert machine.state()["activation"]["source"] == "cmdline"
    assert machine.state()["activation"]["hostname"] == "late"
