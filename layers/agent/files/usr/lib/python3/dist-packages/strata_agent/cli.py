"""stratactl: show the agent's status, and send it signed commands.

stratactl status [--json]
stratactl --url http://HOST:18088 --key ~/.ssh/id_ed25519 activate FILE | reboot | shutdown | rerun STEP
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import UnsupportedAlgorithm

from .auth import load_private_key, sign_request
from .config import ConfigError, load_config
from .paths import Paths
from .state import StateStore, status_view

TIMEOUT = 10.0


def _request(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url.rstrip("/") + path, data=body or None, method=method)
    for name, value in headers.items():
        request.add_header(name, value)
    if body:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except json.JSONDecodeError:
            return err.code, {"error": raw.decode(errors="replace")}


def _fmt_seconds(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else ""


def format_status(status: dict[str, Any]) -> str:
    """The status for people."""
    lines = [f"state:       {status.get('state')}"]
    if status.get("current_step"):
        lines[0] += f" (running {status['current_step']})"
    if status.get("activation_error"):
        lines.append(f"activation:  REJECTED: {status['activation_error']}")
    if status.get("hostname"):
        lines.append(f"hostname:    {status['hostname']}.{status.get('domain')}")
    for label, key in (("node name:", "node_name"), ("node IP:", "node_ip"), ("role:", "role")):
        if status.get(key):
            lines.append(f"{label:<12} {status[key]}")
    addresses = status.get("addresses") or []
    if addresses:
        shown = ", ".join(f"{a.get('address')}/{a.get('prefix')} ({a.get('interface')})" for a in addresses)
        lines.append(f"addresses:   {shown}")
    gpu = status.get("gpu")
    if isinstance(gpu, dict):
        if gpu.get("present"):
            names = ", ".join(d.get("model") or d.get("name", "?") for d in gpu.get("devices", []))
            driver = f" (driver {gpu['driver']})" if gpu.get("driver") else " (no driver)"
            lines.append(f"GPU:         {names}{driver}")
        else:
            lines.append("GPU:         none")
    if status.get("activation_source"):
        lines.append(f"activation:  from {status['activation_source']}")
    if status.get("version"):
        lines.append(f"agent:       {status['version']}")
    steps = status.get("steps") or []
    if steps:
        lines.append("steps:")
        for step in steps:
            row = f"  {step['name']:<16} {step['status']:<8} {_fmt_seconds(step.get('seconds'))}"
            lines.append(row.rstrip())
    failed = status.get("failed")
    if failed:
        lines.append(f"failed:      step {failed.get('step')}: {failed.get('error')}")
        lines.extend(f"  | {line}" for line in failed.get("log_tail") or [])
    for event in status.get("events") or []:
        if event.get("kind") == "ip-change":
            lines.append(f"event:       {event.get('time')} node IP {event.get('old')} -> {event.get('new')}")
    return "\n".join(lines) + "\n"


def _status(args: argparse.Namespace, url: str, paths: Paths) -> int:
    try:
        code, status = _request(url, "GET", "/status", b"", {})
        if code != 200:
            raise OSError(f"HTTP {code}")
        note = ""
    except (OSError, ValueError) as err:
        if not paths.state_file.exists():
            print(f"stratactl: no answer from {url} ({err}) and no {paths.state_file}", file=sys.stderr)
            return 1
        status = status_view(StateStore(paths.state_file).load())
        note = f"(the API at {url} does not answer: {err}; read from {paths.state_file})\n"
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        sys.stdout.write(note + format_status(status))
    return 0


def _signed(args: argparse.Namespace, url: str) -> int:
    if args.key is None:
        print("stratactl: this command needs --key PATH (an OpenSSH Ed25519 private key)", file=sys.stderr)
        return 2
    try:
        try:
            key = load_private_key(args.key)
        except TypeError:  # encrypted, and no passphrase given
            key = load_private_key(args.key, getpass.getpass(f"passphrase for {args.key}: ").encode())
    except UnsupportedAlgorithm as err:  # encrypted OpenSSH keys need the bcrypt module
        print(f"stratactl: cannot decrypt {args.key} ({err}): install python3-bcrypt", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"stratactl: cannot load {args.key}: {err}", file=sys.stderr)
        return 2
    body = b""
    if args.command == "activate":
        try:
            doc = yaml.safe_load(Path(args.file).read_text())
        except (OSError, yaml.YAMLError) as err:
            print(f"stratactl: cannot read {args.file}: {err}", file=sys.stderr)
            return 2
        body = json.dumps(doc if doc is not None else {}).encode()
        path = "/activate"
    elif args.command == "rerun":
        path = f"/steps/{args.step}/rerun"
    else:
        path = f"/{args.command}"
    try:
        code, reply = _request(url, "POST", path, body, sign_request(key, "POST", path, body))
    except OSError as err:
        print(f"stratactl: {url}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if 200 <= code < 300 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stratactl", description="talk to the strata agent (stratad)")
    parser.add_argument("--url", help="agent API (default http://127.0.0.1:<port from agent.json>)")
    parser.add_argument("--key", type=Path, help="OpenSSH Ed25519 private key for signed commands")
    parser.add_argument("--root", type=Path, default=Path("/"), help="root prefix for local files")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show the agent's state")
    status.add_argument("--json", action="store_true", help="raw JSON")
    activate = commands.add_parser("activate", help="activate with a YAML/JSON activation file")
    activate.add_argument("file")
    commands.add_parser("reboot", help="reboot the machine")
    commands.add_parser("shutdown", help="power the machine off")
    rerun = commands.add_parser("rerun", help="run a step and every later step again")
    rerun.add_argument("step")
    args = parser.parse_args(argv)

    paths = Paths(args.root)
    url = args.url
    if url is None:
        try:
            port = load_config(paths.config_file).api_port
        except ConfigError:
            port = 18088
        url = f"http://127.0.0.1:{port}"
    if args.command == "status":
        return _status(args, url, paths)
    return _signed(args, url)
