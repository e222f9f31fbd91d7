"""The Packer path: templates rendered from the definition (and valid for the installed Packer), the
base definition, the build seed that carries the chroot bake's bundle, and the shared outputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pycdlib
import pytest
import yaml

from builder import DEFAULT_DEFINITION, ROOT, bake, bench, build, host, packer
from builder.definition import Definition, load_definition
from builder.errors import StrataError
from builder.packer import Base, Paths, hcl, render_template

needs_packer = pytest.mark.skipif(
    shutil.which("packer") is None, reason="needs packer (apt-get install packer)"
)
DEFINITIONS = {"default": DEFAULT_DEFINITION, "bookworm": ROOT / "definitions" / "bookworm.yaml"}
CLOUD_URL = "https://cloud.debian.org/images/cloud/trixie/latest/debian-13-genericcloud-amd64.qcow2"
CLOUD_SUM = "sha512:" + "ab" * 64


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs and caches under tmp_path; TCG, so no KVM probe runs."""
    monkeypatch.setenv("STRATA_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))


def load(name: str = "default") -> Definition:
    return load_definition(DEFINITIONS[name], environ={"STRATA_ACCEL": "tcg"})


def fake_strata_base(defn: Definition, content: bytes = b"base disk") -> Path:
    """A stand-in for the built base: its qcow2 (any bytes), SHA256SUMS and manifest."""
    base = packer.base_definition(defn)
    out = build.output_dir(base)
    out.mkdir(parents=True)
    image = out / f"{base.data['name']}.qcow2"
    image.write_bytes(content)
    (out / "SHA256SUMS").write_text(f"{hashlib.sha256(content).hexdigest()}  {image.name}\n")
    disk = {"root_fs_uuid": "u", "disk_guid": "g", "firmware": ["uefi", "bios"]}
    (out / "manifest.json").write_text(json.dumps({"definition_digest": base.digest(), "disk": disk}))
    return image


def hcl_value(text: str, key: str) -> str:
    """The value of `key = value` in a rendered template (first match)."""
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == key:
            return value.strip()
    raise AssertionError(f"{key} not in the template")


# --------------------------------------------------------------------------- HCL literals


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('say "hi"\\now', '"say \\"hi\\"\\\\now"'),
        ("${var.x} and %{ if }", '"$${var.x} and %%{ if }"'),
        ("naïve", '"naïve"'),
        (True, "true"),
        (2048, "2048"),
        (["a", "${b}"], '["a", "$${b}"]'),
    ],
)
def test_hcl_literals(value: object, expected: str) -> None:
    assert hcl(value) == expected


# --------------------------------------------------------------------------- rendering


def test_render_uses_the_bundle_runner_seed_and_build_key(tmp_path: Path) -> None:
    defn = load()
    image = fake_strata_base(defn)
    template = packer.render(defn)
    text = template.read_text()
    paths = Paths(packer.work_dir(defn))
    assert template == paths.template and template.parent == tmp_path / "artifacts/.work/strata-packer"
    # the base: strata's own, by path and checksum
    assert hcl_value(text, "default").strip('"') == "tcg"
    assert f'default     = "{image}"' in text
    assert f'"sha256:{hashlib.sha256(b"base disk").hexdigest()}"' in text
    assert hcl_value(text, "disk_image") == "true" and hcl_value(text, "format") == '"raw"'
    # the build seed goes in as a CD, and only the throwaway key logs in, as root
    assert f'["-cdrom", "{paths.seed}"]' in text
    assert hcl_value(text, "ssh_username") == '"root"'
    assert hcl_value(text, "ssh_private_key_file") == f'"{paths.key}"'
    public = Path(f"{paths.key}.pub").read_text()
    assert public.startswith("ssh-ed25519 ") and public.strip().endswith(packer.KEY_COMMENT)
    # the VM runs the bundle's own runner (templates/bake/run), then the finishing script
    scripts = [line.split('"')[1] for line in text.splitlines() if line.strip().startswith("script =")]
    assert scripts == [str(packer.SCRIPTS["apply"]), str(packer.SCRIPTS["finish"])]
    apply = packer.SCRIPTS["apply"].read_text()
    assert '"$bake/run"' in apply and "bundle.tar" in apply and "blkid -L cidata" in apply
    assert packer.KEY_COMMENT in packer.SCRIPTS["finish"].read_text()
    assert all(os.access(path, os.X_OK) for path in packer.SCRIPTS.values())
    assert hcl_value(text, "destination") == f'"{paths.packages}"'


