"""Unit tests for builder.bake: env values, the bundle layout, the runner script and layer digests."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from builder import DEFAULT_DEFINITION, LAYERS_DIR, ROOT, TEMPLATES_DIR, bake
from builder.bake import bake_env, env_value, layer_digest, make_bundle
from builder.definition import Definition, Layer, load_definition
from builder.images import PreparedImage

needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")


# --------------------------------------------------------------------------- env_value / bake_env


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "1"),
        (False, "0"),
        (None, ""),
        (0, "0"),
        (42, "42"),
        ("text with spaces", "text with spaces"),
        ([], ""),
        (["a", "b", "c"], "a b c"),
        ([True, False, 3, None], "1 0 3 "),
        (["keep", {"dict": 1}, ["nested"], "also"], "keep also"),
        ([{"ref": "x"}], ""),
    ],
)
def test_env_value(value: object, expected: str) -> None:
    assert env_value(value) == expected


def test_bake_env_on_default_definition() -> None:
    defn = load_definition(environ={})
    env = bake_env(defn)
    assert env["STRATA_OS_SUITE"] == "trixie"
    assert env["STRATA_OS_HOSTNAME"] == defn.data["os"]["hostname"]
    assert env["STRATA_NAME"] == defn.data["name"]
    assert env["STRATA_CONTAINERD_REGISTRY_MIRRORS"] == ""
    assert env["STRATA_CONTAINERD_ENABLED"] == "1"
    assert env["STRATA_OS_COMPONENTS"] == " ".join(defn.data["os"]["components"])
    # Every os setting is there, and every value is a string.
    for key in defn.data["os"]:
        assert f"STRATA_OS_{key.upper()}" in env
    assert all(isinstance(v, str) for v in env.values())


def test_bake_env_registry_mirrors_from_environment() -> None:
    defn = load_definition(environ={"REGISTRY_MIRRORS": "http://a.example:5000, https://b.example"})
    env = bake_env(defn)
    assert env["STRATA_CONTAINERD_REGISTRY_MIRRORS"].split() == [
        *defn.data["layers"]["containerd"]["registry_mirrors"]
    ]
    assert len(env["STRATA_CONTAINERD_REGISTRY_MIRRORS"].split()) == 2


def test_bake_env_skips_disabled_layers(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_DEFINITION.read_text())
    data["layers"] = {name: {"enabled": False} for name in ("containerd", "k3s", "agent", "apps")}
    path = tmp_path / "def.yaml"
    path.write_text(yaml.safe_dump(data))
    env = bake_env(load_definition(path, environ={}))
    assert not any(k.startswith("STRATA_CONTAINERD_") for k in env)
    assert env["STRATA_OS_SUITE"] == data["os"]["suite"]


# --------------------------------------------------------------------------- make_bundle (default layers)


def _tar(path: Path, payload: bytes) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("payload.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def prepared(tmp_path: Path) -> list[PreparedImage]:
    src = tmp_path / "archives"
    src.mkdir()
    return [
        PreparedImage(
            "localhost/strata/pause:3.10",
            _tar(src / "pause.tar", b"pause" * 100),
            "localhost/strata/pause:3.10",
            "sha256:" + "a" * 64,
        ),
        PreparedImage(
            "docker.io/library/hello:1",
            _tar(src / "hello.tar", b"hello" * 200),
            "example.org/upstream/hello:latest",
            "",
        ),
    ]


def _files(tree: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(tree)): (p.read_bytes(), stat.S_IMODE(p.lstat().st_mode))
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


def _source_env(bundle: Path) -> dict[str, str]:
    """The STRATA_* variables a POSIX shell gets from sourcing the bundle's env file."""
    out = subprocess.run(
        ["sh", "-c", "set -a; . ./env; exec env -0"],
        cwd=bundle,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        check=True,
    )
    pairs = (item.decode().split("=", 1) for item in out.stdout.split(b"\0") if item)
    return {k: v for k, v in pairs if k.startswith("STRATA_")}


