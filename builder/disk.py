"""Disk images the systemd-repart way: each filesystem built as a file, then spliced into a GPT disk.

Layout: BIOS boot partition (GRUB core.img), EFI system partition (GRUB as BOOTX64.EFI), ext4 root.
GRUB comes from the image itself (grub-pc-bin, grub-efi-amd64-bin), so it matches the target release.
No mount and no loop device is needed.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from .bake import render
from .chroot import chroot_run
from .errors import StrataError
from .log import Progress, info
from .proc import run

MiB = 1 << 20
SECTOR = 512
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
BIOS_BOOT_START, BIOS_BOOT_SIZE = 1 * MiB, 1 * MiB
ESP_START, ESP_SIZE = 2 * MiB, 64 * MiB
ROOT_START = ESP_START + ESP_SIZE
GPT_BACKUP = 1 * MiB  # room for the backup GPT at the end
GRUB_MODULES = [
    *("part_gpt", "part_msdos", "ext2", "fat", "iso9660", "search", "search_fs_uuid", "search_label"),
    "search_fs_file",
    *("normal", "configfile", "linux", "echo", "test", "serial", "terminal", "gzio", "sleep", "all_video"),
]
GRUB_PLATFORM_MODULES = {"i386-pc": ["biosdisk"], "x86_64-efi": ["efi_gop"]}


@dataclass(frozen=True)
class DiskIds:
    """Deterministic identifiers derived from the build, so the same inputs give the same disk."""

    disk: str
    root_fs: str
    root_part: str
    esp_part: str
    bios_part: str
    esp_serial: str  # vfat volume id, 8 hex digits

    @classmethod
    def derive(cls, seed: str) -> DiskIds:
        def make(role: str) -> str:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"strata:{seed}:{role}"))

        return cls(
            disk=make("disk"),
            root_fs=make("root-fs"),
            root_part=make("root-part"),
            esp_part=make("esp-part"),
            bios_part=make("bios-part"),
            esp_serial=make("esp")[:8],
        )


def align(size: int, to: int = MiB) -> int:
    return -(-size // to) * to


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes used, number of inodes) of a directory tree, hard links counted once."""
    used, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            used += st.st_blocks * 512
    return used, len(seen) + 1


def root_size(tree: Path, requested: int | str) -> tuple[int, int]:
    """Root filesystem size and inode count: content plus headroom, or what the definition asks."""
    used, inodes = tree_usage(tree)
    needed = align(int(used * 1.15) + 256 * MiB, 64 * MiB)
    if requested == "auto":
        return needed, inodes * 2
    disk_root = int(requested) - ROOT_START - GPT_BACKUP
    if disk_root < needed:
        raise StrataError(
            f"disk.size: {int(requested) / MiB:.0f} MiB is too small; the content needs at least "
            f"{(needed + ROOT_START + GPT_BACKUP) / MiB:.0f} MiB (or use 'auto')"
        )
    return align(disk_root - MiB + 1), inodes * 2


def write_boot_config(rootfs: Path, ids: DiskIds, cmdline: list[str], title: str) -> None:
    """grub.cfg and fstab inside the tree, pointing at this disk's root by UUID."""
    grub_dir = rootfs / "boot" / "grub"
    grub_dir.mkdir(parents=True, exist_ok=True)
    args = ["console=tty0", "console=ttyS0,115200n8", *cmdline]
    cfg = render(
        "grub/grub.cfg.j2",
        {"root_uuid": ids.root_fs, "cmdline": " ".join(args), "title": title, "timeout": 1},
    )
    (grub_dir / "grub.cfg").write_text(cfg)
    esp = f"{ids.esp_serial[:4]}-{ids.esp_serial[4:]}".upper()
    (rootfs / "etc" / "fstab").write_text(
        f"UUID={ids.root_fs} / ext4 errors=remount-ro 0 1\n"
        f"UUID={esp} /boot/efi vfat umask=0077,nofail,x-systemd.device-timeout=10s 0 2\n"
    )
    (rootfs / "boot" / "efi").mkdir(parents=True, exist_ok=True)


def grub_mkimage(
    rootfs: Path, images: dict[str, tuple[str, Path]], early: str, modules: list[str] | None = None
) -> None:
    """GRUB images from the tree's own GRUB: {platform: (name, out)}, each with `early` embedded and
    `modules` (default: GRUB_MODULES and the platform's own)."""
    tmp = rootfs / "tmp" / "strata-grub"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "early.cfg").write_text(early)
    try:
        for platform, (name, out) in images.items():
            wanted = modules or GRUB_MODULES + GRUB_PLATFORM_MODULES[platform]
            cmd = ["grub-mkimage", "-O", platform, "-o", f"/tmp/strata-grub/{name}"]
            cmd += ["-c", "/tmp/strata-grub/early.cfg", "-p", "/boot/grub", *wanted]
            chroot_run(rootfs, cmd, what=f"grub-mkimage ({platform})")
            (tmp / name).replace(out)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def grub_images(rootfs: Path, ids: DiskIds, work: Path) -> dict[str, Path]:
    """GRUB for BIOS (core.img) and UEFI (BOOTX64.EFI), with an embedded config that finds the root."""
    early = f"search --no-floppy --fs-uuid --set=root {ids.root_fs}\nconfigfile ($root)/boot/grub/grub.cfg\n"
    out = {"i386-pc": work / "core.img", "x86_64-efi": work / "BOOTX64.EFI"}
    grub_mkimage(rootfs, {platform: (path.name, path) for platform, path in out.items()}, early)
    out["boot.img"] = work / "boot.img"
    out["boot.img"].write_bytes((rootfs / "usr/lib/grub/i386-pc/boot.img").read_bytes())
    return out


