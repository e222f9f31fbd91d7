"""The local HTTP API. GET /status is open; every other request is authenticated first, then routed.

POST /activate                 JSON activation document; 202, 409 unless waiting for activation
POST /reboot, POST /shutdown   202, then `systemctl reboot` / `systemctl poweroff`
POST /steps/<step>/rerun       202; 404 for an unknown step, 409 while a step runs
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .activation import ActivationError, parse_activation
from .agent import Agent, Conflict, UnknownStep
from .auth import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Authenticator, AuthError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
_RERUN = re.compile(r"^/steps/([^/]+)/rerun$")
_POWER_ACTIONS = {"/reboot": "reboot", "/shutdown": "poweroff"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: ApiServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api = api
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "stratad"

    def __getattr__(self, name: str) -> Callable[[], None]:
        # Every method (do_GET, do_DELETE, do_ANYTHING) goes through the same authenticate-then-route.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("api %s: %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = (json.dumps(payload, indent=2) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self._error(400, "bad Content-Length")
            return None
        if int(length) > MAX_BODY:
            self._error(413, f"body larger than {MAX_BODY} bytes")
            return None
        return self.rfile.read(int(length))

    def _handle(self) -> None:
        try:
            self._authenticate_and_route()
        except Exception:
            log.exception("api: %s %s crashed", self.command, self.path)
            self._error(500, "internal error (see the agent log)")

    def _authenticate_and_route(self) -> None:
        api = self.server.api
        route = urlsplit(self.path).path
        if self.command == "GET" and route == "/status":
            self._send(200, api.agent.status())
            return
        body = self._read_body()
        if body is None:
            return
        try:
            who = api.authenticator.verify(
                self.command,
                self.path,
                body,
                timestamp=self.headers.get(TIMESTAMP_HEADER),
                nonce=self.headers.get(NONCE_HEADER),
                signature=self.headers.get(SIGNATURE_HEADER),
            )
        except AuthError as err:
            log.warning("api: %s %s refused (%d): %s", self.command, route, err.status, err.message)
            self._error(err.status, err.message)
            return
        log.info("api: %s %s signed by %s", self.command, route, who)
        self._route(api, route, body)

    def _route(self, api: ApiServer, route: str, body: bytes) -> None:
        if self.command != "POST":
            self._error(404, f"no {self.command} {route}")
        elif route == "/activate":
            self._activate(api, body)
        elif route in _POWER_ACTIONS:
            action = _POWER_ACTIONS[route]
            self._send(202, {"action": action})
            api.schedule(["systemctl", action])
        elif match := _RERUN.match(route):
            step = match[1]
            try:
                api.agent.request_rerun(step)
            except UnknownStep:
                self._error(404, f"unknown step {step!r}")
            except Conflict as err:
                self._error(409, str(err))
            else:
                self._send(202, {"rerun": step})
        else:
            self._error(404, f"no POST {route}")

    def _activate(self, api: ApiServer, body: bytes) -> None:
        try:
            doc = json.loads(body or b"{}")
            activation = parse_activation(doc, "api", api.agent.config.defaults)
        except json.JSONDecodeError as err:
            self._error(400, f"api: body is not JSON: {err}")
            return
        except ActivationError as err:
            self._error(400, str(err))
            return
        try:
            api.agent.activate(activation)
        except Conflict as err:
            self._error(409, str(err))
            return
        self._send(202, {"state": api.agent.current_state, "hostname": activation.hostname})


class ApiServer:
    def __init__(
        self,
        agent: Agent,
        authenticator: Authenticator,
        *,
        bind: str,
        port: int,
        action_delay: float = 1.0,
    ) -> None:
        self.agent = agent
        self.authenticator = authenticator
        self.action_delay = action_delay  # lets the 202 reach the client before a reboot
        self.httpd = _Server((bind, port), self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def schedule(self, command: list[str]) -> None:
        def run() -> None:
            result = self.agent.runner.run(command)
            if not result.ok:
                log.error("%s failed: %s", " ".join(command), result.stderr.strip())

        timer = threading.Timer(self.action_delay, run)
        timer.daemon = True
        timer.start()

    def start(self) -> None:
        # A short poll interval only makes stop() quick; requests are served as they come either way.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="api", daemon=True
        )
        self._thread.start()
        log.info("API listening on %s port %d", self.httpd.server_address[0], self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