@pytest.fixture
def default_bundle(tmp_path: Path, prepared: list[PreparedImage]) -> tuple[Definition, Path]:
    defn = load_definition(environ={})
    return defn, make_bundle(defn, tmp_path / "bundle", prepared)


def test_bundle_top_level(default_bundle: tuple[Definition, Path]) -> None:
    defn, bundle = default_bundle
    assert sorted(p.name for p in bundle.iterdir()) == [
        "definition.json",
        "env",
        "images",
        "layers",
        "packages",
        "run",
    ]
    assert (bundle / "run").read_bytes() == (TEMPLATES_DIR / "bake" / "run").read_bytes()
    assert os.access(bundle / "run", os.X_OK)
    assert json.loads((bundle / "definition.json").read_text()) == json.loads(defn.to_json())
    names = [f"{i:02d}-{layer.name}" for i, layer in enumerate(defn.enabled_layers())]
    assert names[:2] == ["00-os", "01-containerd"]
    assert sorted(p.name for p in (bundle / "layers").iterdir()) == names


@needs_sh
def test_bundle_env_sources_in_sh(default_bundle: tuple[Definition, Path]) -> None:
    defn, bundle = default_bundle
    out = subprocess.run(
        ["sh", "-c", '. ./env; echo "$STRATA_OS_HOSTNAME"'],
        cwd=bundle,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == defn.data["os"]["hostname"] + "\n"
    assert _source_env(bundle) == bake_env(defn)


@needs_sh
def test_bundle_env_quotes_awkward_values(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_DEFINITION.read_text())
    awkward = ["quiet", "msg='it''s'", 'x="$HOME `id`; exit 1"', "back\\slash", "semi;colon&amp"]
    data["os"]["kernel_cmdline"] = awkward
    path = tmp_path / "def.yaml"
    path.write_text(yaml.safe_dump(data))
    defn = load_definition(path, environ={})
    bundle = make_bundle(defn, tmp_path / "bundle", [])
    sourced = _source_env(bundle)
    assert sourced["STRATA_OS_KERNEL_CMDLINE"] == " ".join(awkward)
    assert sourced == bake_env(defn)
    # Without images there is no images folder.
    assert not (bundle / "images").exists()


def test_bundle_copies_layer_folders_with_modes(default_bundle: tuple[Definition, Path]) -> None:
    defn, bundle = default_bundle
    for index, layer in enumerate(defn.enabled_layers()):
        dest = bundle / "layers" / f"{index:02d}-{layer.name}"
        for part in ("install.d", "finalise.d"):
            if (layer.path / part).is_dir():
                assert _files(dest / part) == _files(layer.path / part)
            else:
                assert not (dest / part).exists()
        copied = _files(dest / "files") if (dest / "files").is_dir() else {}
        source = _files(layer.path / "files") if (layer.path / "files").is_dir() else {}
        rendered = {target.lstrip("/") for target in layer.templates}
        assert {k: v for k, v in copied.items() if k not in rendered} == source
        assert rendered <= set(copied)
    os_layer = bundle / "layers" / "00-os"
    assert (os_layer / "install.d").is_dir() and (os_layer / "finalise.d").is_dir()
    # Executable scripts stay executable, plain files stay plain.
    assert os.access(os_layer / "install.d" / "10-apt-sources", os.X_OK)
    assert os.access(os_layer / "files/usr/libexec/strata/growroot", os.X_OK)
    assert not os.access(os_layer / "files/etc/systemd/network/80-strata-dhcp.network", os.X_OK)
    assert os.access(bundle / "layers/01-containerd/install.d/60-preload-images", os.X_OK)


def test_bundle_renders_containerd_config(default_bundle: tuple[Definition, Path]) -> None:
    defn, bundle = default_bundle
    config = bundle / "layers/01-containerd/files/etc/containerd/config.toml"
    text = config.read_text()
    [sandbox] = [i["ref"] for i in defn.layer_settings("containerd")["images"] if i["sandbox"]]
    assert f'sandbox_image = "{sandbox}"' in text
    assert "SystemdCgroup = true" in text
    parsed = tomllib.loads(text)
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == sandbox
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    # The containerd layer has no files/ of its own: only the rendered template is there.
    assert list(_files(bundle / "layers/01-containerd/files")) == ["etc/containerd/config.toml"]


def test_bundle_stages_images(default_bundle: tuple[Definition, Path], prepared: list[PreparedImage]) -> None:
    _, bundle = default_bundle
    images = bundle / "images"
    assert sorted(p.name for p in images.iterdir()) == ["00.tar", "01.tar", "images.tsv"]
    rows = [line.split("\t") for line in (images / "images.tsv").read_text().splitlines()]
    assert rows == [[p.ref, f"{n:02d}.tar", p.source_ref] for n, p in enumerate(prepared)]
    for n, image in enumerate(prepared):
        assert (images / f"{n:02d}.tar").read_bytes() == image.archive.read_bytes()
    assert (images / "images.tsv").read_text().endswith("\n")


def test_make_bundle_replaces_an_old_bundle(tmp_path: Path, prepared: list[PreparedImage]) -> None:
    defn = load_definition(environ={})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "stale").write_text("old")
    (bundle / "layers/99-gone").mkdir(parents=True)
    make_bundle(defn, bundle, prepared)
    assert not (bundle / "stale").exists()
    assert not (bundle / "layers/99-gone").exists()
    make_bundle(defn, bundle, [])
    assert not (bundle / "images").exists()