def test_render_before_the_base_is_built() -> None:
    defn = load()
    text = packer.render(defn).read_text()
    assert '"none"' in text  # no checksum yet: `packer.build` builds the base first
    size = packer.UNBUILT_BASE_SIZE + packer.AUTO_HEADROOM
    assert hcl_value(text, "disk_size") == f'"{size >> 20}M"'


def test_render_for_a_cloud_image() -> None:
    defn = load()
    text = packer.render(defn, packer.cloud_base(CLOUD_URL, CLOUD_SUM)).read_text()
    assert f'"{CLOUD_URL}"' in text and f'"{CLOUD_SUM}"' in text
    assert hcl_value(text, "iso_target_extension") == '"qcow2"'
    assert hcl_value(text, "disk_size") == f'"{packer.CLOUD_AUTO_SIZE >> 20}M"'


@pytest.mark.parametrize(
    ("version", "wanted"), [((1, 6, 6), False), ((1, 7, 0), True), ((1, 11, 2), True), (None, False)]
)
def test_required_plugins_only_where_packer_wants_them(
    version: tuple[int, int, int] | None, wanted: bool
) -> None:
    defn = load()
    text = render_template(
        defn, packer.strata_base(defn), Paths(Path("/w")), accel="kvm", size=1 << 32, version=version
    )
    assert ("required_plugins {" in text) == wanted
    if wanted:
        assert 'source  = "github.com/hashicorp/qemu"' in text


def test_disk_size_follows_the_definition(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_DEFINITION.read_text())
    data["disk"]["size"] = "6G"
    path = tmp_path / "sized.yaml"
    path.write_text(yaml.safe_dump(data))
    defn = load_definition(path, environ={"STRATA_ACCEL": "tcg"})
    assert packer.disk_size(defn, packer.strata_base(defn)) == 6 << 30
    assert packer.disk_size(defn, packer.cloud_base(CLOUD_URL, CLOUD_SUM)) == 6 << 30


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_auto_disk_size_is_the_base_plus_headroom() -> None:
    defn = load()
    image = fake_strata_base(defn)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1000M"], check=True)
    size = packer.disk_size(defn, packer.strata_base(defn))
    assert size == (1000 << 20) + packer.AUTO_HEADROOM
    assert packer.disk_size(defn, packer.cloud_base(CLOUD_URL, CLOUD_SUM)) == packer.CLOUD_AUTO_SIZE


def rendered_cases() -> list[tuple[str, str]]:
    return [(name, kind) for name in DEFINITIONS for kind in ("strata-unbuilt", "strata", "cloud")]


