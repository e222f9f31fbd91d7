"""Unit tests for builder.download against a local HTTP server (no external network)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder import download
from builder.download import Remote, fetch, mirrored, verify_file
from builder.errors import StrataError

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CUT_AFTER = 100_000


class FakeServer:
    """Serves `payload` at any path; knobs make it fail the way real servers do."""

    def __init__(self) -> None:
        self.payload = PAYLOAD
        self.fail_first = 0  # answer 503 to this many requests
        self.cut_after: int | None = None  # first request: send only this many body bytes
        self.ignore_range = False
        self.status: int | None = None  # answer every request with this error status
        self.ranges: list[str | None] = []  # Range header of each request
        self.bytes_served = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases/k3s"

    @property
    def requests(self) -> int:
        return len(self.ranges)

    def remote(self, sha256: str = PAYLOAD_SHA) -> Remote:
        return Remote(url=self.url, sha256=sha256, name="k3s")


def _handler_for(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.ranges.append(self.headers.get("Range"))
                number = len(state.ranges)
            if state.status is not None:
                self.send_error(state.status)
            elif number <= state.fail_first:
                self.send_error(503)
            else:
                self._serve(first=number == 1)

        def _serve(self, first: bool) -> None:
            payload, start = state.payload, self._range_start()
            if start is not None and start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200 if start is None else 206)
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            body = payload[start or 0 :]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if first and state.cut_after is not None:
                self._write(body[: state.cut_after])
                self.connection.shutdown(socket.SHUT_RDWR)  # cut mid-body
                return
            self._write(body)

        def _range_start(self) -> int | None:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            return None if state.ignore_range or match is None else int(match.group(1))

        def _write(self, data: bytes) -> None:
            self.wfile.write(data)
            self.wfile.flush()
            with state.lock:
                state.bytes_served += len(data)

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    thread = threading.Thread(target=fake.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff sleeps, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(download, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _partials(cache: Path) -> list[Path]:
    return sorted((cache / "partial").glob("*")) if (cache / "partial").exists() else []


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    assert match is not None, header
    return int(match.group(1))


# --------------------------------------------------------------------------- cache


def test_fresh_download_lands_at_sha256_path(server: FakeServer, cache: Path) -> None:
    path = fetch(server.remote(), cache)
    assert path == cache / "sha256" / PAYLOAD_SHA
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None]
    assert _partials(cache) == []


def test_second_fetch_makes_no_request(server: FakeServer, cache: Path) -> None:
    fetch(server.remote(), cache)
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert server.requests == 1


def test_default_cache_dir_is_under_strata_cache(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    assert fetch(server.remote()) == tmp_path / "downloads" / "sha256" / PAYLOAD_SHA


def test_corrupted_cache_file_is_replaced(server: FakeServer, cache: Path) -> None:
    path = fetch(server.remote(), cache)
    path.write_bytes(b"bit rot")
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert server.requests == 2


# --------------------------------------------------------------------------- resume


def test_cut_connection_resumes_with_range(server: FakeServer, cache: Path, delays: list[float]) -> None:
    server.cut_after = CUT_AFTER
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert server.ranges[0] is None
    assert 0 < _range_start(server.ranges[1]) <= CUT_AFTER  # up to one unfinished chunk is refetched
    assert len(server.ranges) == 2
    assert server.bytes_served < 2 * len(PAYLOAD)
    assert delays == [1.0]
    assert _partials(cache) == []


def test_server_ignoring_range_still_ends_correct(server: FakeServer, cache: Path) -> None:
    server.cut_after = CUT_AFTER
    server.ignore_range = True
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert len(server.ranges) == 2
    assert _range_start(server.ranges[1]) > 0


def test_complete_part_answered_416_is_verified_and_kept(server: FakeServer, cache: Path) -> None:
    part = cache / "partial" / f"{PAYLOAD_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_bad_part_answered_416_restarts_once(server: FakeServer, cache: Path) -> None:
    part = cache / "partial" / f"{PAYLOAD_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(len(PAYLOAD)))
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-", None]


# --------------------------------------------------------------------------- failures


def test_503_twice_then_success_backs_off(server: FakeServer, cache: Path, delays: list[float]) -> None:
    server.fail_first = 2
    assert fetch(server.remote(), cache).read_bytes() == PAYLOAD
    assert delays == [1.0, 2.0]
    assert server.requests == 3


def test_retries_run_out(server: FakeServer, cache: Path, delays: list[float]) -> None:
    server.status = 503
    with pytest.raises(StrataError, match=r"after 3 attempts.*503 Service Unavailable"):
        fetch(server.remote(), cache, retries=2)
    assert delays == [1.0, 2.0]
    assert not (cache / "sha256").exists()


def test_404_fails_at_once(server: FakeServer, cache: Path, delays: list[float]) -> None:
    server.status = 404
    with pytest.raises(StrataError) as failure:
        fetch(server.remote(), cache)
    message = str(failure.value)
    assert server.url in message
    assert "404 Not Found" in message
    assert "STRATA_MIRROR" in message
    assert server.requests == 1
    assert delays == []


def test_wrong_content_is_removed(server: FakeServer, cache: Path) -> None:
    server.payload = b"not the pinned release"
    with pytest.raises(StrataError, match="sha256 mismatch") as failure:
        fetch(server.remote(), cache)
    assert PAYLOAD_SHA in str(failure.value)
    assert list((cache / "sha256").glob("*")) == []
    assert _partials(cache) == []


# --------------------------------------------------------------------------- file:// urls


def test_file_url_is_copied_into_cache(tmp_path: Path, cache: Path) -> None:
    source = tmp_path / "mirror dir" / "k3s"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    remote = Remote(url=source.as_uri(), sha256=PAYLOAD_SHA, name="k3s")
    path = fetch(remote, cache)
    assert path == cache / "sha256" / PAYLOAD_SHA
    assert path.read_bytes() == PAYLOAD


def test_file_url_with_wrong_content_is_rejected(tmp_path: Path, cache: Path) -> None:
    source = tmp_path / "k3s"
    source.write_bytes(b"other")
    with pytest.raises(StrataError, match="sha256 mismatch"):
        fetch(Remote(url=source.as_uri(), sha256=PAYLOAD_SHA, name="k3s"), cache)
    assert list((cache / "sha256").glob("*")) == []
    assert _partials(cache) == []


def test_missing_file_url_fails(tmp_path: Path, cache: Path) -> None:
    url = (tmp_path / "absent").as_uri()
    with pytest.raises(StrataError, match="does not exist"):
        fetch(Remote(url=url, sha256=PAYLOAD_SHA, name="k3s"), cache)


# --------------------------------------------------------------------------- helpers

UPSTREAM = "https://github.com/k3s-io/k3s/releases/download"
K3S_URL = f"{UPSTREAM}/v1.31.4%2Bk3s1/k3s"


@pytest.mark.parametrize(
    ("url", "mirror", "expected"),
    [
        (K3S_URL, None, K3S_URL),
        (K3S_URL, "", K3S_URL),
        (K3S_URL, "https://mirror.lan/k3s", "https://mirror.lan/k3s/v1.31.4%2Bk3s1/k3s"),
        (K3S_URL, "https://mirror.lan/k3s/", "https://mirror.lan/k3s/v1.31.4%2Bk3s1/k3s"),
        (K3S_URL, "file:///srv/mirror", "file:///srv/mirror/v1.31.4%2Bk3s1/k3s"),
        ("https://example.org/other/k3s", "https://mirror.lan", "https://example.org/other/k3s"),
        (f"{UPSTREAM}-extra/k3s", "https://mirror.lan", f"{UPSTREAM}-extra/k3s"),
    ],
)
def test_mirrored(url: str, mirror: str | None, expected: str) -> None:
    assert mirrored(url, mirror, UPSTREAM) == expected


def test_mirrored_accepts_prefix_with_trailing_slash() -> None:
    assert mirrored(K3S_URL, "https://m", UPSTREAM + "/") == "https://m/v1.31.4%2Bk3s1/k3s"


@pytest.mark.parametrize("sha256", ["", "abc", PAYLOAD_SHA.upper(), PAYLOAD_SHA + "0", "g" * 64])
def test_bad_sha256_is_rejected(sha256: str) -> None:
    with pytest.raises(StrataError) as failure:
        Remote(url="https://example.org/k3s", sha256=sha256, name="k3s")
    assert "k3s" in str(failure.value)
    assert "https://example.org/k3s" in str(failure.value)


def test_verify_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert verify_file(path, PAYLOAD_SHA)
    assert not verify_file(path, "0" * 64)
    assert not verify_file(tmp_path / "absent", PAYLOAD_SHA)
