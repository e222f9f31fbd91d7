"""The Packer path: the definition's layers baked by Packer's qemu builder on a base disk image.

Nothing is provisioned twice: the VM gets the same bundle the chroot bake runs (`build.layer_bundle`,
packed as bundle.tar into the build's NoCloud seed ISO next to a throwaway SSH key) and runs its `run`
(packer/scripts/apply-bundle), which installs the layers' packages the base lacks, then the layers'
files, install.d and finalise.d (the os layer's finalise.d cleans cloud-init, the machine-id, the host
keys and the logs). packer/scripts/finish removes what only a build VM leaves behind.

The base is strata's own (the definition with only the os layer, built by the chroot path into
artifacts/<name>-packer-base/; no internet needed) or a cloud image given by URL and checksum. The
result goes to artifacts/<name>-packer/ with the chroot path's manifest.json, SHA256SUMS and
packages.txt.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from . import ROOT, bake, build, disk, host
from .artifacts import artifacts_root, atomic_file, staged_output
from .definition import Definition
from .errors import StrataError
from .log import info, step
from .proc import run
from .qemu import accel_for_tree, image_info, ssh_keypair
from .rootfs import cache_root
from .seed import Seed, write_seed_iso

PACKER_DIR = ROOT / "packer"
TEMPLATE = "strata.pkr.hcl.j2"
SCRIPTS = {"apply": PACKER_DIR / "scripts" / "apply-bundle", "finish": PACKER_DIR / "scripts" / "finish"}
KEY_COMMENT = "strata-packer-build"  # packer/scripts/finish removes the key by this comment
PLUGINS_SINCE = (1, 7, 0)  # Packer versions that take builders as plugins want `required_plugins`
GiB = 1 << 30
# disk.size auto: the base's size plus room for the layers' packages and images; a cloud image's size
# is unknown until Packer fetches it, so it gets a fixed size (set disk.size for another)
AUTO_HEADROOM = 2 * GiB
CLOUD_AUTO_SIZE = 8 * GiB
UNBUILT_BASE_SIZE = 2 * GiB  # what `render` assumes before strata's base exists
CHECKSUM = re.compile(r"(none|file:\S+|(md5|sha1|sha256|sha512):[0-9a-fA-F]+)")


@dataclass(frozen=True)
class Base:
    """The disk the Packer VM boots and bakes the layers onto."""

    url: str  # a local path or a URL Packer fetches
    checksum: str  # Packer's iso_checksum: "sha256:HEX", "file:URL" or "none"
    description: str
    strata: bool  # strata's own base (built here, from the definition)

    @property
    def extension(self) -> str:
        """What Packer names its cached copy; any disk format qemu-img reads works."""
        suffix = Path(self.url.split("?")[0]).suffix.lstrip(".")
        return suffix if suffix in ("qcow2", "img", "raw") else "img"


def artifact_name(defn: Definition) -> str:
    return f"{defn.data['name']}-packer"


def output_dir(defn: Definition) -> Path:
    return artifacts_root() / artifact_name(defn)


def work_dir(defn: Definition) -> Path:
    return artifacts_root() / ".work" / artifact_name(defn)


# ---------------------------------------------------------------- the base image


def base_definition(defn: Definition) -> Definition:
    """`defn` with only the os layer, as one qcow2 of automatic size: strata's own Packer base."""
    data = copy.deepcopy(defn.data)
    data["name"] = f"{defn.data['name']}-packer-base"
    for name, settings in data["layers"].items():
        settings["enabled"] = name == "os"
    data["disk"]["formats"] = ["qcow2"]
    data["disk"]["size"] = "auto"
    return dataclasses.replace(defn, data=data)


def strata_base(defn: Definition) -> Base:
    """strata's base for `defn` (built or not): its qcow2 and, once built, its checksum."""
    base = base_definition(defn)
    out = build.output_dir(base)
    image = out / f"{base.data['name']}.qcow2"
    sums = out / "SHA256SUMS"
    checksum = "none"
    if image.exists() and sums.exists():
        table = {name: digest for digest, name in (line.split() for line in sums.read_text().splitlines())}
        checksum = f"sha256:{table[image.name]}" if image.name in table else "none"
    return Base(
        url=str(image),
        checksum=checksum,
        description=f"strata's base: {defn.path.name} with only the os layer (built by the chroot path)",
        strata=True,
    )


