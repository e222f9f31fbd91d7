"""Build single-layer OCI image archives and inspect user-provided image archives.

No registry is reachable at build time, so strata packs small images itself into
oci-archive tarballs that containerd (`ctr images import`) and skopeo understand.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from builder.artifacts import atomic_file
from builder.errors import StrataError

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MEDIA_TYPE_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MEDIA_TYPE_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
SUPPORTED_ARCHES = frozenset({"amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le"})

_CHUNK = 1024 * 1024
_MAX_JSON_SIZE = 16 * 1024 * 1024
_INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_INDEX, DOCKER_MEDIA_TYPE_MANIFEST_LIST})
_MANIFEST_MEDIA_TYPES = frozenset({MEDIA_TYPE_MANIFEST, DOCKER_MEDIA_TYPE_MANIFEST})

# Reference grammar, after github.com/distribution/reference.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_REF_HELP = (
    "expected [registry/]path:tag with lowercase path components and an explicit tag, "
    "e.g. localhost/strata/hello:2.10"
)


# --------------------------------------------------------------------------- refs


class ImageRef(NamedTuple):
    domain: str | None
    path: str
    tag: str


def parse_ref(ref: str) -> ImageRef:
    """Split `[registry/]path:tag`; raise StrataError when malformed or untagged."""
    if "@" in ref:
        raise StrataError(f"image reference {ref!r}: digests are not supported; {_REF_HELP}")
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise StrataError(f"image reference {ref!r} has no tag; {_REF_HELP}")
    if not _TAG.fullmatch(tag):
        raise StrataError(f"image reference {ref!r} has an invalid tag {tag!r}; {_REF_HELP}")
    domain, path = _split_domain(name)
    if domain is not None and not _DOMAIN.fullmatch(domain):
        raise StrataError(f"image reference {ref!r} has an invalid registry {domain!r}; {_REF_HELP}")
    if len(name) > 255 or not all(_PATH_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise StrataError(f"image reference {ref!r} has an invalid repository path {path!r}; {_REF_HELP}")
    return ImageRef(domain, path, tag)


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def image_tag(ref: str) -> str:
    """The tag of `ref`, e.g. "2.10" for "localhost/strata/hello:2.10"."""
    return parse_ref(ref).tag


def normalize_ref(ref: str) -> str:
    """Docker-style fully-qualified form, as containerd stores image names."""
    domain, path, tag = parse_ref(ref)
    if domain in (None, "docker.io", "index.docker.io"):
        domain = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    return f"{domain}/{path}:{tag}"


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class OciImage:
    ref: str
    archive: Path
    manifest_digest: str
    config_digest: str
    layer_digest: str
    size: int


class _Blob(NamedTuple):
    digest: str
    size: int


class _Layer(NamedTuple):
    blob: _Blob
    diff_id: str


class _HashingWriter:
    """Write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: IO[bytes] | gzip.GzipFile) -> None:
        self._target = target
        self._sha256 = hashlib.sha256()
        self.size = 0

    @property
    def digest(self) -> str:
        return f"sha256:{self._sha256.hexdigest()}"

    def write(self, data: bytes, /) -> int:
        self._target.write(data)
        self._sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._target.flush()

    def read(self, size: int, /) -> bytes:
        raise io.UnsupportedOperation("write-only")

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        """The caller closes the target."""


def build_oci_archive(
    rootfs: Path,
    out: Path,
    ref: str,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
    arch: str = "amd64",
    epoch: int = 0,
) -> OciImage:
    """Pack the directory `rootfs` as a one-layer image into the oci-archive `out`, reproducibly."""
    full_ref = normalize_ref(ref)
    _check_build_inputs(rootfs, out, arch, epoch)
    with atomic_file(out) as tmp, tempfile.TemporaryFile(dir=out.parent) as layer_file:
        layer = _write_layer(rootfs, layer_file, epoch)
        config = _json_bytes(_image_config(layer.diff_id, arch, epoch, entrypoint, cmd, env, workdir))
        config_blob = _Blob(_sha256(config), len(config))
        manifest = _json_bytes(_manifest(config_blob, layer.blob))
        manifest_blob = _Blob(_sha256(manifest), len(manifest))
        index = _json_bytes(_index(manifest_blob, full_ref, arch))
        with open(tmp, "wb") as archive:
            small_blobs = {config_blob.digest: config, manifest_blob.digest: manifest}
            _write_layout(archive, index, small_blobs, layer.blob, layer_file, epoch)
    return OciImage(
        ref=full_ref,
        archive=out,
        manifest_digest=manifest_blob.digest,
        config_digest=config_blob.digest,
        layer_digest=layer.blob.digest,
        size=out.stat().st_size,
    )


