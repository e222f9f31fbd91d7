"""Unit tests for builder.artifacts: staged output folders and SHA256SUMS."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.artifacts import artifacts_root, sha256_file, staged_output, write_sha256sums


@pytest.fixture
def final(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts" / "img"
    folder.mkdir(parents=True)
    (folder / "old.raw").write_text("old image")
    (folder / "SHA256SUMS").write_text("old sums")
    return folder


def _leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))


def test_success_replaces_the_final_folder(final: Path) -> None:
    with staged_output(final) as staging:
        assert staging.parent == final.parent
        assert staging.name.startswith(f".{final.name}.")
        assert staging.is_dir() and not any(staging.iterdir())
        (staging / "new.raw").write_text("new image")
        # Until the block ends, the final folder is the old one.
        assert sorted(p.name for p in final.iterdir()) == ["SHA256SUMS", "old.raw"]
    assert sorted(p.name for p in final.iterdir()) == ["new.raw"]
    assert (final / "new.raw").read_text() == "new image"
    assert _leftovers(final) == []
    assert not staging.exists()


def test_success_without_an_existing_final_folder(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "img"
    with staged_output(final) as staging:
        (staging / "disk.qcow2").write_bytes(b"qcow")
    assert [p.name for p in final.iterdir()] == ["disk.qcow2"]
    assert _leftovers(final) == []


def test_failure_keeps_the_old_folder(final: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), staged_output(final) as staging:
        (staging / "partial.raw").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["SHA256SUMS", "old.raw"]
    assert (final / "old.raw").read_text() == "old image"
    assert _leftovers(final) == []
    assert not staging.exists()


def test_failure_without_an_existing_final_folder(tmp_path: Path) -> None:
    final = tmp_path / "img"
    with pytest.raises(KeyboardInterrupt), staged_output(final) as staging:
        (staging / "partial.raw").write_text("half")
        raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_are_swept(final: Path) -> None:
    parent = final.parent
    for stale in (f".{final.name}.tmp-123", f".{final.name}.old-456"):
        (parent / stale / "sub").mkdir(parents=True)
        (parent / stale / "sub" / "file").write_text("stale")
    other = parent / ".other.tmp-123"
    other.mkdir()
    (parent / "img2").mkdir()
    with staged_output(final) as staging:
        assert _leftovers(final) == [staging.name]
        (staging / "x").write_text("x")
    assert _leftovers(final) == []
    assert other.is_dir()  # another artifact's staging folder is not this build's to sweep
    assert (parent / "img2").is_dir()
    assert [p.name for p in final.iterdir()] == ["x"]


def test_staging_name_carries_the_pid(tmp_path: Path) -> None:
    with staged_output(tmp_path / "img") as staging:
        assert staging.name == f".img.tmp-{os.getpid()}"


def test_staged_output_with_a_subfolder(final: Path) -> None:
    with staged_output(final) as staging:
        (staging / "logs").mkdir()
        (staging / "logs" / "build.log").write_text("ok")
    assert (final / "logs" / "build.log").read_text() == "ok"


def test_artifacts_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_ARTIFACTS", str(tmp_path / "out"))
    assert artifacts_root() == tmp_path / "out"
    monkeypatch.delenv("STRATA_ARTIFACTS")
    assert artifacts_root().name == "artifacts"


# --------------------------------------------------------------------------- checksums


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.qcow2").write_bytes(os.urandom(5000))
    (out / "a.raw").write_bytes(b"\0" * 4096 + b"data")
    (out / "manifest.json").write_text("{}\n")
    (out / "not-listed").write_text("ignored")
    return out


def test_write_sha256sums_format(folder: Path) -> None:
    names = ["manifest.json", "b.qcow2", "a.raw"]
    write_sha256sums(folder, names)
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    assert lines == [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}" for n in sorted(names)]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
def test_write_sha256sums_verifies_with_sha256sum(folder: Path) -> None:
    write_sha256sums(folder, ["a.raw", "b.qcow2", "manifest.json"])
    ok = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=folder, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert sorted(ok.stdout.splitlines()) == ["a.raw: OK", "b.qcow2: OK", "manifest.json: OK"]
    (folder / "b.qcow2").write_bytes(b"tampered")
    bad = subprocess.run(["sha256sum", "--check", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "b.qcow2: FAILED" in bad.stdout
