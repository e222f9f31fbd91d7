"""Unit tests for builder.images: image specs from the containerd layer, and archive checks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from helpers import write_tar

from builder.errors import StrataError
from builder.images import IMAGES_FIELD, ImageSpec, check_archives, image_specs, prepare_images
from builder.oci import build_oci_archive, inspect_archive

OS_SETTINGS = {"suite": "trixie", "arch": "amd64"}


def _item(ref: str, sandbox: bool = False, **kw: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"ref": ref, "sandbox": sandbox}
    item.update(kw or {"build": {"packages": ["hello"]}})
    return item


# --------------------------------------------------------------------------- image_specs


def test_image_specs_normalise_refs_and_keep_fields(tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    specs = image_specs(
        {
            "images": [
                _item("pause:3.10", sandbox=True, build={"packages": ["catatonit"]}),
                _item("library/app:1", archive=str(archive)),
                _item("localhost/strata/x:2", build={"folder": "/srv/x"}),
                _item("Registry.Example:5000/team/y:v1", archive=str(archive)),
            ]
        }
    )
    assert specs == [
        ImageSpec(
            f"{IMAGES_FIELD}[0]", "docker.io/library/pause:3.10", True, {"packages": ["catatonit"]}, None
        ),
        ImageSpec(f"{IMAGES_FIELD}[1]", "docker.io/library/app:1", False, None, archive),
        ImageSpec(f"{IMAGES_FIELD}[2]", "localhost/strata/x:2", False, {"folder": "/srv/x"}, None),
        ImageSpec(f"{IMAGES_FIELD}[3]", "Registry.Example:5000/team/y:v1", False, None, archive),
    ]
    assert IMAGES_FIELD == "layers.containerd.images"


@pytest.mark.parametrize("settings", [{}, {"images": []}])
def test_no_images(settings: dict[str, Any]) -> None:
    assert image_specs(settings) == []


def test_duplicate_refs_after_normalising() -> None:
    items = [_item("busybox:1", sandbox=True), _item("x/y:1"), _item("docker.io/library/busybox:1")]
    with pytest.raises(StrataError) as excinfo:
        image_specs({"images": items})
    message = str(excinfo.value)
    assert message.startswith(f"{IMAGES_FIELD}[2].ref:")
    assert f"{IMAGES_FIELD}[0]" in message
    assert "docker.io/library/busybox:1" in message


def test_no_sandbox_image() -> None:
    with pytest.raises(StrataError, match=r"^layers\.containerd\.images: exactly one .*sandbox.*found 0"):
        image_specs({"images": [_item("a:1"), _item("b:1")]})


def test_two_sandbox_images_are_named() -> None:
    items = [_item("a:1", sandbox=True), _item("b:1"), _item("c:1", sandbox=True)]
    with pytest.raises(StrataError) as excinfo:
        image_specs({"images": items})
    message = str(excinfo.value)
    assert message.startswith(f"{IMAGES_FIELD}:")
    assert "found 2" in message
    assert f"{IMAGES_FIELD}[0]" in message and f"{IMAGES_FIELD}[2]" in message
    assert f"{IMAGES_FIELD}[1]" not in message


def test_bad_ref_is_rejected() -> None:
    with pytest.raises(StrataError, match="no tag"):
        image_specs({"images": [_item("untagged", sandbox=True)]})


# --------------------------------------------------------------------------- archives


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/app").write_bytes(b"#!/bin/sh\necho app\n")
    (tree / "usr/bin/app").chmod(0o755)
    return tree


def _spec(archive: Path, ref: str, index: int = 0) -> ImageSpec:
    return ImageSpec(f"{IMAGES_FIELD}[{index}]", ref, False, None, archive)


def _docker_archive(path: Path, tags: list[list[str]]) -> Path:
    """A docker-archive (docker save) with one image per entry of `tags`."""
    files: dict[str, bytes] = {}
    manifest = []
    for n, repo_tags in enumerate(tags):
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            info = tarfile.TarInfo(f"file{n}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        files[config_name] = config
        files[f"layer{n}/layer.tar"] = layer.getvalue()
        manifest.append({"Config": config_name, "RepoTags": repo_tags, "Layers": [f"layer{n}/layer.tar"]})
    files["manifest.json"] = json.dumps(manifest).encode()
    return write_tar(path, files)


def test_check_archives_accepts_an_oci_archive(tmp_path: Path) -> None:
    image = build_oci_archive(_tree(tmp_path), tmp_path / "app.tar", "localhost/strata/app:1")
    check_archives([_spec(image.archive, "localhost/strata/app:1")])
    # A single image is imported under its own name and tagged: any ref is fine.
    check_archives([_spec(image.archive, "localhost/strata/renamed:2")])


def test_check_archives_ignores_built_images(tmp_path: Path) -> None:
    check_archives([ImageSpec(f"{IMAGES_FIELD}[0]", "docker.io/library/x:1", True, {"packages": []}, None)])


def test_check_archives_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StrataError, match="not found"):
        check_archives([_spec(tmp_path / "missing.tar", "docker.io/library/x:1")])


def test_docker_archive_with_two_images_and_no_matching_ref(tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "two.tar", [["busybox:1"], ["reg.example:5000/x:2"]])
    assert inspect_archive(archive).kind == "docker"
    specs = [
        _spec(archive, "docker.io/library/busybox:1", 0),
        _spec(archive, "docker.io/library/other:9", 1),
    ]
    with pytest.raises(StrataError) as excinfo:
        check_archives(specs)
    message = str(excinfo.value)
    assert message.startswith(f"{IMAGES_FIELD}[1].archive:")
    assert "docker.io/library/busybox:1" in message and "reg.example:5000/x:2" in message
    assert "docker.io/library/other:9" in message


def test_docker_archive_with_two_images_and_a_matching_ref(tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "two.tar", [["busybox:1"], ["reg.example:5000/x:2"]])
    check_archives([_spec(archive, "reg.example:5000/x:2"), _spec(archive, "docker.io/library/busybox:1", 1)])
    [prepared] = prepare_images(OS_SETTINGS, [_spec(archive, "reg.example:5000/x:2")], tmp_path / "work")
    assert prepared.source_ref == "reg.example:5000/x:2"


def test_archive_without_a_name(tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "untagged.tar", [[]])
    with pytest.raises(StrataError, match=r"^layers\.containerd\.images\[3\]\.archive: .*does not name"):
        check_archives([_spec(archive, "docker.io/library/x:1", 3)])


# --------------------------------------------------------------------------- prepare_images (no network)


def test_prepare_images_takes_archives_as_they_are(tmp_path: Path) -> None:
    image = build_oci_archive(_tree(tmp_path), tmp_path / "app.tar", "app:1")
    spec = _spec(image.archive, "localhost/strata/app:7")
    [prepared] = prepare_images(OS_SETTINGS, [spec], tmp_path / "work")
    assert prepared.ref == "localhost/strata/app:7"
    assert prepared.archive == image.archive
    assert prepared.source_ref == "docker.io/library/app:1"
    assert prepared.digest == ""


def test_prepare_images_builds_from_a_folder(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    spec = ImageSpec(
        f"{IMAGES_FIELD}[0]",
        "localhost/strata/app:1",
        True,
        {"folder": str(tree), "cmd": ["/usr/bin/app"]},
        None,
    )
    work = tmp_path / "work"
    [prepared] = prepare_images(OS_SETTINGS, [spec], work)
    assert prepared.archive == work / "images" / "00.tar"
    assert prepared.ref == prepared.source_ref == "localhost/strata/app:1"
    assert prepared.digest.startswith("sha256:")
    assert inspect_archive(prepared.archive).refs == ("localhost/strata/app:1",)
    assert not any((work / "image-trees").iterdir())