@needs_packer
@pytest.mark.parametrize(("name", "kind"), rendered_cases())
def test_packer_validate_every_rendered_template(name: str, kind: str) -> None:
    """Each definition on each kind of base renders a template the installed Packer accepts as it is
    (`packer validate`) and formats as it is (`packer fmt -check`)."""
    defn = load(name)
    base = None
    if kind == "strata":
        fake_strata_base(defn)
    elif kind == "cloud":
        base = packer.cloud_base(CLOUD_URL, CLOUD_SUM)
    template = packer.render(defn, base)
    packer.validate(template)
    fmt = subprocess.run(["packer", "fmt", "-check", "-diff", str(template)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_uefi_only_definition_boots_the_build_vm_on_ovmf(tmp_path: Path) -> None:
    """Without BIOS boot code the VM gets OVMF; Packer then takes every drive from qemuargs."""
    data = yaml.safe_load(DEFAULT_DEFINITION.read_text())
    data["disk"]["firmware"] = ["uefi"]
    path = tmp_path / "uefi.yaml"
    path.write_text(yaml.safe_dump(data))
    defn = load_definition(path, environ={"STRATA_ACCEL": "tcg"})
    if not host.OVMF_VARS.exists():
        pytest.skip("needs ovmf")
    template = packer.render(defn)
    text = template.read_text()
    paths = Paths(packer.work_dir(defn))
    assert f'["-drive", "if=pflash,format=raw,readonly=on,file={host.OVMF_CODE}"]' in text
    assert f'["-drive", "if=pflash,format=raw,file={paths.ovmf_vars}"]' in text
    assert f"file={paths.output}/strata-packer.raw,if=virtio" in text
    assert paths.ovmf_vars.read_bytes() == host.OVMF_VARS.read_bytes()
    assert "pflash" not in packer.render(load()).read_text()  # with BIOS: SeaBIOS, Packer's own drives
    if shutil.which("packer"):
        packer.validate(template)


@needs_packer
def test_packer_validate_names_the_template_on_failure() -> None:
    defn = load()
    template = packer.render(defn)
    packer.Paths(packer.work_dir(defn)).key.unlink()  # Packer checks the key file exists
    with pytest.raises(StrataError, match=r"packer validate .*strata\.pkr\.hcl"):
        packer.validate(template)


# --------------------------------------------------------------------------- the base


def test_base_definition_keeps_only_the_os_layer() -> None:
    defn = load()
    base = packer.base_definition(defn)
    assert base.data["name"] == "strata-packer-base"
    assert [layer.name for layer in base.enabled_layers()] == ["os"]
    assert base.data["disk"]["formats"] == ["qcow2"] and base.data["disk"]["size"] == "auto"
    assert base.data["os"] == defn.data["os"]  # same suite, mirrors and hostname
    assert base.digest() != defn.digest()
    assert defn.enabled_layers()[0].name == "os"  # the original is untouched
    assert len(defn.enabled_layers()) > 1


def test_base_is_current_only_for_this_definition() -> None:
    defn = load()
    assert not packer.base_is_current(defn)
    fake_strata_base(defn)
    assert packer.base_is_current(defn)
    assert not packer.base_is_current(load("bookworm"))  # another definition, another base


def test_bundle_of_the_base_has_only_the_os_layer(tmp_path: Path) -> None:
    base = packer.base_definition(load())
    bundle = bake.make_bundle(base, tmp_path / "bundle", [])
    assert sorted(p.name for p in (bundle / "layers").iterdir()) == ["00-os"]
    assert "containerd" not in (bundle / "packages").read_text().split()


@pytest.mark.parametrize(
    ("checksum", "expected"),
    [
        ("a" * 64, "sha256:" + "a" * 64),
        ("sha256:" + "B" * 64, "sha256:" + "B" * 64),
        (CLOUD_SUM, CLOUD_SUM),
        ("file:https://example.org/SHA512SUMS", "file:https://example.org/SHA512SUMS"),
    ],
)
def test_cloud_base_checksums(checksum: str, expected: str) -> None:
    assert packer.cloud_base(CLOUD_URL, checksum).checksum == expected


@pytest.mark.parametrize("checksum", ["", "none", "md5", "sha256:xyz", "abc123", "sha256:" + "a" * 64 + " x"])
def test_cloud_base_refuses_a_bad_checksum(checksum: str) -> None:
    with pytest.raises(StrataError, match="--base-checksum"):
        packer.cloud_base(CLOUD_URL, checksum)


def test_cloud_base_needs_a_url() -> None:
    with pytest.raises(StrataError, match="--base-url"):
        packer.cloud_base("", CLOUD_SUM)


@pytest.mark.parametrize(
    ("url", "extension"),
    [
        (CLOUD_URL, "qcow2"),
        ("https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img", "img"),
        ("/srv/images/base.raw", "raw"),
        ("https://example.org/image.qcow2?token=1", "qcow2"),
        ("https://example.org/download/latest", "img"),
    ],
)
def test_base_extension(url: str, extension: str) -> None:
    assert Base(url=url, checksum="none", description="", strata=False).extension == extension


# --------------------------------------------------------------------------- bundle tar and build seed


def test_pack_bundle_keeps_modes_and_links_and_is_root_owned(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "layers/00-os/install.d").mkdir(parents=True)
    script = bundle / "layers/00-os/install.d/10-x"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (bundle / "env").write_text("A=1\n")
    (bundle / "layers/00-os/link").symlink_to("install.d/10-x")
    packer.pack_bundle(bundle, tmp_path / "bundle.tar")
    with tarfile.open(tmp_path / "bundle.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["./layers/00-os/install.d/10-x"].mode == 0o755
    assert members["./env"].mode & 0o111 == 0
    assert members["./layers/00-os/link"].issym()
    assert members["./layers/00-os/link"].linkname == "install.d/10-x"
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "root" for m in members.values())
    assert not list(tmp_path.glob(".bundle.tar.tmp-*"))


def read_iso(path: Path) -> dict[str, bytes]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        return files
    finally:
        iso.close()


def test_build_seed_carries_the_bundle_and_only_the_build_key(tmp_path: Path) -> None:
    defn = load()
    paths = Paths(tmp_path / "work")
    paths.work.mkdir()
    payload = os.urandom(3 << 20)
    paths.bundle_tar.write_bytes(payload)
    packer.build_seed(defn, paths)
    files = read_iso(paths.seed)
    assert set(files) >= {"user-data", "meta-data", "network-config", "bundle.tar"}
    assert files["bundle.tar"] == payload
    user_data = yaml.safe_load(files["user-data"])
    public = Path(f"{paths.key}.pub").read_text().strip()
    assert user_data["ssh_authorized_keys"] == [public] and public.endswith(packer.KEY_COMMENT)
    assert user_data["disable_root"] is False
    assert user_data["users"] == []  # no default user left behind in the image
    assert user_data["hostname"] == defn.data["os"]["hostname"]
    first = public
    packer.build_seed(defn, paths)  # every build gets a new key
    assert Path(f"{paths.key}.pub").read_text().strip() != first


# --------------------------------------------------------------------------- outputs, tasks, bench


def test_packer_outputs_use_the_chroot_paths_manifest(tmp_path: Path) -> None:
    defn = load()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "packages.txt").write_text("containerd\t1.7\tamd64\nsystemd\t257\tamd64\n")
    (work / "images.json").write_text(json.dumps([{"ref": "localhost/x:1", "digest": "sha256:1"}]))
    (out / "strata-packer.qcow2").write_bytes(b"qcow2 bytes")
    phases = {"packer": {"seconds": 200.0}}
    base = {"url": "/b.qcow2", "checksum": "sha256:0", "strata": True}
    build.write_manifest(
        defn, out, ["strata-packer.qcow2"], work, phases, {"firmware": ["bios"]}, backend="packer", base=base
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "packer" and manifest["base"] == base
    assert manifest["versions"] == {"debian": "trixie", "containerd": "1.7", "systemd": "257"}
    assert [layer["name"] for layer in manifest["layers"]] == [layer.name for layer in defn.enabled_layers()]
    assert (
        manifest["artifacts"]["strata-packer.qcow2"]["sha256"] == hashlib.sha256(b"qcow2 bytes").hexdigest()
    )
    assert manifest["phases"] == phases and manifest["definition_digest"] == defn.digest()
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == 3, check.stdout


def test_packer_namespace_beside_every_task() -> None:
    import tasks

    top = set(tasks.ns.task_names)
    for name in (
        "validate",
        "summary",
        "download",
        "prepare",
        "assemble",
        "verify",
        "build",
        "bench",
        "docs",
        "test",
    ):
        assert name in top
    assert {"packer.render", "packer.build"} <= top
    assert "render" not in top
    verify_help = tasks.ns["verify"].help
    assert "image" in verify_help


def test_bench_prints_both_backends_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    phases = {name: {"download": 20.0, "prepare": 100.0, "assemble": 40.0} for name in ("cold", "warm")}
    results = {
        "validate_s": 0.1,
        **{t: {**p, **{f"{n}_mb_received": 0.0 for n in p}} for t, p in phases.items()},
        "sizes_mib": {},
        "boot_s": {},
        "accel": "tcg",
        "packer": {
            "total": 380.5,
            "phases": {"base": 105.0, "bundle": 26.0, "packer": 214.0, "outputs": 35.0},
            "sizes_mib": {"strata-packer.qcow2": 433.0},
        },
    }
    bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    [chroot] = [line for line in lines if line.startswith("chroot")]
    [packer_line] = [line for line in lines if line.startswith("packer")]
    assert "160.0" in chroot and "prepare 100.0" in chroot
    assert "380.5" in packer_line and "packer 214.0" in packer_line and "base 105.0" in packer_line


@pytest.mark.skipif(os.geteuid() != 0, reason="verify checks for root first")
def test_verify_image_names_a_missing_image(tmp_path: Path) -> None:
    from builder.verify import verify_image

    with pytest.raises(StrataError, match=r"--image .*nope\.qcow2: no such file"):
        verify_image(load(), tmp_path / "nope.qcow2")