def cloud_base(url: str, checksum: str) -> Base:
    """A cloud image (e.g. Debian's genericcloud qcow2) by URL or path and checksum."""
    if not url:
        raise StrataError("--base-url is empty; give a cloud image URL (or path) with --base-checksum")
    checksum = checksum.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", checksum):
        checksum = f"sha256:{checksum}"
    if not checksum or checksum == "none" or not CHECKSUM.fullmatch(checksum):
        raise StrataError(
            f"--base-checksum {checksum!r}: expected sha256:HEX (or sha512:HEX, or file:URL of a "
            "SHA256SUMS/SHA512SUMS file) for the image at --base-url"
        )
    return Base(url=url, checksum=checksum, description=f"cloud image {url}", strata=False)


def base_is_current(defn: Definition) -> bool:
    """Is strata's base built from this definition as it is now?"""
    base = base_definition(defn)
    manifest = build.output_dir(base) / "manifest.json"
    if not manifest.exists() or not (build.output_dir(base) / f"{base.data['name']}.qcow2").exists():
        return False
    return bool(json.loads(manifest.read_text()).get("definition_digest") == base.digest())


def ensure_strata_base(defn: Definition) -> Base:
    """Build strata's base with the chroot path (prepare, assemble) unless it is current."""
    base = base_definition(defn)
    if base_is_current(defn):
        info(f"base image: {build.output_dir(base)} (current)")
    else:
        with step(f"base image {base.data['name']} (os layer only, chroot path)"):
            build.prepare(base)
            build.assemble(base)
    return strata_base(defn)


def disk_size(defn: Definition, base: Base) -> int:
    """Bytes of the built disk: disk.size, or for auto the base's size plus headroom."""
    size = defn.data["disk"]["size"]
    if size != "auto":
        return int(size)
    if not base.strata:
        return CLOUD_AUTO_SIZE
    image = Path(base.url)
    size = int(image_info(image)["virtual-size"]) if image.exists() else UNBUILT_BASE_SIZE
    return disk.align(size + AUTO_HEADROOM)


# ---------------------------------------------------------------- Packer itself


def packer_version() -> tuple[int, int, int] | None:
    """The installed Packer's version, or None when it is not installed."""
    if shutil.which("packer") is None:
        return None
    out = run(["packer", "version"], env={**os.environ, "CHECKPOINT_DISABLE": "1"}, what="packer version")
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not found:
        raise StrataError(f"cannot read Packer's version from `packer version`: {out.strip()!r}")
    major, minor, patch = (int(n) for n in found.groups())
    return major, minor, patch


def packer_env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",  # no call home
        "PACKER_CACHE_DIR": str(cache_root() / "packer"),  # downloaded cloud images, kept between builds
        "PACKER_LOG": "1",
        "PACKER_LOG_PATH": str(work / "packer.log"),
    }


def hcl(value: Any) -> str:
    """An HCL2 literal: strings quoted (JSON escapes, template sequences escaped), lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(hcl(v) for v in value) + "]"
    text = json.dumps(str(value), ensure_ascii=False)
    return text.replace("${", "$${").replace("%{", "%%{")


@dataclass(frozen=True)
class Paths:
    """Where one Packer build keeps its files (work/…): what the template points at."""

    work: Path

    @property
    def template(self) -> Path:
        return self.work / "strata.pkr.hcl"

    @property
    def key(self) -> Path:
        return self.work / "build-key"

    @property
    def seed(self) -> Path:
        return self.work / "build-seed.iso"

    @property
    def bundle_tar(self) -> Path:
        return self.work / "bundle.tar"

    @property
    def output(self) -> Path:
        return self.work / "packer-output"

    @property
    def packages(self) -> Path:
        return self.work / "packages.txt"

    @property
    def serial(self) -> Path:
        return self.work / "serial.log"

    @property
    def ovmf_vars(self) -> Path:
        return self.work / "OVMF_VARS.fd"


def uefi_only(defn: Definition) -> bool:
    """The build VM boots SeaBIOS, like Packer's default, unless the image has no BIOS boot code."""
    return "bios" not in defn.data["disk"]["firmware"]