def make_root_fs(rootfs: Path, out: Path, size: int, inodes: int, ids: DiskIds) -> None:
    """ext4 holding `rootfs`, with fixed UUID and hash seed; SOURCE_DATE_EPOCH pins its timestamps."""
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    if "SOURCE_DATE_EPOCH" in env:
        env["E2FSPROGS_FAKE_TIME"] = env["SOURCE_DATE_EPOCH"]
    features = [
        "-L",
        "root",
        "-U",
        ids.root_fs,
        "-N",
        str(inodes),
        "-E",
        f"hash_seed={ids.root_fs},root_owner=0:0",
    ]
    run(
        ["mkfs.ext4", "-q", "-F", *features, "-d", str(rootfs), str(out), f"{size // 1024}k"],
        env=env,
        what="mkfs.ext4",
    )


def make_efi_fat(out: Path, efi_binary: Path, size: int, label: str, options: tuple[str, ...] = ()) -> None:
    """A FAT filesystem image of `size` bytes holding `efi_binary` at the removable path
    EFI/BOOT/BOOTX64.EFI; `options` go to mkfs.vfat."""
    out.unlink(missing_ok=True)
    run(["mkfs.vfat", *options, "-n", label, "-C", str(out), str(size // 1024)], what="mkfs.vfat")
    run(["mmd", "-i", str(out), "::/EFI", "::/EFI/BOOT"], what="mmd")
    run(["mcopy", "-i", str(out), str(efi_binary), "::/EFI/BOOT/BOOTX64.EFI"], what="mcopy")


def make_esp(out: Path, efi_binary: Path, ids: DiskIds) -> None:
    make_efi_fat(out, efi_binary, ESP_SIZE, "ESP", ("-F", "32", "-i", ids.esp_serial))


def splice(src: Path, disk: Path, offset: int, label: str) -> None:
    """Copy `src` into `disk` at `offset`, leaving holes where `src` is zero."""
    size = src.stat().st_size
    progress = Progress(f"writing {label}", size)
    with src.open("rb") as fin, disk.open("r+b") as fout:
        pos = 0
        while chunk := fin.read(4 * MiB):
            if chunk.count(0) != len(chunk):
                fout.seek(offset + pos)
                fout.write(chunk)
            pos += len(chunk)
            progress.advance(len(chunk))
    progress.close()


def partition(disk: Path, root_size: int, ids: DiskIds) -> None:
    s = SECTOR
    script = (
        f"label: gpt\nlabel-id: {ids.disk}\n"
        f"start={BIOS_BOOT_START // s}, size={BIOS_BOOT_SIZE // s}, type={BIOS_BOOT_TYPE}, "
        f"uuid={ids.bios_part}, name=bios-boot\n"
        f"start={ESP_START // s}, size={ESP_SIZE // s}, type={ESP_TYPE}, uuid={ids.esp_part}, name=esp\n"
        f"start={ROOT_START // s}, size={root_size // s}, type={ROOT_X86_64_TYPE}, "
        f"uuid={ids.root_part}, name=root\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], stdin=script, what="sfdisk")


def install_bios_boot(disk: Path, boot_img: bytes, core_img: bytes) -> None:
    """What grub-bios-setup does for a GPT disk with a BIOS boot partition, without needing a device.

    boot.img goes into the MBR (keeping the protective partition table) and points at core.img,
    whose first sector holds the block list of the rest of core.img.
    """
    boot = bytearray(boot_img)
    core = bytearray(core_img) + b"\0" * (-len(core_img) % SECTOR)
    sectors = len(core) // SECTOR
    first = BIOS_BOOT_START // SECTOR
    if len(core) > BIOS_BOOT_SIZE:
        raise StrataError(f"GRUB core.img is {len(core)} bytes, larger than the BIOS boot partition")
    with disk.open("r+b") as f:
        mbr = f.read(SECTOR)
        boot[0x1B8:0x1FE] = mbr[0x1B8:0x1FE]  # disk signature and partition table
        boot[0x66:0x68] = b"\x90\x90"  # hard disk: trust the BIOS drive number
        boot[0x64] = 0xFF  # boot drive: as given by the BIOS
        struct.pack_into("<Q", boot, 0x5C, first)  # where core.img starts
        struct.pack_into("<QHH", core, SECTOR - 12, first + 1, sectors - 1, 0x820)  # rest of core.img
        struct.pack_into("<QHH", core, SECTOR - 24, 0, 0, 0)  # block list terminator
        f.seek(0)
        f.write(boot)
        f.seek(first * SECTOR)
        f.write(core)


def assemble_raw(
    rootfs: Path, work: Path, out: Path, ids: DiskIds, requested_size: int | str, firmware: list[str]
) -> None:
    """Build the bootable GPT disk `out` from a prepared tree (grub.cfg and fstab already written)."""
    size, inodes = root_size(rootfs, requested_size)
    loaders = grub_images(rootfs, ids, work)
    info(f"root filesystem: {size // MiB} MiB, {inodes} inodes")
    make_root_fs(rootfs, work / "root.ext4", size, inodes, ids)
    make_esp(work / "esp.vfat", loaders["x86_64-efi"], ids)
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(ROOT_START + size + GPT_BACKUP)
    partition(out, size, ids)
    splice(work / "esp.vfat", out, ESP_START, "ESP")
    splice(work / "root.ext4", out, ROOT_START, "root filesystem")
    if "bios" in firmware:
        install_bios_boot(out, loaders["boot.img"].read_bytes(), loaders["i386-pc"].read_bytes())
    for tmp in ("root.ext4", "esp.vfat"):
        (work / tmp).unlink()


def to_qcow2(raw: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out)], what="qemu-img convert"
    )
