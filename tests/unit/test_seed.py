"""Unit tests for builder.seed: the cloud-init NoCloud files and the `cidata` seed ISO."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml

from builder import seed as seed_module
from builder.seed import SEED_FILES, Seed, write_seed_iso

KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF7pbyoBN1lY8Hx5J0kPU7B0wbYVh6tjD7ZCq8nkLZ7f alice@example",
    'ssh-rsa AAAAB3Nza "quoted": comment # not a yaml comment',
]
HASH = "$6$saltsalt$abc/def.ghi:jkl"


@pytest.fixture
def full_seed() -> Seed:
    return Seed(
        hostname="node-1",
        ssh_authorized_keys=list(KEYS),
        password_hash=HASH,
        root_login=True,
        instance_id="iid-unit-test",
    )


def test_files_are_the_three_seed_files(full_seed: Seed) -> None:
    files = full_seed.files()
    assert list(files) == list(SEED_FILES) == ["user-data", "meta-data", "network-config"]
    assert all(isinstance(data, bytes) for data in files.values())


def test_user_data(full_seed: Seed) -> None:
    text = full_seed.files()["user-data"].decode()
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["hostname"] == "node-1"
    assert data["preserve_hostname"] is False
    assert data["disable_root"] is False
    assert data["ssh_authorized_keys"] == KEYS
    assert data["chpasswd"]["expire"] is False
    assert data["chpasswd"]["users"] == [{"name": "root", "password": HASH, "type": "hash"}]


def test_user_data_without_keys_password_or_root() -> None:
    text = Seed(hostname="plain", root_login=False, instance_id="iid-x").files()["user-data"].decode()
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["disable_root"] is True
    assert "ssh_authorized_keys" not in data
    assert "chpasswd" not in data
    assert data["hostname"] == "plain"


def test_meta_data(full_seed: Seed) -> None:
    data = yaml.safe_load(full_seed.files()["meta-data"])
    assert data == {"instance-id": "iid-unit-test", "local-hostname": "node-1"}


def test_network_config(full_seed: Seed) -> None:
    data = yaml.safe_load(full_seed.files()["network-config"])
    assert data["version"] == 2
    [wired] = data["ethernets"].values()
    assert wired["dhcp4"] is True
    assert wired["match"]["name"] == "e*"


def test_default_instance_ids_are_unique() -> None:
    a, b = Seed(hostname="a"), Seed(hostname="a")
    assert a.instance_id.startswith("iid-")
    assert a.instance_id != b.instance_id
    assert yaml.safe_load(a.files()["meta-data"])["instance-id"] == a.instance_id


def _read_iso(path: Path) -> tuple[str, dict[str, dict[str, bytes]]]:
    """The volume id, and each seed file as read through Rock Ridge, Joliet and plain ISO 9660."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        volume = iso.pvd.volume_identifier.decode().strip()
        found: dict[str, dict[str, bytes]] = {}
        for name in SEED_FILES:
            views = {
                "rr_path": f"/{name}",
                "joliet_path": f"/{name}",
                "iso_path": "/" + name.upper().replace("-", "_") + ".;1",
            }
            for kind, iso_path in views.items():
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: iso_path})
                found.setdefault(name, {})[kind] = out.getvalue()
        return volume, found
    finally:
        iso.close()


def test_write_seed_iso_round_trips(tmp_path: Path, full_seed: Seed) -> None:
    out = tmp_path / "seed.iso"
    assert write_seed_iso(full_seed, out) == out
    volume, found = _read_iso(out)
    assert volume == "cidata"
    expected = full_seed.files()
    for name in SEED_FILES:
        assert found[name] == {
            "rr_path": expected[name],
            "joliet_path": expected[name],
            "iso_path": expected[name],
        }
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_write_seed_iso_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "seed.iso"
    out.write_bytes(b"not an iso")
    write_seed_iso(Seed(hostname="first", instance_id="iid-1"), out)
    write_seed_iso(Seed(hostname="second", instance_id="iid-2"), out)
    _, found = _read_iso(out)
    assert yaml.safe_load(found["meta-data"]["rr_path"]) == {
        "instance-id": "iid-2",
        "local-hostname": "second",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


@pytest.mark.skipif(shutil.which("blkid") is None, reason="needs blkid")
def test_seed_iso_label_as_cloud_init_sees_it(tmp_path: Path, full_seed: Seed) -> None:
    out = write_seed_iso(full_seed, tmp_path / "seed.iso")
    probe = subprocess.run(
        ["blkid", "-p", "-o", "export", str(out)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660"
    assert fields["LABEL"] == "cidata"


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="needs xorriso")
def test_seed_iso_lists_with_xorriso(tmp_path: Path, full_seed: Seed) -> None:
    out = write_seed_iso(full_seed, tmp_path / "seed.iso")
    listing = subprocess.run(
        ["xorriso", "-indev", str(out), "-find", "/", "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = sorted(line.strip().strip("'").lstrip("/") for line in listing.splitlines() if line.strip())
    assert names == sorted(SEED_FILES)


def test_failed_write_leaves_no_temp_file(
    tmp_path: Path, full_seed: Seed, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_close(self: pycdlib.PyCdlib) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(seed_module.pycdlib.PyCdlib, "close", broken_close)
    out = tmp_path / "seed.iso"
    with pytest.raises(OSError, match="disk full"):
        write_seed_iso(full_seed, out)
    assert list(tmp_path.iterdir()) == []