def render_template(
    defn: Definition, base: Base, paths: Paths, *, accel: str, size: int, version: tuple[int, int, int] | None
) -> str:
    """The HCL2 template for `defn` on `base` (packer/strata.pkr.hcl.j2)."""
    loader = jinja2.FileSystemLoader(str(PACKER_DIR))
    jenv = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    jenv.filters["hcl"] = hcl
    vcfg = defn.data["verify"]
    return jenv.get_template(TEMPLATE).render(
        uefi=uefi_only(defn),
        ovmf_code=str(host.OVMF_CODE),
        ovmf_vars=str(paths.ovmf_vars),
        definition_file=defn.path.name,
        required_plugins=version is not None and version >= PLUGINS_SINCE,
        accel=accel,
        base=base,
        output_dir=str(paths.output),
        vm_name=f"{artifact_name(defn)}.raw",
        disk_size=f"{size // (1 << 20)}M",
        memory=vcfg["memory"],
        cpus=vcfg["cpus"],
        seed_iso=str(paths.seed),
        serial_log=str(paths.serial),
        ssh_key=str(paths.key),
        ssh_timeout=vcfg["boot_timeout"],
        scripts={name: str(path) for name, path in SCRIPTS.items()},
        packages_txt=str(paths.packages),
        installed_packages=f"/{bake.BAKE_DIR}/{bake.INSTALLED_PACKAGES}",
    )


def build_key(paths: Paths, fresh: bool) -> str:
    """The build's throwaway SSH key (made anew for each build); returns the public key."""
    return ssh_keypair(paths.key, KEY_COMMENT, fresh)


def accel_for(defn: Definition, base: Base) -> str:
    """kvm where a probe boot of the base's kernel works, else tcg (builder.qemu.choose_accel)."""
    tree = build.work_dir(base_definition(defn)) / "rootfs"
    return accel_for_tree(defn.data["verify"]["accel"], tree if base.strata else None)


def render(defn: Definition, base: Base | None = None) -> Path:
    """Write the template for `defn` (strata's base unless `base`) and the build key it names; the
    template's path."""
    base = base or strata_base(defn)
    paths = Paths(work_dir(defn))
    build_key(paths, fresh=False)
    version = packer_version()
    if version is None:
        info("packer is not installed (apt-get install packer): rendered for Packer before 1.7")
    if base.strata and base.checksum == "none":
        info(f"{base.url} is not built yet (`invoke packer.build` builds it): rendered without its checksum")
    if uefi_only(defn):
        host.require_file(host.OVMF_CODE, "ovmf")
        shutil.copyfile(host.OVMF_VARS, paths.ovmf_vars)
    text = render_template(
        defn, base, paths, accel=accel_for(defn, base), size=disk_size(defn, base), version=version
    )
    with atomic_file(paths.template) as tmp:
        tmp.write_text(text)
    return paths.template


def validate(template: Path) -> None:
    """`packer validate` on a rendered template (`packer init` first where Packer wants plugins)."""
    host.require_tools("packer")
    env = packer_env(template.parent)
    init_plugins(template, env)
    run(["packer", "validate", str(template)], env=env, what=f"packer validate {template}")


def init_plugins(template: Path, env: dict[str, str]) -> None:
    """`packer init` where the installed Packer takes builders as plugins (1.7 and later)."""
    version = packer_version()
    if version is not None and version >= PLUGINS_SINCE:
        run(["packer", "init", str(template)], env=env, what="packer init (needs the internet)")


# ---------------------------------------------------------------- the build