# --------------------------------------------------------------------------- the runner, for real


SCRIPT = '#!/bin/sh\necho "{tag} $STRATA_OS_HOSTNAME ${{STRATA_ZETA_GREETING:-}}" >> "$STRATA_BAKE/log"\n'


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_layers(tmp_path: Path) -> Path:
    """Three layers: zeta (order 10), alpha (order 20) and gamma (disabled); scripts only log."""
    layers = tmp_path / "layers"
    metas = {
        "zeta": (
            "description: first by order\norder: 10\nsettings:\n  greeting: {type: str, default: hello}\n"
        ),
        "alpha": "description: second by order\norder: 20\n",
        "gamma": "description: off by default\norder: 5\ndefault_enabled: false\n",
    }
    for name, meta in metas.items():
        (layers / name).mkdir(parents=True)
        (layers / name / "layer.yaml").write_text(meta)
    for rel in (
        "zeta/install.d/10-one",
        "zeta/install.d/20-two",
        "zeta/finalise.d/90-fin",
        "alpha/install.d/10-one",
        "alpha/finalise.d/50-fin",
        "gamma/install.d/10-one",
        "gamma/finalise.d/10-fin",
    ):
        _script(layers / rel, SCRIPT.format(tag=rel))
    return layers


def _fake_bundle(tmp_path: Path, layers: Path) -> Path:
    path = tmp_path / "def.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            schema: 1
            name: runner-test
            os:
              hostname: bakehost
            layers:
              zeta:
                greeting: "hi there"
            """
        )
    )
    defn = load_definition(path, environ={}, layers_dir=layers)
    bundle = make_bundle(defn, tmp_path / "bundle", [])
    # Safety: the runner copies files/ to /, so these fake layers must have none.
    assert not list(bundle.glob("layers/*/files"))
    return bundle


def _run_bundle(bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bundle / "run")],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        timeout=60,
    )


@needs_sh
def test_runner_order_and_env(tmp_path: Path, fake_layers: Path) -> None:
    bundle = _fake_bundle(tmp_path, fake_layers)
    assert sorted(p.name for p in (bundle / "layers").iterdir()) == ["00-zeta", "01-alpha"]
    out = _run_bundle(bundle)
    assert out.returncode == 0, out.stdout + out.stderr
    log = (bundle / "log").read_text().splitlines()
    assert log == [
        "zeta/install.d/10-one bakehost hi there",
        "zeta/install.d/20-two bakehost hi there",
        "alpha/install.d/10-one bakehost hi there",
        "zeta/finalise.d/90-fin bakehost hi there",
        "alpha/finalise.d/50-fin bakehost hi there",
    ]
    assert "strata-bake: 00-zeta/install.d/10-one" in out.stdout
    assert "strata-bake: 01-alpha/finalise.d/50-fin" in out.stdout


@needs_sh
def test_runner_exports_strata_bake(tmp_path: Path, fake_layers: Path) -> None:
    _script(
        fake_layers / "alpha/install.d/20-where", '#!/bin/sh\necho "$STRATA_BAKE" > "$STRATA_BAKE/where"\n'
    )
    bundle = _fake_bundle(tmp_path, fake_layers)
    out = _run_bundle(bundle)
    assert out.returncode == 0, out.stdout + out.stderr
    assert Path((bundle / "where").read_text().strip()) == bundle.resolve()


@needs_sh
def test_runner_stops_at_a_failing_script(tmp_path: Path, fake_layers: Path) -> None:
    _script(
        fake_layers / "zeta/install.d/15-fail", '#!/bin/sh\necho "zeta fails" >> "$STRATA_BAKE/log"\nexit 7\n'
    )
    bundle = _fake_bundle(tmp_path, fake_layers)
    out = _run_bundle(bundle)
    assert out.returncode != 0
    assert (bundle / "log").read_text().splitlines() == [
        "zeta/install.d/10-one bakehost hi there",
        "zeta fails",
    ]


@needs_sh
def test_runner_fails_on_a_failing_finalise_script(tmp_path: Path, fake_layers: Path) -> None:
    _script(fake_layers / "alpha/finalise.d/60-fail", "#!/bin/sh\nexit 1\n")
    bundle = _fake_bundle(tmp_path, fake_layers)
    out = _run_bundle(bundle)
    assert out.returncode != 0
    assert (bundle / "log").read_text().splitlines()[-1] == "alpha/finalise.d/50-fin bakehost hi there"


# --------------------------------------------------------------------------- layer_digest


def _real_layer(name: str) -> Layer:
    defn = load_definition(environ={})
    [layer] = [layer for layer in defn.layers if layer.name == name]
    return layer


def test_layer_digest_of_repo_layers_is_stable_and_distinct() -> None:
    os_layer, containerd = _real_layer("os"), _real_layer("containerd")
    first = layer_digest(os_layer)
    assert first == layer_digest(os_layer)
    assert len(first) == 64 and int(first, 16) >= 0
    assert layer_digest(containerd) != first


def _copy_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of layers/ and templates/ under tmp_path, with bake's TEMPLATES_DIR pointed at it."""
    root = tmp_path / "root"
    shutil.copytree(LAYERS_DIR, root / "layers", symlinks=True)
    shutil.copytree(TEMPLATES_DIR, root / "templates", symlinks=True)
    monkeypatch.setattr(bake, "TEMPLATES_DIR", root / "templates")
    return root


