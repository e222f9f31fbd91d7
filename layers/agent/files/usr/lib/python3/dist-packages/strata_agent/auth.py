"""Signed requests: Ed25519 signatures by one of the admin keys, with a timestamp and a one-time nonce.

The signed message (UTF-8) is

    strata-v1\\n{METHOD}\\n{PATH}\\n{TIMESTAMP}\\n{NONCE}\\n{sha256 hex of the body}

where PATH includes the query string, sent in X-Strata-Timestamp (unix seconds), X-Strata-Nonce
(16-64 of [A-Za-z0-9_-]) and X-Strata-Signature (base64). stratactl and the tests sign with
sign_request; the API checks with Authenticator.verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .fsutil import read_json, write_json

log = logging.getLogger(__name__)

SCHEME = "strata-v1"
TIMESTAMP_HEADER = "X-Strata-Timestamp"
NONCE_HEADER = "X-Strata-Nonce"
SIGNATURE_HEADER = "X-Strata-Signature"
ADMIN_KEYS_SETTING = "layers.agent.admin_keys"
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_TIMESTAMP = re.compile(r"^-?[0-9]{1,15}$")


def signing_message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{SCHEME}\n{method.upper()}\n{path}\n{timestamp}\n{nonce}\n{digest}".encode()


def sign_request(
    key: Ed25519PrivateKey,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The three X-Strata-* headers for a request."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    once = nonce or secrets.token_urlsafe(24)
    signature = key.sign(signing_message(method, path, stamp, once, body))
    return {
        TIMESTAMP_HEADER: stamp,
        NONCE_HEADER: once,
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
    }


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """An OpenSSH Ed25519 private key file (`ssh-keygen -t ed25519`)."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


@dataclass(frozen=True)
class AdminKey:
    key: Ed25519PublicKey
    comment: str


def load_admin_keys(lines: Sequence[str]) -> list[AdminKey]:
    """The Ed25519 keys among OpenSSH public key lines; others are skipped with a warning."""
    keys = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        comment = " ".join(fields[2:]) or f"key #{number}"
        try:
            key = serialization.load_ssh_public_key(line.strip().encode())
        except (ValueError, UnsupportedAlgorithm) as err:
            log.warning("admin key #%d is not an OpenSSH public key, skipped: %s", number, err)
            continue
        if not isinstance(key, Ed25519PublicKey):
            log.warning("admin key #%d (%s) is not Ed25519, skipped", number, comment)
            continue
        keys.append(AdminKey(key, comment))
    return keys


class NonceStore:
    """Nonces already used, each kept until its request's timestamp leaves the window (nonces.json)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        data = read_json(path) if path is not None else None
        if isinstance(data, dict):
            self._expiry = {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}

    def use(self, nonce: str, expires: float, now: float) -> bool:
        """Record `nonce`; False when it was used before."""
        with self._lock:
            self._expiry = {k: v for k, v in self._expiry.items() if v >= now}
            if nonce in self._expiry:
                return False
            self._expiry[nonce] = expires
            if self.path is not None:
                write_json(self.path, self._expiry, mode=0o600)
            return True


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Authenticator:
    def __init__(
        self,
        admin_keys: Sequence[str],
        window: int,
        nonces: NonceStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = load_admin_keys(admin_keys)
        self.window = window
        self.nonces = nonces
        self.clock = clock

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        timestamp: str | None,
        nonce: str | None,
        signature: str | None,
    ) -> str:
        """Check a request's signature headers; returns the signing key's comment, raises AuthError."""
        if not timestamp or not nonce or not signature:
            raise AuthError(
                401, f"signed request required: {TIMESTAMP_HEADER}, {NONCE_HEADER} and {SIGNATURE_HEADER}"
            )
        if not self.keys:
            raise AuthError(403, f"no admin keys configured: set {ADMIN_KEYS_SETTING} in the definition")
        if not _TIMESTAMP.match(timestamp):
            raise AuthError(403, f"{TIMESTAMP_HEADER} must be unix seconds")
        if not _NONCE.match(nonce):
            raise AuthError(403, f"{NONCE_HEADER} must be 16-64 characters of [A-Za-z0-9_-]")
        now = self.clock()
        if abs(now - int(timestamp)) > self.window:
            raise AuthError(403, f"timestamp outside the {self.window} s window (check the clocks)")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise AuthError(403, f"{SIGNATURE_HEADER} is not base64") from None
        message = signing_message(method, path, timestamp, nonce, body)
        for admin in self.keys:
            try:
                admin.key.verify(raw, message)
            except InvalidSignature:
                continue
            if not self.nonces.use(nonce, int(timestamp) + self.window, now):
                raise AuthError(403, "nonce already used (replayed request)")
            return admin.comment
        raise AuthError(403, "bad signature (unknown key, or the request was changed)")