def _root_owned(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def pack_bundle(bundle: Path, out: Path) -> Path:
    """The bundle folder as one tar (modes and links kept, owned by root)."""
    with atomic_file(out) as tmp, tarfile.open(tmp, "w") as tar:
        tar.add(bundle, arcname=".", filter=_root_owned)
    return out


def build_seed(defn: Definition, paths: Paths) -> Path:
    """The build VM's NoCloud seed: root login with the throwaway key only, no default user, and the
    bundle as bundle.tar."""
    seed = Seed(
        hostname=defn.data["os"]["hostname"],
        ssh_authorized_keys=[build_key(paths, fresh=True)],
        root_login=True,
        default_user=False,
    )
    return write_seed_iso(seed, paths.seed, extra={"bundle.tar": paths.bundle_tar})


def run_packer(defn: Definition, template: Path, paths: Paths) -> Path:
    """`packer build`; the raw disk it wrote."""
    env = packer_env(paths.work)
    init_plugins(template, env)
    shutil.rmtree(paths.output, ignore_errors=True)  # Packer refuses an existing output folder
    for stale in (paths.packages, paths.serial, paths.work / "packer.log"):
        stale.unlink(missing_ok=True)
    try:
        run(
            ["packer", "build", "-color=false", str(template)],
            env=env,
            cwd=paths.work,
            show=lambda _line: True,
            what="packer build",
        )
    except StrataError as exc:
        raise StrataError(
            f"{exc}\n  Packer's log: {paths.work / 'packer.log'}; the VM's console: {paths.serial}"
        ) from None
    raw = paths.output / f"{artifact_name(defn)}.raw"  # the template's vm_name
    if not raw.exists() or not paths.packages.exists():
        raise StrataError(f"packer build finished without {raw} or {paths.packages}; see {paths.work}")
    return raw


def build_image(defn: Definition, base: Base | None = None) -> Path:
    """Bake `defn` with Packer on `base` (strata's own by default); the output folder."""
    host.require_root("invoke packer.build")
    host.require_tools("packer", "qemu-system-x86_64", "qemu-img", "ssh-keygen", "mmdebstrap")
    paths = Paths(work_dir(defn))
    paths.work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, dict[str, float]] = {}

    def timed(phase: str, start: float) -> None:
        phases[phase] = {"seconds": round(time.monotonic() - start, 1)}

    with step(f"packer build {artifact_name(defn)}"):
        start = time.monotonic()
        if base is None:
            base = ensure_strata_base(defn)
            timed("base", start)
        start = time.monotonic()
        with step("layer bundle (the one the chroot bake runs)"):
            bundle = build.layer_bundle(defn, paths.work)
            pack_bundle(bundle, paths.bundle_tar)
            build_seed(defn, paths)
        timed("bundle", start)
        start = time.monotonic()
        template = render(defn, base)
        with step(f"packer build ({template})"):
            raw = run_packer(defn, template, paths)
        timed("packer", start)
        start = time.monotonic()
        name = artifact_name(defn)
        with step("outputs"), staged_output(output_dir(defn)) as out:
            staged = out / f"{name}.raw"
            shutil.move(raw, staged)
            names = build.disk_formats(defn, staged)
            timed("outputs", start)
            build.write_manifest(
                defn,
                out,
                names,
                paths.work,
                phases,
                _disk_info(base),
                backend="packer",
                base=_base_info(base),
            )
        for stale in (paths.output, paths.bundle_tar, paths.seed):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    for n in names:
        info(f"{output_dir(defn) / n}: {(output_dir(defn) / n).stat().st_size / 2**20:.0f} MiB")
    return output_dir(defn)


def _base_info(base: Base) -> dict[str, Any]:
    return {"url": base.url, "checksum": base.checksum, "strata": base.strata}


def _disk_info(base: Base) -> dict[str, Any]:
    """The disk's identifiers and firmware: strata's base's (from its manifest), else the cloud image's."""
    if base.strata:
        manifest = Path(base.url).parent / "manifest.json"
        return dict(json.loads(manifest.read_text())["disk"])
    return {"firmware": "as the base image"}


def image_path(defn: Definition) -> Path:
    """The Packer-baked image to verify or boot: the qcow2 if written, else the raw."""
    out, name = output_dir(defn), artifact_name(defn)
    for candidate in (out / f"{name}.qcow2", out / f"{name}.raw"):
        if candidate.exists():
            return candidate
    raise StrataError(f"no Packer-baked image in {out}: run `invoke packer.build` first")
