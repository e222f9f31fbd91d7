"""A hybrid installer ISO written with pycdlib: boots from CD or USB stick, on BIOS and UEFI.

Contents: the image's kernel, an installer initrd (the image's own initramfs-tools with
templates/iso/initramfs), the raw disk image inside a squashfs, and a GRUB menu offering "Install to
disk" (the default) and "Boot live". El Torito has a BIOS entry (GRUB's eltorito image) and a UEFI
entry (a FAT image holding BOOTX64.EFI). The first 512 bytes are GRUB's hybrid MBR, so the same file
written to a USB stick boots on BIOS, and an MBR partition of type EF over the FAT image lets UEFI
firmware boot it from a stick too (what xorriso's --grub2-mbr and --grub2-boot-info do).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pycdlib

from . import TEMPLATES_DIR
from .artifacts import atomic_file
from .bake import render
from .chroot import chroot_run, mounted
from .definition import Definition
from .disk import ROOT_START, SECTOR, MiB, grub_mkimage, make_efi_fat
from .errors import StrataError
from .host import require_tools
from .log import info, step
from .proc import run
from .seed import add_iso_file

ISO_DIR = TEMPLATES_DIR / "iso"
IN_TREE = "var/tmp/strata-iso"  # scratch space inside the prepared tree, for chroot tools
ELTORITO_PATCH_OFFSET = 2548  # diskboot's block list in GRUB's eltorito image (xorriso --grub2-boot-info)
MBR_KERNEL_SECTOR = 0x1B0
# El Torito BIOS GRUB: only what the menu needs. With every module (a 180 KiB image) GRUB comes up
# corrupted from a CD on SeaBIOS ("out of memory" reading its menu).
BIOS_MODULES = ["biosdisk", "iso9660", "part_msdos", "normal", "search", "search_fs_file", "linux"]
BIOS_MODULES += ["echo", "test", "serial", "terminal"]


@dataclass(frozen=True)
class IsoFiles:
    kernel: Path
    initrd: Path
    squashfs: Path
    image_env: str
    grub_cfg: str
    eltorito: Path
    efi_img: Path
    mbr: bytes
    marker: str


def volume_label(name: str) -> str:
    """The volume id naming the image: d-characters, at most 16 (Joliet stores it in UCS-2 in 32
    bytes); a longer name keeps its start and gets a short hash, so labels stay distinct."""
    label = re.sub(r"[^A-Z0-9_]", "_", f"STRATA_{name.upper()}")
    if len(label) <= 16:
        return label
    return f"{label[:11]}_{hashlib.sha256(name.encode()).hexdigest()[:4].upper()}"


def _kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "lib" / "modules").iterdir())
    if not versions:
        raise StrataError(f"{tree}: no kernel in the prepared tree; is linux-image-amd64 in the os layer?")
    return versions[-1]


def make_initrd(tree: Path, out: Path) -> None:
    """The installer initrd: the tree's initramfs-tools with strata's ISO hook and boot script."""
    scratch = tree / IN_TREE
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(ISO_DIR / "initramfs", scratch / "conf")
    shutil.copy2(ISO_DIR / "strata-install", scratch / "strata-install")
    for sub in ("conf.d", "scripts/init-top"):
        (scratch / "conf" / sub).mkdir(parents=True, exist_ok=True)
    try:
        with mounted(tree):
            chroot_run(
                tree,
                [
                    "env",
                    f"STRATA_INSTALLER=/{IN_TREE}/strata-install",
                    "mkinitramfs",
                    "-d",
                    f"/{IN_TREE}/conf",
                    "-o",
                    f"/{IN_TREE}/initrd.img",
                    _kernel_version(tree),
                ],
                what="mkinitramfs (installer)",
            )
        shutil.move(scratch / "initrd.img", out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def make_squashfs(raw: Path, out: Path) -> None:
    """The raw disk image inside a squashfs: compressed, yet readable at any offset (live boot)."""
    holder = out.parent / "squashfs-root"
    shutil.rmtree(holder, ignore_errors=True)
    holder.mkdir(parents=True)
    try:
        os.link(raw, holder / "disk.raw")
    except OSError:
        shutil.copyfile(raw, holder / "disk.raw")
    out.unlink(missing_ok=True)
    try:
        run(
            ["mksquashfs", str(holder), str(out), "-comp", "zstd", "-Xcompression-level", "6", "-quiet"],
            what="mksquashfs",
        )
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def prepare_files(defn: Definition, tree: Path, raw: Path, raw_sha256: str, work: Path) -> IsoFiles:
    work.mkdir(parents=True, exist_ok=True)
    name = defn.data["name"]
    label = volume_label(name)
    marker = f"id-{hashlib.sha256(f'{name}:{defn.digest()}'.encode()).hexdigest()[:16]}"
    with step("installer initrd"):
        make_initrd(tree, work / "initrd.img")
    with step("image squashfs"):
        make_squashfs(raw, work / "image.squashfs")
    args = ["console=tty0", "console=ttyS0,115200n8", *defn.data["os"]["kernel_cmdline"]]
    iso_settings = defn.data["iso"]
    if iso_settings["install_target"]:
        args.append(f"strata.install.target={iso_settings['install_target']}")
        if iso_settings["install_force"]:
            args.append("strata.install.force=1")
    menu = render(
        "iso/grub.cfg.j2",
        {
            "timeout": iso_settings["timeout"],
            "label": label,
            "title": f"strata {name}",
            "cmdline": " ".join(args),
        },
    )
    # GRUB finds the ISO by a marker file, then normal mode reads the menu from it (as grub-mkrescue
    # does). The embedded config runs in GRUB's rescue parser: no menus, no quotes in comments.
    early = f"search --no-floppy --file --set=root /strata/{marker}\nset prefix=($root)/boot/grub\n"
    with step("GRUB for CD and stick (BIOS and UEFI)"):
        grub_mkimage(tree, {"i386-pc-eltorito": ("eltorito.img", work / "eltorito.img")}, early, BIOS_MODULES)
        grub_mkimage(tree, {"x86_64-efi": ("BOOTX64.EFI", work / "BOOTX64.EFI")}, early)
        # the FAT image UEFI boots from: GRUB and a little room, in whole MiB
        efi_size = (work / "BOOTX64.EFI").stat().st_size // MiB * MiB + 2 * MiB
        make_efi_fat(work / "efi.img", work / "BOOTX64.EFI", max(4 * MiB, efi_size), "STRATA_EFI")
    image_env = "".join(
        f"{key}={value}\n"
        for key, value in (
            ("NAME", name),
            ("DISK_BYTES", raw.stat().st_size),
            ("DISK_SHA256", raw_sha256),
            ("ROOT_OFFSET", ROOT_START),
        )
    )
    return IsoFiles(
        kernel=tree / "boot" / f"vmlinuz-{_kernel_version(tree)}",
        initrd=work / "initrd.img",
        squashfs=work / "image.squashfs",
        image_env=image_env,
        grub_cfg=menu,
        eltorito=work / "eltorito.img",
        efi_img=work / "efi.img",
        mbr=(tree / "usr/lib/grub/i386-pc/boot_hybrid.img").read_bytes(),
        marker=marker,
    )


def _add_dir(iso: pycdlib.PyCdlib, path: str) -> None:
    iso.add_directory(path.upper(), rr_name=path.rsplit("/", 1)[-1], joliet_path=path)


def write_iso(files: IsoFiles, label: str, out: Path) -> None:
    """Write the ISO with pycdlib, then make its system area a GRUB hybrid MBR."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label, app_ident_str="strata")
    # pycdlib lays out file data level by level: the big squashfs one level deeper than
    # /boot/grub/grub.cfg keeps everything GRUB reads at the start (SeaBIOS reads far in go wrong).
    for folder in ("/boot", "/boot/grub", "/live", "/strata", "/strata/image"):
        _add_dir(iso, folder)
    add_iso_file(iso, files.kernel, "/live/vmlinuz")
    add_iso_file(iso, files.initrd, "/live/initrd.img")
    add_iso_file(iso, files.squashfs, "/strata/image/image.squashfs")
    add_iso_file(iso, files.image_env.encode(), "/strata/image.env")
    # not empty: an empty file (extent 0) with Rock Ridge makes BIOS GRUB read other files wrongly
    add_iso_file(iso, f"{files.marker}\n".encode(), f"/strata/{files.marker}")
    add_iso_file(iso, files.grub_cfg.encode(), "/boot/grub/grub.cfg")
    add_iso_file(iso, files.eltorito, "/boot/grub/eltorito.img")
    add_iso_file(iso, files.efi_img, "/boot/grub/efi.img")
    iso.add_eltorito(
        "/BOOT/GRUB/ELTORITO.IMG;1",
        bootcatfile="/BOOT/GRUB/BOOT.CAT;1",
        rr_bootcatname="boot.cat",
        joliet_bootcatfile="/boot/grub/boot.cat",
        media_name="noemul",
        boot_load_size=4,
        boot_info_table=True,
    )
    efi_sectors = files.efi_img.stat().st_size // SECTOR
    iso.add_eltorito(
        "/BOOT/GRUB/EFI.IMG;1",
        bootcatfile="/BOOT/GRUB/BOOT.CAT;1",
        media_name="noemul",
        platform_id=0xEF,
        efi=True,
        boot_load_size=min(efi_sectors, 0xFFFF),
    )
    with atomic_file(out) as tmp:
        iso.write(str(tmp))
        eltorito_lba = iso.get_record(iso_path="/BOOT/GRUB/ELTORITO.IMG;1").extent_location()
        efi_lba = iso.get_record(iso_path="/BOOT/GRUB/EFI.IMG;1").extent_location()
        iso.close()
        disk_id = int(files.marker[-8:], 16)
        make_hybrid(tmp, files.mbr, eltorito_lba, efi_lba, efi_sectors, disk_id)


