"""Tests for builder.oci: reproducible oci-archive builds and archive inspection."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from helpers import write_tar

from builder import oci
from builder.errors import StrataError
from builder.oci import build_oci_archive, image_tag, inspect_archive, normalize_ref

REF = "localhost/strata/hello:2.10"
EPOCH = 1_700_000_000


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/sbin").mkdir()
    (root / "etc").mkdir()
    (root / "var/empty").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/motd").chmod(0o644)
    hello = root / "usr/bin/hello"
    hello.write_bytes(b"#!/bin/sh\necho hello\n")
    hello.chmod(0o755)
    helper = root / "usr/bin/helper"
    helper.write_bytes(b"setuid helper")
    helper.chmod(0o4755)
    os.link(hello, root / "usr/sbin/hello")
    (root / "usr/bin/hi").symlink_to("hello")
    os.mkfifo(root / "run/fifo")
    return root


def _build(rootfs: Path, out: Path, **kwargs: Any) -> oci.OciImage:
    return build_oci_archive(rootfs, out, REF, cmd=["/usr/bin/hello"], epoch=EPOCH, **kwargs)


def _read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: _read_member(tar, m) for m in tar.getmembers() if m.isreg()}


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    content = tar.extractfile(member)
    assert content is not None
    return content.read()


def _blob(files: dict[str, bytes], digest: str) -> bytes:
    return files["blobs/sha256/" + digest.removeprefix("sha256:")]


def _documents(files: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    index = json.loads(files["index.json"])
    manifest = json.loads(_blob(files, index["manifests"][0]["digest"]))
    config = json.loads(_blob(files, manifest["config"]["digest"]))
    return index, manifest, config


def _layer_members(files: dict[str, bytes]) -> list[tarfile.TarInfo]:
    _, manifest, _ = _documents(files)
    layer = _blob(files, manifest["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return tar.getmembers()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- build


def test_archive_has_oci_layout_and_index_annotations(rootfs: Path, tmp_path: Path) -> None:
    image = _build(rootfs, tmp_path / "out/hello.tar")
    files = _read_archive(image.archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index, manifest, _ = _documents(files)
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [descriptor] = index["manifests"]
    assert descriptor["annotations"] == {
        "io.containerd.image.name": REF,
        "org.opencontainers.image.ref.name": "2.10",
    }
    assert descriptor["digest"] == image.manifest_digest
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert manifest["config"]["digest"] == image.config_digest
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer["digest"] == image.layer_digest
    assert image.ref == REF
    assert image.size == image.archive.stat().st_size


def test_every_blob_matches_its_digest_and_size(rootfs: Path, tmp_path: Path) -> None:
    files = _read_archive(_build(rootfs, tmp_path / "hello.tar").archive)
    blobs = {name: data for name, data in files.items() if name.startswith("blobs/sha256/")}
    assert len(blobs) == 3
    for name, data in blobs.items():
        assert hashlib.sha256(data).hexdigest() == name.removeprefix("blobs/sha256/")
    index, manifest, _ = _documents(files)
    for descriptor in [index["manifests"][0], manifest["config"], *manifest["layers"]]:
        assert len(_blob(files, descriptor["digest"])) == descriptor["size"]


def test_config_describes_runtime_and_diff_id(rootfs: Path, tmp_path: Path) -> None:
    image = build_oci_archive(
        rootfs,
        tmp_path / "hello.tar",
        REF,
        entrypoint=["/usr/bin/hello"],
        cmd=["--loud"],
        workdir="/srv",
        arch="arm64",
        epoch=EPOCH,
    )
    files = _read_archive(image.archive)
    _, manifest, config = _documents(files)
    assert config["architecture"] == "arm64"
    assert config["os"] == "linux"
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["config"] == {
        "Entrypoint": ["/usr/bin/hello"],
        "Cmd": ["--loud"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/srv",
    }
    assert config["history"]
    layer = gzip.decompress(_blob(files, manifest["layers"][0]["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [_sha256(layer)]}


def test_custom_env_replaces_default(rootfs: Path, tmp_path: Path) -> None:
    files = _read_archive(_build(rootfs, tmp_path / "hello.tar", env=["A=1"]).archive)
    assert _documents(files)[2]["config"]["Env"] == ["A=1"]


def test_json_is_compact_with_sorted_keys(rootfs: Path, tmp_path: Path) -> None:
    files = _read_archive(_build(rootfs, tmp_path / "hello.tar").archive)
    raw = files["index.json"]
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


def test_layer_entries_preserve_tree(rootfs: Path, tmp_path: Path) -> None:
    members = {
        m.name.rstrip("/"): m
        for m in _layer_members(_read_archive(_build(rootfs, tmp_path / "o.tar").archive))
    }
    assert set(members) == {
        "etc",
        "etc/motd",
        "run",
        "usr",
        "usr/bin",
        "usr/bin/hello",
        "usr/bin/helper",
        "usr/bin/hi",
        "usr/sbin",
        "usr/sbin/hello",
        "var",
        "var/empty",
    }
    assert members["var/empty"].isdir()
    assert members["usr/bin/hi"].issym() and members["usr/bin/hi"].linkname == "hello"
    hardlink = members["usr/sbin/hello"]
    assert hardlink.type == tarfile.LNKTYPE and hardlink.linkname == "usr/bin/hello"
    assert members["usr/bin/helper"].mode == 0o4755
    assert members["usr/bin/hello"].mode == 0o755
    assert members["etc/motd"].mode == 0o644
    source = (rootfs / "usr/bin/hello").lstat()
    assert (members["usr/bin/hello"].uid, members["usr/bin/hello"].gid) == (source.st_uid, source.st_gid)
    assert all(m.uname == "" and m.gname == "" for m in members.values())


def test_layer_entries_are_sorted_relative_and_clamped(rootfs: Path, tmp_path: Path) -> None:
    members = _layer_members(_read_archive(_build(rootfs, tmp_path / "o.tar").archive))
    names = [m.name.rstrip("/") for m in members]
    assert names == sorted(names)
    assert not any(name.startswith(("/", "./")) for name in names)
    assert {m.mtime for m in members} == {EPOCH}


def test_layer_gzip_header_is_reproducible(rootfs: Path, tmp_path: Path) -> None:
    files = _read_archive(_build(rootfs, tmp_path / "o.tar").archive)
    _, manifest, _ = _documents(files)
    layer = _blob(files, manifest["layers"][0]["digest"])
    assert layer[:2] == b"\x1f\x8b"
    assert layer[3] & 0x08 == 0  # no FNAME
    assert layer[4:8] == b"\0\0\0\0"  # mtime


def test_builds_are_byte_reproducible(rootfs: Path, tmp_path: Path) -> None:
    first = _build(rootfs, tmp_path / "a/hello.tar")
    os.utime(rootfs / "etc/motd", (1, 1))
    second = _build(rootfs, tmp_path / "b/hello.tar")
    assert first.archive.read_bytes() == second.archive.read_bytes()
    assert (first.manifest_digest, first.layer_digest) == (second.manifest_digest, second.layer_digest)


def test_failed_build_leaves_no_output_or_temp_file(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "hello.tar"

    def fail_midway(archive: io.BufferedWriter, *args: Any) -> None:
        archive.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(oci, "_write_layout", fail_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _build(rootfs, out)
    assert list(out_dir.iterdir()) == []


def test_failed_build_keeps_previous_archive(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "hello.tar"
    previous = _build(rootfs, out).archive.read_bytes()

    def fail(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(oci, "_add_tree", fail)
    with pytest.raises(RuntimeError):
        _build(rootfs, out)
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.tar", "rootfs"]


@pytest.mark.parametrize(
    "ref",
    [
        "hello",
        "localhost/strata/hello",
        "Strata/hello:1",
        "hello:bad tag",
        "hello:",
        "hello@sha256:" + "a" * 64,
    ],
)
def test_bad_ref_is_rejected(rootfs: Path, tmp_path: Path, ref: str) -> None:
    with pytest.raises(StrataError, match="expected") as error:
        build_oci_archive(rootfs, tmp_path / "o.tar", ref)
    assert repr(ref) in str(error.value)
    assert not (tmp_path / "o.tar").exists()


def test_missing_rootfs_is_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StrataError, match=re.escape(str(missing))):
        build_oci_archive(missing, tmp_path / "o.tar", REF)


def test_archive_inside_rootfs_is_rejected(rootfs: Path) -> None:
    with pytest.raises(StrataError, match="outside"):
        build_oci_archive(rootfs, rootfs / "o.tar", REF)


def test_unknown_arch_is_rejected(rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(StrataError, match="x86_64"):
        build_oci_archive(rootfs, tmp_path / "o.tar", REF, arch="x86_64")


# --------------------------------------------------------------------------- refs


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox:1", "docker.io/library/busybox:1"),
        ("foo/bar:1", "docker.io/foo/bar:1"),
        ("docker.io/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("index.docker.io/foo/bar:1", "docker.io/foo/bar:1"),
        ("localhost/x:1", "localhost/x:1"),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
        ("reg.example:5000/x:1", "reg.example:5000/x:1"),
        ("ghcr.io/org/app_1.x-y:2.0_rc-1", "ghcr.io/org/app_1.x-y:2.0_rc-1"),
    ],
)
def test_normalize_ref(ref: str, expected: str) -> None:
    assert normalize_ref(ref) == expected


def test_short_ref_is_normalized_in_annotation(rootfs: Path, tmp_path: Path) -> None:
    image = build_oci_archive(rootfs, tmp_path / "o.tar", "hello:1")
    assert image.ref == "docker.io/library/hello:1"
    assert inspect_archive(image.archive).refs == ("docker.io/library/hello:1",)


def test_image_tag() -> None:
    assert image_tag(REF) == "2.10"
    assert image_tag("reg.example:5000/x:latest") == "latest"


# --------------------------------------------------------------------------- inspect


def test_inspect_own_archive(rootfs: Path, tmp_path: Path) -> None:
    image = _build(rootfs, tmp_path / "hello.tar")
    info = inspect_archive(image.archive)
    assert (info.path, info.kind, info.refs) == (image.archive, "oci", (REF,))


def test_inspect_gzip_compressed_archive(rootfs: Path, tmp_path: Path) -> None:
    image = _build(rootfs, tmp_path / "hello.tar")
    compressed = tmp_path / "hello-compressed.tar"  # detected by magic, not by name
    compressed.write_bytes(gzip.compress(image.archive.read_bytes()))
    assert inspect_archive(compressed).refs == (REF,)


def test_inspect_falls_back_to_ref_name_annotation(rootfs: Path, tmp_path: Path) -> None:
    files = _read_archive(_build(rootfs, tmp_path / "hello.tar").archive)
    index = json.loads(files["index.json"])
    del index["manifests"][0]["annotations"]["io.containerd.image.name"]
    files["index.json"] = json.dumps(index).encode()
    write_tar(tmp_path / "edited.tar", files)
    assert inspect_archive(tmp_path / "edited.tar").refs == ("2.10",)


def _docker_archive(path: Path) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["busybox:1", "reg.example:5000/x:2"],
            "Layers": ["abc/layer.tar"],
        }
    ]
    write_tar(
        path,
        {
            "manifest.json": json.dumps(manifest).encode(),
            config_name: config,
            "abc/layer.tar": layer.getvalue(),
        },
    )


def test_inspect_docker_archive(tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    _docker_archive(archive)
    info = inspect_archive(archive)
    assert (info.kind, info.refs) == ("docker", ("busybox:1", "reg.example:5000/x:2"))


def test_inspect_docker_archive_with_missing_layer(tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    _docker_archive(archive)
    files = _read_archive(archive)
    del files["abc/layer.tar"]
    write_tar(archive, files)
    with pytest.raises(StrataError, match=r"abc/layer.tar.*missing"):
        inspect_archive(archive)


@pytest.mark.parametrize("which", ["config", "layer"])
def test_inspect_detects_corrupted_blob(rootfs: Path, tmp_path: Path, which: str) -> None:
    image = _build(rootfs, tmp_path / "hello.tar")
    files = _read_archive(image.archive)
    digest = image.config_digest if which == "config" else image.layer_digest
    name = "blobs/sha256/" + digest.removeprefix("sha256:")
    original = files[name]
    files[name] = original[:-1] + bytes([original[-1] ^ 0xFF])
    corrupt = tmp_path / "corrupt.tar"
    write_tar(corrupt, files)
    with pytest.raises(StrataError, match="digest mismatch") as error:
        inspect_archive(corrupt)
    assert str(corrupt) in str(error.value)


def test_inspect_detects_missing_blob(rootfs: Path, tmp_path: Path) -> None:
    image = _build(rootfs, tmp_path / "hello.tar")
    files = _read_archive(image.archive)
    del files["blobs/sha256/" + image.layer_digest.removeprefix("sha256:")]
    write_tar(tmp_path / "partial.tar", files)
    with pytest.raises(StrataError, match="missing"):
        inspect_archive(tmp_path / "partial.tar")


def test_inspect_rejects_non_tar(tmp_path: Path) -> None:
    junk = tmp_path / "app.tar"
    junk.write_bytes(b"this is not an image archive\n" * 200)
    with pytest.raises(StrataError, match="not a readable tar archive") as error:
        inspect_archive(junk)
    assert str(junk) in str(error.value)


def test_inspect_rejects_tar_of_neither_format(tmp_path: Path) -> None:
    other = tmp_path / "app.tar"
    write_tar(other, {"hello.txt": b"hi"})
    with pytest.raises(StrataError, match="not an OCI or docker archive"):
        inspect_archive(other)


def test_inspect_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StrataError, match="not found"):
        inspect_archive(tmp_path / "nope.tar")


# --------------------------------------------------------------------------- skopeo


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_accepts_archive(rootfs: Path, tmp_path: Path) -> None:
    image = build_oci_archive(rootfs, tmp_path / "hello.tar", REF, cmd=["/usr/bin/hello"], arch="arm64")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{image.archive}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    inspected = json.loads(result.stdout)
    assert inspected["Architecture"] == "arm64"
    assert inspected["Digest"] == image.manifest_digest
    # Copying verifies every blob digest; the docker-archive result must inspect as such.
    docker = tmp_path / "docker.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            f"oci-archive:{image.archive}",
            f"docker-archive:{docker}:{REF}",
        ],
        capture_output=True,
        env=env,
        check=True,
    )
    info = inspect_archive(docker)
    assert (info.kind, info.refs) == ("docker", (REF,))