@pytest.fixture
def copied_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return _copy_root(tmp_path, monkeypatch)


def test_layer_digest_depends_on_relative_paths_not_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers = [_real_layer("os"), _real_layer("containerd")]
    expected = [layer_digest(layer) for layer in layers]
    root = _copy_root(tmp_path, monkeypatch)
    copies = [dataclasses.replace(layer, path=root / "layers" / layer.name) for layer in layers]
    assert [layer_digest(copy) for copy in copies] == expected


@pytest.fixture
def os_copy(copied_root: Path) -> Layer:
    return dataclasses.replace(_real_layer("os"), path=copied_root / "layers" / "os")


def test_layer_digest_changes_with_file_content(os_copy: Layer) -> None:
    before = layer_digest(os_copy)
    target = os_copy.path / "install.d" / "20-system"
    target.write_text(target.read_text() + "# changed\n")
    assert layer_digest(os_copy) != before


def test_layer_digest_changes_with_mode(os_copy: Layer) -> None:
    before = layer_digest(os_copy)
    (os_copy.path / "files/usr/libexec/strata/growroot").chmod(0o644)
    assert layer_digest(os_copy) != before


def test_layer_digest_changes_with_new_or_renamed_file(os_copy: Layer) -> None:
    before = layer_digest(os_copy)
    script = os_copy.path / "install.d" / "20-system"
    script.rename(os_copy.path / "install.d" / "21-system")
    renamed = layer_digest(os_copy)
    assert renamed != before
    (os_copy.path / "files/etc/new").write_text("")
    assert layer_digest(os_copy) not in (before, renamed)


