"""testinfra suite for built images, run by `invoke verify` against a chroot or a booted VM.

The context (what the definition promises) comes from the JSON file in STRATA_VERIFY_CONTEXT.
Tests marked `booted` need a running system and are skipped on the chroot.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "booted: needs the image booted (skipped on the chroot)")


@pytest.fixture(scope="session")
def ctx() -> dict[str, Any]:
    path = os.environ.get("STRATA_VERIFY_CONTEXT")
    if not path:
        pytest.skip("run through `invoke verify` (STRATA_VERIFY_CONTEXT is not set)")
    return dict(json.loads(open(path).read()))


@pytest.fixture(autouse=True)
def _only_when_booted(request: pytest.FixtureRequest, ctx: dict[str, Any]) -> None:
    if request.node.get_closest_marker("booted") and ctx["mode"] != "booted":
        pytest.skip("needs the booted image")