def make_hybrid(
    iso: Path, boot_hybrid: bytes, eltorito_lba: int, efi_lba: int, efi_sectors: int, disk_id: int
) -> None:
    """GRUB's hybrid MBR in the system area, pointing at the eltorito image, plus MBR partitions: 1 (type
    0, active) spanning the ISO for BIOS, 2 (type EF) the FAT image for UEFI."""
    size_sectors = iso.stat().st_size // SECTOR
    mbr = bytearray(512)
    mbr[:440] = boot_hybrid[:440]
    struct.pack_into("<Q", mbr, MBR_KERNEL_SECTOR, eltorito_lba * 4 + 4)
    struct.pack_into("<I", mbr, 0x1B8, disk_id)
    mbr[0x1BE:0x1CE] = _mbr_entry(0x80, 0x00, 0, size_sectors)
    mbr[0x1CE:0x1DE] = _mbr_entry(0x00, 0xEF, efi_lba * 4, efi_sectors)
    mbr[510:512] = b"\x55\xaa"
    with iso.open("r+b") as f:
        f.write(mbr)
        f.seek(eltorito_lba * 2048 + ELTORITO_PATCH_OFFSET)
        f.write(struct.pack("<Q", eltorito_lba * 4 + 5))


def _mbr_entry(status: int, kind: int, start: int, sectors: int) -> bytes:
    chs_max = b"\xfe\xff\xff"
    return struct.pack("<B3sB3sII", status, b"\x00\x02\x00", kind, chs_max, start, min(sectors, 0xFFFFFFFF))


def build_iso(defn: Definition, tree: Path, raw: Path, raw_sha256: str, out: Path, work: Path) -> Path:
    """Write the installer ISO for the assembled `raw` image (whose sha256 is `raw_sha256`) to `out`."""
    require_tools("mksquashfs", "mkfs.vfat", "mmd", "mcopy")
    files = prepare_files(defn, tree, raw, raw_sha256, work)
    with step("ISO (pycdlib, hybrid)"):
        try:
            write_iso(files, volume_label(defn.data["name"]), out)
        except pycdlib.pycdlibexception.PyCdlibException as exc:
            raise StrataError(f"writing {out.name} with pycdlib failed: {exc}") from None
    info(f"{out.name}: {out.stat().st_size / 2**20:.0f} MiB, label {volume_label(defn.data['name'])}")
    return out
