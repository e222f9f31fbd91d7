"""The command line as a user meets it: clear errors naming the file and field, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import ROOT


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "def.yaml"
    path.write_text(text)
    return path


def test_validate_default() -> None:
    out = invoke("validate")
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("schema: 1\nos:\n  suit: trixie\n", "os.suit: unknown key"),
        ("schema: 1\ndisk:\n  formats: raw\n", "disk.formats"),
        ("schema: 1\nverify:\n  memory: lots\n", "verify.memory"),
        (
            "schema: 1\nlayers:\n  containerd:\n    images:\n"
            "      - {ref: 'a/b:1', sandbox: true, build: {packages: [hello]}}\n"
            "      - {ref: 'a/c:1', archive: missing.tar}\n      - {sandbox: false, build: {}}\n",
            "layers.containerd.images[2].ref",
        ),
        (
            "schema: 1\nlayers:\n  containerd:\n    images:\n      - {ref: 'a/c:1', archive: missing.tar}\n",
            "missing.tar",
        ),
        ("schema: 1\nlayers:\n  kubernetes-typo: {}\n", "layers.kubernetes-typo"),
    ],
)
def test_bad_definition_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    out = invoke("validate", "--definition", str(path))
    assert out.returncode == 2
    assert str(path) in out.stderr and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_definition_file(tmp_path: Path) -> None:
    out = invoke("summary", "--definition", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "nope.yaml" in out.stderr and "Traceback" not in out.stderr


def test_env_override_shown_in_summary() -> None:
    out = invoke(
        "summary", env={"STRATA_ACCEL": "tcg", "REGISTRY_MIRRORS": "https://m1.example,https://m2.example"}
    )
    assert out.returncode == 0, out.stderr
    assert "STRATA_ACCEL" in out.stdout and "https://m2.example" in out.stdout


def test_bad_env_value_names_variable() -> None:
    out = invoke("validate", env={"STRATA_ACCEL": "warp"})
    assert out.returncode == 2 and "STRATA_ACCEL" in out.stderr and "verify.accel" in out.stderr


def test_readme_env_table_is_current() -> None:
    from builder.definition import env_table_markdown

    assert env_table_markdown() in (ROOT / "README.md").read_text()


def test_build_tasks_refuse_non_root() -> None:
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "invoke",
            "prepare",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": "/tmp"},
    )
    assert out.returncode == 2
    assert "must run as root" in out.stderr and "Traceback" not in out.stderr


def test_missing_tool_names_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from builder import host
    from builder.errors import StrataError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StrataError, match="apt-get install mmdebstrap mtools"):
        host.require_tools("mmdebstrap", "mcopy")


@pytest.mark.skipif(os.geteuid() != 0, reason="invoke download needs root")
def test_k3s_checksum_mismatch_is_refused_and_removed(tmp_path: Path) -> None:
    """A mirror serving a file that does not match the pinned sha256: exit 2, the bad file is not kept."""
    from tests.standins.mirror import standin_mirror

    wrong = "0" * 64
    cache = tmp_path / "cache"
    with standin_mirror() as env:
        out = invoke("download", env={**env, "STRATA_K3S_SHA256": wrong, "STRATA_CACHE": str(cache)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "k3s: k3s binary" in out.stderr and wrong in out.stderr and "Traceback" not in out.stderr
    downloads = cache / "downloads"
    assert not list(downloads.rglob(wrong)) and not list(downloads.rglob("*.part"))


@pytest.mark.skipif(os.geteuid() != 0, reason="invoke download needs root")
def test_unreachable_k3s_mirror_names_the_variable(tmp_path: Path) -> None:
    env = {"STRATA_MIRROR": "http://127.0.0.1:9/", "STRATA_CACHE": str(tmp_path / "cache")}
    out = invoke("download", env=env)
    assert out.returncode == 2 and "127.0.0.1:9" in out.stderr and "STRATA_MIRROR" in out.stderr
    assert "Traceback" not in out.stderr