def _check_build_inputs(rootfs: Path, out: Path, arch: str, epoch: int) -> None:
    if not rootfs.is_dir():
        raise StrataError(f"{rootfs}: image root filesystem directory not found; create it before building")
    if out.resolve().is_relative_to(rootfs.resolve()):
        raise StrataError(f"{out}: the archive must be written outside the image root {rootfs}")
    if arch not in SUPPORTED_ARCHES:
        supported = ", ".join(sorted(SUPPORTED_ARCHES))
        raise StrataError(f"{rootfs}: unsupported architecture {arch!r}; use one of {supported}")
    if epoch < 0:
        raise StrataError(f"{rootfs}: epoch must be a non-negative Unix timestamp, got {epoch}")


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_layer(rootfs: Path, layer_file: IO[bytes], epoch: int) -> _Layer:
    """Stream a gzip-compressed, reproducible tar of `rootfs` into `layer_file`."""
    compressed = _HashingWriter(layer_file)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        uncompressed = _HashingWriter(gz)
        with tarfile.open(fileobj=uncompressed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            try:
                _add_tree(tar, rootfs, epoch)
            except OSError as error:
                raise StrataError(
                    f"{rootfs}: cannot read {error.filename}: {error.strerror}; "
                    "fix the permissions or build as root"
                ) from error
    layer_file.flush()
    return _Layer(_Blob(compressed.digest, compressed.size), uncompressed.digest)


def _tree_paths(rootfs: Path) -> list[str]:
    """Every path below `rootfs`, relative and sorted; symlinked dirs are not followed."""
    root = os.fspath(rootfs)
    paths: list[str] = []

    def fail(error: OSError) -> None:
        raise error

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        relative_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            paths.append(name if relative_dir == "." else f"{relative_dir}/{name}")
    return sorted(paths)


def _add_tree(tar: tarfile.TarFile, rootfs: Path, epoch: int) -> None:
    first_path_of_inode: dict[tuple[int, int], str] = {}
    for relative in _tree_paths(rootfs):
        source = rootfs / relative
        st = source.lstat()
        info = _tar_info(relative, st, epoch)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(source)
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            first = first_path_of_inode.setdefault((st.st_dev, st.st_ino), relative)
            if first != relative:
                info.type = tarfile.LNKTYPE
                info.linkname = first
                tar.addfile(info)
            else:
                info.size = st.st_size
                with open(source, "rb") as content:
                    tar.addfile(info, content)
        # Sockets, fifos and device nodes are skipped.


def _tar_info(relative: str, st: os.stat_result, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(relative)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.uname = ""
    info.gname = ""
    info.mtime = epoch
    return info


def _image_config(
    diff_id: str,
    arch: str,
    epoch: int,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    env: list[str] | None,
    workdir: str | None,
) -> dict[str, Any]:
    runtime: dict[str, Any] = {"Env": list(DEFAULT_ENV if env is None else env)}
    if entrypoint is not None:
        runtime["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        runtime["Cmd"] = list(cmd)
    if workdir is not None:
        runtime["WorkingDir"] = workdir
    created = _rfc3339(epoch)
    return {
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "strata: single-layer root filesystem"}],
    }


def _descriptor(media_type: str, blob: _Blob) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


def _manifest(config: _Blob, layer: _Blob) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": _descriptor(MEDIA_TYPE_CONFIG, config),
        "layers": [_descriptor(MEDIA_TYPE_LAYER_GZIP, layer)],
    }


