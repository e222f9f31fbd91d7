"""strata's command line: `invoke --list` (or `./strata --list`)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from builder import ROOT
from builder.errors import StrataError

F = TypeVar("F", bound=Callable[..., Any])
DEF_HELP = {"definition": "image definition YAML (default: definitions/default.yaml)"}


def clean_errors(fn: F) -> F:
    """Report StrataError as one message and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StrataError as exc:
            print(f"strata: error: {exc}", file=sys.stderr)
            raise Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _load(definition: str | None) -> Any:
    from builder.definition import load_definition

    return load_definition(Path(definition) if definition else None)


@task(help=DEF_HELP)
@clean_errors
def validate(c: Context, definition: str | None = None) -> None:
    """Check the definition (and the layers it uses) without building anything."""
    defn = _load(definition)
    print(f"{defn.path}: valid (schema 1, {len(defn.enabled_layers())} layers enabled)")


@task(help=DEF_HELP)
@clean_errors
def summary(c: Context, definition: str | None = None) -> None:
    """Print the resolved definition: every setting, defaults and environment overrides included."""
    from builder.definition import summary as render_summary

    print(render_summary(_load(definition)))


@task(help=DEF_HELP)
@clean_errors
def download(c: Context, definition: str | None = None) -> None:
    """Phase 1: fetch and verify every remote input into the cache."""
    from builder import build

    build.download(_load(definition))


@task(help=DEF_HELP)
@clean_errors
def prepare(c: Context, definition: str | None = None) -> None:
    """Phase 2: build the root filesystem and bake the layers."""
    from builder import build

    build.prepare(_load(definition))


@task(help=DEF_HELP)
@clean_errors
def assemble(c: Context, definition: str | None = None) -> None:
    """Phase 3: write the disk images, SHA256SUMS, manifest.json and packages.txt."""
    from builder import build

    build.assemble(_load(definition))


@task(
    help={
        **DEF_HELP,
        "offline_only": "only the chroot suite",
        "firmware": "boot only this firmware (uefi|bios)",
    }
)
@clean_errors
def verify(
    c: Context, definition: str | None = None, offline_only: bool = False, firmware: str | None = None
) -> None:
    """Phase 4: testinfra on the baked tree (chroot), then on the image booted under QEMU over SSH."""
    from builder import verify as verify_mod

    verify_mod.verify(_load(definition), booted=not offline_only, only_firmware=firmware)


@task(help={**DEF_HELP, "skip_verify": "stop after assemble"})
@clean_errors
def build(c: Context, definition: str | None = None, skip_verify: bool = False) -> None:
    """All phases: download, prepare, assemble, verify."""
    from builder import build as build_mod
    from builder.log import step

    defn = _load(definition)
    with step(f"build {defn.data['name']}"):
        build_mod.download(defn)
        build_mod.prepare(defn)
        build_mod.assemble(defn)
        if not skip_verify:
            from builder import verify as verify_mod

            verify_mod.verify(defn, booted=True)


@task(help=DEF_HELP)
@clean_errors
def bench(c: Context, definition: str | None = None) -> None:
    """Time every phase cold (empty caches) and warm, with artifact sizes and boot-to-SSH time."""
    from builder.bench import run as run_bench

    run_bench(_load(definition))


@task
def docs(c: Context) -> None:
    """Regenerate the environment-variable table in README.md from the settings table."""
    from builder.definition import env_table_markdown

    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- env-table -->", "<!-- /env-table -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n{env_table_markdown()}{end}{tail}")
    print("README.md: environment table updated")


@task(help={"args": "extra pytest arguments, e.g. '-k definition'"})
def test(c: Context, args: str = "") -> None:
    """Run every test: lint and types, unit tests, then the image build and its booted verification."""
    start = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", *args.split()], cwd=ROOT, env=os.environ.copy())
    print(f"tests finished in {time.monotonic() - start:.0f}s")
    if code:
        raise Exit(code=code)
