"""Pinned remote build inputs, fetched into a sha256-addressed cache with resume and retries."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import requests

from . import log
from .artifacts import fsync_path
from .errors import StrataError
from .rootfs import cache_root

_sleep = time.sleep  # tests replace this to record backoff delays
CHUNK_SIZE = 1 << 16  # a cut connection loses at most one chunk
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


@dataclass(frozen=True)
class Remote:
    """A build input pinned by url and sha256; `name` labels it in messages (e.g. "k3s")."""

    url: str
    sha256: str
    name: str

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise StrataError(
                f"{self.name}: the sha256 pinned for {self.url} must be 64 lowercase hex digits, "
                f"got {self.sha256!r}"
            )


class _TransientFailure(Exception):
    """A failure worth retrying: the server is busy or the connection broke."""


def mirrored(url: str, mirror: str | None, upstream_prefix: str) -> str:
    """`url` with `upstream_prefix` replaced by `mirror`; unchanged without a mirror or a match."""
    prefix = upstream_prefix.rstrip("/")
    if not mirror or not (url == prefix or url.startswith(prefix + "/")):
        return url
    rest = url[len(prefix) :].lstrip("/")
    base = mirror.rstrip("/")
    return f"{base}/{rest}" if rest else base


def verify_file(path: Path, sha256: str) -> bool:
    """Whether `path` exists and its content has this sha256."""
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    _hash_into(path, digest)
    return digest.hexdigest() == sha256


def fetch(
    remote: Remote,
    cache_dir: Path | None = None,
    *,
    session: requests.Session | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """The verified cached copy of `remote`, downloading (or resuming) it only when needed."""
    cache_dir = cache_dir if cache_dir is not None else cache_root() / "downloads"
    final = cache_dir / "sha256" / remote.sha256
    if final.exists():
        if verify_file(final, remote.sha256):
            log.info(f"{remote.name}: cached ({final})")
            return final
        log.info(f"{remote.name}: cached copy {final} is corrupt; downloading again")
        final.unlink()
    part = cache_dir / "partial" / f"{remote.sha256}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    if urlparse(remote.url).scheme == "file":
        digest = _copy_local(remote, part)
    else:
        with requests.Session() if session is None else nullcontext(session) as http:
            digest = _download(remote, part, http, retries, backoff, timeout)
    _require_match(remote, part, digest)
    _install(part, final)
    return final


# --------------------------------------------------------------------------- local files


def _copy_local(remote: Remote, part: Path) -> str:
    """Copy a file:// input into `part`; return its sha256."""
    source = Path(unquote(urlparse(remote.url).path))
    if not source.is_file():
        raise StrataError(
            f"{remote.name}: {remote.url} does not exist; check the version or the mirror (STRATA_MIRROR)"
        )
    digest = hashlib.sha256()
    with source.open("rb") as reader, part.open("wb") as writer:
        _write_chunks(iter(lambda: reader.read(CHUNK_SIZE), b""), writer, digest, None)
    return digest.hexdigest()


# --------------------------------------------------------------------------- http


def _download(
    remote: Remote,
    part: Path,
    session: requests.Session,
    retries: int,
    backoff: float,
    timeout: float,
) -> str:
    """Download into `part` with retries; return the sha256 of the complete part."""
    attempt = 0
    restarted_after_416 = False
    while True:
        try:
            digest, range_refused = _attempt(remote, part, session, timeout)
        except (_TransientFailure, *_TRANSIENT_ERRORS) as error:
            if attempt >= retries:
                raise StrataError(
                    f"{remote.name}: could not download {remote.url} after {attempt + 1} attempts: {error}; "
                    "check the network, or use a reachable mirror (e.g. STRATA_MIRROR for K3s)"
                ) from error
            delay = backoff * 2**attempt
            log.info(f"{remote.name}: {error}; retrying in {delay:g}s")
            _sleep(delay)
            attempt += 1
            continue
        if range_refused and digest != remote.sha256 and not restarted_after_416:
            log.info(f"{remote.name}: partial download does not verify; starting over")
            part.unlink()
            restarted_after_416 = True
            continue
        return digest


def _attempt(remote: Remote, part: Path, session: requests.Session, timeout: float) -> tuple[str, bool]:
    """One request, resuming `part` if present; return (sha256 of the part, whether it answered 416)."""
    digest = hashlib.sha256()
    offset = _hash_into(part, digest) if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    log.info(f"{remote.name}: {'resuming at byte ' + str(offset) if offset else 'downloading'} {remote.url}")
    with session.get(remote.url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and offset:
            return digest.hexdigest(), True
        _raise_for_status(remote, response)
        if not _resumes_at(response, offset, part):
            digest, offset = hashlib.sha256(), 0
        _receive(remote, response, part, digest, offset)
    return digest.hexdigest(), False


def _raise_for_status(remote: Remote, response: requests.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    answer = f"{remote.url} answered {status} {response.reason or _phrase(status)}".rstrip()
    if status == HTTPStatus.TOO_MANY_REQUESTS or status >= 500:
        raise _TransientFailure(answer)
    raise StrataError(f"{remote.name}: {answer}; check the version or the mirror (STRATA_MIRROR)")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _resumes_at(response: requests.Response, offset: int, part: Path) -> bool:
    """Whether the response continues `part` at `offset`; a 206 for another range drops the part."""
    if not offset or response.status_code != HTTPStatus.PARTIAL_CONTENT:
        return False
    content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    if match is None or int(match.group(1)) != offset:
        part.unlink()
        raise _TransientFailure(f"{response.url} answered an unexpected range {content_range!r}")
    return True


def _receive(
    remote: Remote, response: requests.Response, part: Path, digest: hashlib._Hash, offset: int
) -> None:
    """Append (offset > 0) or write the body to `part`; fail transiently if it ends short."""
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    progress = log.Progress(f"downloading {remote.name}", offset + expected) if expected else None
    if progress:
        progress.advance(offset)
    try:
        with part.open("ab" if offset else "wb") as writer:
            written = _write_chunks(response.iter_content(CHUNK_SIZE), writer, digest, progress)
    finally:
        if progress:
            progress.close()
    if expected is not None and written < expected:
        raise _TransientFailure(f"{remote.url} ended after {written} of {expected} bytes")


def _write_chunks(
    chunks: Iterable[bytes], writer: BinaryIO, digest: hashlib._Hash, progress: log.Progress | None
) -> int:
    """Write and hash every chunk; return the number of bytes written."""
    written = 0
    for chunk in chunks:
        writer.write(chunk)
        digest.update(chunk)
        written += len(chunk)
        if progress:
            progress.advance(len(chunk))
    return written


# --------------------------------------------------------------------------- verification and install


def _hash_into(path: Path, digest: hashlib._Hash) -> int:
    """Feed the file's content into `digest`; return its size."""
    size = 0
    with path.open("rb") as reader:
        while chunk := reader.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return size


def _require_match(remote: Remote, part: Path, digest: str) -> None:
    if digest == remote.sha256:
        return
    part.unlink(missing_ok=True)
    raise StrataError(
        f"{remote.name}: sha256 mismatch for {remote.url}: expected {remote.sha256}, got {digest}; "
        "the file was removed. If the pinned checksum is right, the mirror serves a different file."
    )


def _install(part: Path, final: Path) -> None:
    """Durably and atomically move the verified part to its cache name."""
    fsync_path(part)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    fsync_path(final.parent)
