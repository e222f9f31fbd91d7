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

from invoke.collection import Collection
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
        "image": "verify this disk image (e.g. the Packer path's qcow2) instead of the definition's build",
        "skip_iso": "do not install from the ISO (when the definition writes one)",
    }
)
@clean_errors
def verify(
    c: Context,
    definition: str | None = None,
    offline_only: bool = False,
    firmware: str | None = None,
    image: str | None = None,
    skip_iso: bool = False,
) -> None:
    """Phase 4: testinfra on the baked tree (chroot), then on the qcow2 booted under QEMU and on a disk
    installed from the ISO, over SSH, once the agent reports ready."""
    from builder import verify as verify_mod

    if image:
        verify_mod.verify_image(
            _load(definition), Path(image), booted=not offline_only, only_firmware=firmware
        )
        return
    verify_mod.verify(_load(definition), booted=not offline_only, only_firmware=firmware, iso=not skip_iso)


@task(help=DEF_HELP)
@clean_errors
def iso(c: Context, definition: str | None = None) -> None:
    """Write the hybrid installer ISO (BIOS and UEFI, CD or USB stick) with the other outputs: runs
    assemble with `iso` added to the definition's formats."""
    from builder import build as build_mod

    defn = _load(definition)
    if "iso" not in defn.data["disk"]["formats"]:
        defn.data["disk"]["formats"].append("iso")
    build_mod.assemble(defn)


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


# ---------------------------------------------------------------- packer.* (the Packer path)

PACKER_HELP = {
    **DEF_HELP,
    "base_url": "bake on this cloud image (URL or path) instead of strata's own base; needs --base-checksum",
    "base_checksum": "the cloud image's checksum: sha256:HEX, sha512:HEX or file:URL-of-SHA256SUMS",
}


def _packer_base(base_url: str | None, base_checksum: str | None) -> Any:
    from builder import packer

    if base_url is None and base_checksum is None:
        return None
    if not (base_url and base_checksum):
        raise StrataError(
            "--base-url and --base-checksum go together: give both, or neither for strata's base"
        )
    return packer.cloud_base(base_url, base_checksum)


def _packer_collection() -> Collection:
    """The `packer` namespace; its tasks live here so they are not also top-level tasks."""

    @task(help=PACKER_HELP)
    @clean_errors
    def render(
        c: Context,
        definition: str | None = None,
        base_url: str | None = None,
        base_checksum: str | None = None,
    ) -> None:
        """Render the Packer template (packer/strata.pkr.hcl.j2) for a definition and `packer validate` it."""
        from builder import packer

        template = packer.render(_load(definition), _packer_base(base_url, base_checksum))
        if packer.packer_version() is None:
            print(f"{template} (not validated: packer is not installed; apt-get install packer)")
            return
        packer.validate(template)
        print(f"{template}: valid")

    @task(
        help={
            **PACKER_HELP,
            "skip_verify": "stop after the image is written",
            "firmware": "verify only uefi|bios",
        }
    )
    @clean_errors
    def build(
        c: Context,
        definition: str | None = None,
        base_url: str | None = None,
        base_checksum: str | None = None,
        skip_verify: bool = False,
        firmware: str | None = None,
    ) -> None:
        """Bake the layers with Packer's qemu builder into artifacts/<name>-packer/, then verify the image."""
        from builder import packer
        from builder import verify as verify_mod

        defn = _load(definition)
        packer.build_image(defn, _packer_base(base_url, base_checksum))
        if not skip_verify:
            verify_mod.verify_image(defn, packer.image_path(defn), only_firmware=firmware)

    return Collection("packer", render, build)


# Keep this last: it collects every task defined above, then adds the packer.* namespace.
ns = Collection.from_module(sys.modules[__name__])
ns.add_collection(_packer_collection())