def test_layer_digest_changes_with_template(copied_root: Path) -> None:
    layer = dataclasses.replace(_real_layer("containerd"), path=copied_root / "layers" / "containerd")
    before = layer_digest(layer)
    [template] = layer.templates.values()
    path = copied_root / "templates" / template
    path.write_text(path.read_text() + "# changed\n")
    assert layer_digest(layer) != before


def test_layer_digest_of_layer_outside_root(tmp_path: Path, fake_layers: Path) -> None:
    assert not fake_layers.is_relative_to(ROOT)
    path = tmp_path / "def.yaml"
    path.write_text("schema: 1\n")
    defn = load_definition(path, environ={}, layers_dir=fake_layers)
    [zeta] = [layer for layer in defn.layers if layer.name == "zeta"]
    assert len(layer_digest(zeta)) == 64


# --------------------------------------------------------------------------- layer packages (Packer path)


def test_bundle_lists_the_layers_packages(default_bundle: tuple[Definition, Path]) -> None:
    defn, bundle = default_bundle
    expected = list(defn.data["os"]["packages"])
    for layer in defn.enabled_layers():
        expected += layer.packages
    assert (bundle / "packages").read_text().splitlines() == list(dict.fromkeys(expected))
    assert "containerd" in expected and "openssh-server" in expected


def _fake_apt(tmp_path: Path, installed: list[str]) -> dict[str, str]:
    """dpkg-query that knows `installed` (and lists one package), and an apt-get that logs its arguments
    to the bake log."""
    bin_dir = tmp_path / "fakebin"
    known = " ".join(installed)
    _script(
        bin_dir / "dpkg-query",
        '#!/bin/sh\n[ "$#" -eq 3 ] && { printf "here\\t1\\tall\\n"; exit 0; }  # the runner\'s final list\n'
        f'for p in {known}; do [ "$4" = "$p" ] && {{ printf installed; exit 0; }}; done\nexit 1\n',
    )
    _script(bin_dir / "apt-get", '#!/bin/sh\necho "apt-get $*" >> "$STRATA_BAKE/log"\n')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _bundle_with_packages(tmp_path: Path, fake_layers: Path, packages: list[str]) -> Path:
    meta = fake_layers / "zeta" / "layer.yaml"
    meta.write_text(meta.read_text() + f"packages: {json.dumps(packages)}\n")
    return _fake_bundle(tmp_path, fake_layers)


@needs_sh
def test_runner_installs_missing_packages_before_the_layers(tmp_path: Path, fake_layers: Path) -> None:
    """In a VM (the Packer path) the runner installs what the base image lacks, apt patterns included."""
    bundle = _bundle_with_packages(tmp_path, fake_layers, ["here", "gone", "?essential", "also-gone"])
    (tmp_path / "xessential").write_text("")  # `?essential` is an apt pattern: it must not glob to this
    env = _fake_apt(tmp_path, installed=["here"])
    out = subprocess.run(
        [str(bundle / "run")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    log = (bundle / "log").read_text().splitlines()
    assert log[:2] == [
        "apt-get update -q",
        "apt-get install -y -q --no-install-recommends gone ?essential also-gone",
    ]
    assert log[2] == "zeta/install.d/10-one bakehost hi there"
    assert "strata-bake: installing gone ?essential also-gone" in out.stdout


@needs_sh
def test_runner_with_every_package_installed_calls_no_apt(tmp_path: Path, fake_layers: Path) -> None:
    """The chroot bake: mmdebstrap installed everything, so the runner never touches apt."""
    bundle = _bundle_with_packages(tmp_path, fake_layers, ["here", "there"])
    env = _fake_apt(tmp_path, installed=["here", "there"])
    out = subprocess.run([str(bundle / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(line.startswith("apt-get") for line in (bundle / "log").read_text().splitlines())
    assert "installing" not in out.stdout
    assert (bundle / "installed-packages.txt").read_text() == "here\t1\tall\n"