def _index(manifest: _Blob, full_ref: str, arch: str) -> dict[str, Any]:
    descriptor = _descriptor(MEDIA_TYPE_MANIFEST, manifest)
    descriptor["platform"] = {"architecture": arch, "os": "linux"}
    descriptor["annotations"] = {
        ANNOTATION_CONTAINERD_NAME: full_ref,
        ANNOTATION_REF_NAME: image_tag(full_ref),
    }
    return {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": [descriptor]}


def _write_layout(
    archive: IO[bytes],
    index: bytes,
    small_blobs: dict[str, bytes],
    layer: _Blob,
    layer_file: IO[bytes],
    epoch: int,
) -> None:
    """Write the oci-archive: blobs/sha256/*, index.json and oci-layout, in sorted order."""
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = _archive_member(directory, epoch, 0o755)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        entries: dict[str, tuple[int, IO[bytes]]] = {
            _blob_path(digest): (len(data), io.BytesIO(data)) for digest, data in small_blobs.items()
        }
        layer_file.seek(0)
        entries[_blob_path(layer.digest)] = (layer.size, layer_file)
        entries["index.json"] = (len(index), io.BytesIO(index))
        layout = _json_bytes({"imageLayoutVersion": "1.0.0"})
        entries["oci-layout"] = (len(layout), io.BytesIO(layout))
        for name in sorted(entries):
            size, content = entries[name]
            info = _archive_member(name, epoch, 0o644)
            info.size = size
            tar.addfile(info, content)


def _blob_path(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def _archive_member(name: str, epoch: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = epoch
    return info


# --------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    kind: Literal["oci", "docker"]
    refs: tuple[str, ...]


@dataclass(frozen=True)
class _Member:
    digest: str
    size: int
    content: bytes | None  # kept only for small JSON documents


@dataclass(frozen=True)
class _Contents:
    """What one streaming pass over an archive found."""

    path: Path
    members: dict[str, _Member]
    links: dict[str, str]

    def resolve(self, name: str) -> _Member | None:
        for _ in range(16):
            if name in self.members:
                return self.members[name]
            if name not in self.links:
                return None
            name = self.links[name]
        return None

    def json(self, name: str) -> Any:
        member = self.resolve(name)
        if member is None:
            raise StrataError(f"{self.path}: {name} is missing from the archive; re-export the image")
        if member.content is None:
            raise StrataError(f"{self.path}: {name} is not a JSON document of at most {_MAX_JSON_SIZE} bytes")
        try:
            return json.loads(member.content)
        except ValueError as error:
            raise StrataError(
                f"{self.path}: {name} is not valid JSON ({error}); re-export the image"
            ) from error


def inspect_archive(path: Path) -> ArchiveInfo:
    """Identify an oci-archive or docker-archive (plain or gzipped tar) and check its integrity."""
    contents = _scan_archive(path)
    if contents.resolve("index.json") and contents.resolve("oci-layout"):
        refs = _check_oci(contents)
        if not refs and contents.resolve("manifest.json"):
            refs = _docker_refs(contents.json("manifest.json"))
        return ArchiveInfo(path, "oci", refs)
    if contents.resolve("manifest.json"):
        return ArchiveInfo(path, "docker", _check_docker(contents))
    raise StrataError(
        f"{path}: not an OCI or docker archive (no index.json or manifest.json); "
        "build it with `skopeo copy ... oci-archive:<file>` or `docker save`"
    )


def _scan_archive(path: Path) -> _Contents:
    if not path.is_file():
        raise StrataError(f"{path}: image archive not found")
    members: dict[str, _Member] = {}
    links: dict[str, str] = {}
    try:
        with _open_maybe_gzip(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                name = _member_name(info.name)
                if info.issym():
                    links[name] = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
                elif info.islnk():
                    links[name] = _member_name(info.linkname)
                elif info.isreg():
                    members[name] = _hash_member(tar, info)
    except tarfile.TarError as error:
        raise StrataError(
            f"{path}: not a readable tar archive ({error}); "
            "provide an oci-archive or docker-archive, plain or gzip-compressed"
        ) from error
    except (OSError, EOFError, zlib.error) as error:
        raise StrataError(
            f"{path}: cannot read the archive ({error}); it may be truncated or corrupt"
        ) from error
    return _Contents(path, members, links)


def _open_maybe_gzip(path: Path) -> IO[bytes] | gzip.GzipFile:
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _member_name(name: str) -> str:
    normalized = posixpath.normpath(name.lstrip("/"))
    return "" if normalized == "." else normalized


def _hash_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> _Member:
    content = tar.extractfile(info)
    if content is None:
        return _Member(_sha256(b""), 0, None)
    sha256 = hashlib.sha256()
    head = content.read(_CHUNK)
    keep = info.size <= _MAX_JSON_SIZE and head[:1] in (b"{", b"[")
    kept = [head] if keep else []
    sha256.update(head)
    for chunk in iter(lambda: content.read(_CHUNK), b""):
        sha256.update(chunk)
        if keep:
            kept.append(chunk)
    return _Member(f"sha256:{sha256.hexdigest()}", info.size, b"".join(kept) if keep else None)


def _check_oci(contents: _Contents) -> tuple[str, ...]:
    index = contents.json("index.json")
    descriptors = _descriptors(index, "manifests", contents, "index.json")
    refs: list[str] = []
    for descriptor in descriptors:
        _check_image_descriptor(descriptor, contents, nested=False)
        annotations = descriptor.get("annotations") or {}
        ref = annotations.get(ANNOTATION_CONTAINERD_NAME) or annotations.get(ANNOTATION_REF_NAME)
        if isinstance(ref, str) and ref not in refs:
            refs.append(ref)
    return tuple(refs)


def _descriptors(document: Any, key: str, contents: _Contents, where: str) -> list[dict[str, Any]]:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise StrataError(f"{contents.path}: {where} has no valid {key!r} list; re-export the image")
    return value


def _check_image_descriptor(descriptor: dict[str, Any], contents: _Contents, *, nested: bool) -> bool:
    """Check a manifest or index blob and everything below it; False if a nested one is absent."""
    name = _descriptor_blob(descriptor, contents)
    if nested and contents.resolve(name) is None:
        return False
    _check_blob(descriptor, contents)
    document = contents.json(name)
    if not isinstance(document, dict):
        raise StrataError(f"{contents.path}: {name} is not a JSON object; re-export the image")
    media_type = descriptor.get("mediaType") or document.get("mediaType")
    if media_type in _INDEX_MEDIA_TYPES:
        children = _descriptors(document, "manifests", contents, name)
        present = [_check_image_descriptor(child, contents, nested=True) for child in children]
        if children and not any(present):
            raise StrataError(f"{contents.path}: {name} lists no image whose manifest is in the archive")
    elif media_type in _MANIFEST_MEDIA_TYPES or "config" in document:
        config = document.get("config")
        if not isinstance(config, dict):
            raise StrataError(f"{contents.path}: manifest {name} has no config descriptor")
        _check_blob(config, contents)
        for layer in _descriptors(document, "layers", contents, name):
            _check_blob(layer, contents)
    else:
        raise StrataError(f"{contents.path}: {name} has unsupported media type {media_type!r}")
    return True


def _descriptor_blob(descriptor: dict[str, Any], contents: _Contents) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str):
        raise StrataError(f"{contents.path}: a descriptor has no digest; re-export the image")
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX.fullmatch(encoded):
        raise StrataError(
            f"{contents.path}: unsupported or malformed digest {digest!r}; only sha256 is supported"
        )
    return _blob_path(digest)


def _check_blob(descriptor: dict[str, Any], contents: _Contents) -> None:
    name = _descriptor_blob(descriptor, contents)
    member = contents.resolve(name)
    if member is None:
        raise StrataError(f"{contents.path}: blob {name} is referenced but missing; re-export the image")
    digest = descriptor["digest"]
    if member.digest != digest:
        raise StrataError(
            f"{contents.path}: digest mismatch for {name}: content hashes to {member.digest}; "
            "the archive is corrupt, re-export it"
        )
    size = descriptor.get("size")
    if isinstance(size, int) and size != member.size:
        raise StrataError(f"{contents.path}: size mismatch for {name}: {member.size} bytes, expected {size}")


def _check_docker(contents: _Contents) -> tuple[str, ...]:
    manifest = contents.json("manifest.json")
    if not isinstance(manifest, list) or not manifest or not all(isinstance(e, dict) for e in manifest):
        raise StrataError(
            f"{contents.path}: manifest.json is not a list of images; re-export with `docker save`"
        )
    for entry in manifest:
        for name in _docker_entry_files(entry, contents):
            member = contents.resolve(_member_name(name))
            if member is None:
                raise StrataError(f"{contents.path}: {name} is listed in manifest.json but missing")
            expected = _digest_from_name(name)
            if expected is not None and member.digest != expected:
                raise StrataError(
                    f"{contents.path}: digest mismatch for {name}: content hashes to {member.digest}; "
                    "the archive is corrupt, re-export it"
                )
    return _docker_refs(manifest)


def _docker_entry_files(entry: dict[str, Any], contents: _Contents) -> Iterator[str]:
    config = entry.get("Config")
    layers = entry.get("Layers")
    if not isinstance(config, str) or not isinstance(layers, list):
        raise StrataError(f"{contents.path}: manifest.json entry lacks Config or Layers; re-export the image")
    yield config
    for layer in layers:
        if not isinstance(layer, str):
            raise StrataError(f"{contents.path}: manifest.json has a non-string layer path {layer!r}")
        yield layer


def _digest_from_name(name: str) -> str | None:
    """Docker config files (<hex>.json) and blobs/sha256/<hex> are named after their sha256."""
    base = posixpath.basename(name).removesuffix(".json")
    if _SHA256_HEX.fullmatch(base) and (name.endswith(".json") or "/sha256/" in f"/{name}"):
        return f"sha256:{base}"
    return None


def _docker_refs(manifest: Any) -> tuple[str, ...]:
    refs: list[str] = []
    for entry in manifest if isinstance(manifest, list) else []:
        tags = entry.get("RepoTags") if isinstance(entry, dict) else None
        for tag in tags or []:
            if isinstance(tag, str) and tag not in refs:
                refs.append(tag)
    return tuple(refs)
