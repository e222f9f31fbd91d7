"""A local K3s mirror on 127.0.0.1 holding the TEST STAND-IN (k3s_standin.py), never real K3s.

Tests build images against it through the same variables a user sets for a real mirror:
STRATA_MIRROR, STRATA_K3S_VERSION and STRATA_K3S_SHA256 (and no airgap images, which it lacks).
Run it by hand to try the stand-in build: `python3 tests/standins/mirror.py` prints the variables.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STANDIN = Path(__file__).with_name("k3s_standin.py")
STANDIN_VERSION = "v0.0.0-standin"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def standin_mirror() -> Iterator[dict[str, str]]:
    """Serve `<version>/k3s` (the stand-in) on a free port; yields the build environment for it."""
    with tempfile.TemporaryDirectory(prefix="strata-k3s-mirror-") as root:
        release = Path(root) / STANDIN_VERSION
        release.mkdir()
        shutil.copyfile(STANDIN, release / "k3s")
        digest = hashlib.sha256((release / "k3s").read_bytes()).hexdigest()
        (release / "sha256sum-amd64.txt").write_text(f"{digest}  k3s\n")
        handler = functools.partial(_QuietHandler, directory=root)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield {
                "STRATA_MIRROR": f"http://127.0.0.1:{server.server_address[1]}",
                "STRATA_K3S_VERSION": STANDIN_VERSION,
                "STRATA_K3S_SHA256": digest,
                "STRATA_K3S_AIRGAP_IMAGES": "0",
            }
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    with standin_mirror() as env:
        print("# K3s TEST STAND-IN mirror (not K3s); in another shell:")
        for name, value in env.items():
            print(f"export {name}={value}")
        print("# then ./strata build   (Ctrl-C here stops the mirror)")
        threading.Event().wait()
