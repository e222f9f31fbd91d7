"""Unit tests for builder.disk on sparse files: ids, sizes, GPT, BIOS boot code, ESP and splicing.

No loop device, no mount, no GRUB: boot.img and core.img are synthetic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from builder import disk
from builder.disk import (
    BIOS_BOOT_SIZE,
    BIOS_BOOT_START,
    BIOS_BOOT_TYPE,
    ESP_SIZE,
    ESP_START,
    ESP_TYPE,
    GPT_BACKUP,
    ROOT_START,
    ROOT_X86_64_TYPE,
    SECTOR,
    DiskIds,
    MiB,
    install_bios_boot,
    make_esp,
    partition,
    root_size,
    splice,
    write_boot_config,
)
from builder.errors import StrataError


def _tool(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------- ids and sizes


def test_disk_ids_are_deterministic() -> None:
    assert DiskIds.derive("strata:abc") == DiskIds.derive("strata:abc")


def test_disk_ids_differ_per_seed_and_role() -> None:
    a, b = DiskIds.derive("seed-a"), DiskIds.derive("seed-b")
    for field in ("disk", "root_fs", "root_part", "esp_part", "esp_serial"):
        assert getattr(a, field) != getattr(b, field), field
    values = [a.disk, a.root_fs, a.root_part, a.esp_part]
    assert len(set(values)) == 4
    for value in values:
        assert str(uuid.UUID(value)) == value
    assert re.fullmatch(r"[0-9a-f]{8}", a.esp_serial)


@pytest.mark.parametrize(
    ("size", "to", "expected"),
    [
        (0, MiB, 0),
        (1, MiB, MiB),
        (MiB - 1, MiB, MiB),
        (MiB, MiB, MiB),
        (MiB + 1, MiB, 2 * MiB),
        (5, 4, 8),
        (8, 4, 8),
        (100 * MiB + 3, 64 * MiB, 128 * MiB),
    ],
)
def test_align(size: int, to: int, expected: int) -> None:
    assert disk.align(size, to) == expected


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/data").write_bytes(os.urandom(3 * MiB))
    (tree / "etc/small").write_text("x")
    os.link(tree / "etc/data", tree / "etc/data-link")  # counted once
    return tree


def test_root_size_auto(small_tree: Path) -> None:
    size, inodes = root_size(small_tree, "auto")
    used, count = disk.tree_usage(small_tree)
    assert 3 * MiB <= used < 4 * MiB  # the hard link is not counted twice
    assert count == 4  # etc, data (and its link), small, plus the root
    assert size % (64 * MiB) == 0
    assert size >= used * 1.15 + 256 * MiB
    assert size < used * 1.15 + 256 * MiB + 64 * MiB
    assert inodes == 2 * count


def test_root_size_explicit_is_the_disk_minus_the_layout(small_tree: Path) -> None:
    requested = 2048 * MiB + 12345
    size, inodes = root_size(small_tree, requested)
    assert size % MiB == 0
    assert ROOT_START + size + GPT_BACKUP <= requested
    assert ROOT_START + size + GPT_BACKUP > requested - MiB
    assert inodes == 2 * disk.tree_usage(small_tree)[1]


def test_root_size_explicit_boundary(small_tree: Path) -> None:
    needed, _ = root_size(small_tree, "auto")
    smallest = needed + ROOT_START + GPT_BACKUP
    assert root_size(small_tree, smallest)[0] == needed
    assert root_size(small_tree, str(smallest))[0] == needed
    with pytest.raises(StrataError, match=r"^disk\.size: .*too small.*auto") as excinfo:
        root_size(small_tree, smallest - 1)
    assert f"{smallest // MiB} MiB" in str(excinfo.value)


def test_root_size_too_small(small_tree: Path) -> None:
    with pytest.raises(StrataError, match=r"disk\.size"):
        root_size(small_tree, 100 * MiB)


# --------------------------------------------------------------------------- GPT


DISK_SIZE = 200 * MiB
ROOT_SIZE = DISK_SIZE - ROOT_START - GPT_BACKUP
IDS = DiskIds.derive("unit-test")


def _sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True)
    table: dict[str, object] = json.loads(out.stdout)["partitiontable"]
    return table


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Path:
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk")
    path = _sparse(tmp_path / "disk.raw", DISK_SIZE)
    partition(path, ROOT_SIZE, IDS)
    return path


def test_partition_layout(gpt_disk: Path) -> None:
    table = _sfdisk_json(gpt_disk)
    assert table["label"] == "gpt"
    assert str(table["id"]).lower() == IDS.disk
    assert table["sectorsize"] == SECTOR
    parts = table["partitions"]
    assert isinstance(parts, list)
    assert [(p["start"], p["size"], p["type"].upper(), p["name"]) for p in parts] == [
        (BIOS_BOOT_START // SECTOR, BIOS_BOOT_SIZE // SECTOR, BIOS_BOOT_TYPE, "bios-boot"),
        (ESP_START // SECTOR, ESP_SIZE // SECTOR, ESP_TYPE, "esp"),
        (ROOT_START // SECTOR, ROOT_SIZE // SECTOR, ROOT_X86_64_TYPE, "root"),
    ]
    assert [p["start"] for p in parts] == [2048, 4096, 135168]
    assert parts[1]["uuid"].lower() == IDS.esp_part
    assert parts[2]["uuid"].lower() == IDS.root_part
    # The root partition ends before the backup GPT.
    assert (parts[2]["start"] + parts[2]["size"]) * SECTOR <= DISK_SIZE - 33 * SECTOR
    assert gpt_disk.stat().st_size == DISK_SIZE


def test_partition_protective_mbr(gpt_disk: Path) -> None:
    mbr = _read(gpt_disk, 0, SECTOR)
    assert mbr[0x1FE:0x200] == b"\x55\xaa"
    assert mbr[0x1BE + 4] == 0xEE  # protective GPT entry
    assert _read(gpt_disk, SECTOR, 8) == b"EFI PART"


def test_partition_is_deterministic(tmp_path: Path) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk")
    a = _sparse(tmp_path / "a.raw", DISK_SIZE)
    b = _sparse(tmp_path / "b.raw", DISK_SIZE)
    partition(a, ROOT_SIZE, IDS)
    partition(b, ROOT_SIZE, IDS)
    for offset, size in ((0, 34 * SECTOR), (DISK_SIZE - 33 * SECTOR, 33 * SECTOR)):
        assert (
            hashlib.sha256(_read(a, offset, size)).digest() == hashlib.sha256(_read(b, offset, size)).digest()
        )


# --------------------------------------------------------------------------- BIOS boot


def _boot_img() -> bytes:
    boot = bytearray(os.urandom(SECTOR))
    boot[510:512] = b"\x55\xaa"
    return bytes(boot)


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def test_install_bios_boot(gpt_disk: Path) -> None:
    boot, core = _boot_img(), os.urandom(3 * SECTOR)
    mbr_before = _read(gpt_disk, 0, SECTOR)
    table_before = _sfdisk_json(gpt_disk)
    install_bios_boot(gpt_disk, boot, core)
    mbr = _read(gpt_disk, 0, SECTOR)
    # Boot code from boot.img, the partition table (and disk signature) from the disk.
    assert mbr[:0x5C] == boot[:0x5C]
    assert mbr[0x68:0x1B8] == boot[0x68:0x1B8]
    assert mbr[0x1B8:0x1FE] == mbr_before[0x1B8:0x1FE]
    assert mbr[0x1BE:0x1FE] == mbr_before[0x1BE:0x1FE]
    assert mbr[0x1FE:0x200] == b"\x55\xaa"
    # Where core.img starts (LBA 2048, little-endian), boot drive from the BIOS, no drive check.
    assert mbr[0x5C:0x64] == struct.pack("<Q", 2048) == (2048).to_bytes(8, "little")
    assert mbr[0x64] == 0xFF
    assert mbr[0x66:0x68] == b"\x90\x90"
    # core.img at LBA 2048: first sector ends with the block list of the other two sectors.
    written = _read(gpt_disk, 2048 * SECTOR, 3 * SECTOR)
    assert written[:488] == core[:488]
    assert written[488:500] == b"\0" * 12
    assert struct.unpack_from("<QHH", written, 500) == (2049, 2, 0x820)
    assert written[SECTOR:] == core[SECTOR:]
    # The GPT is untouched.
    assert _sfdisk_json(gpt_disk) == table_before


def test_install_bios_boot_pads_core_to_sectors(gpt_disk: Path) -> None:
    core = os.urandom(SECTOR + 100)
    install_bios_boot(gpt_disk, _boot_img(), core)
    written = _read(gpt_disk, 2048 * SECTOR, 3 * SECTOR)
    assert struct.unpack_from("<QHH", written, 500) == (2049, 1, 0x820)
    assert written[SECTOR : SECTOR + 100] == core[SECTOR:]
    assert written[SECTOR + 100 :] == b"\0" * (2 * SECTOR - 100)


def test_install_bios_boot_core_filling_the_partition(gpt_disk: Path) -> None:
    esp_before = _read(gpt_disk, ESP_START, SECTOR)
    core = os.urandom(BIOS_BOOT_SIZE)
    install_bios_boot(gpt_disk, _boot_img(), core)
    assert struct.unpack_from("<QHH", _read(gpt_disk, 2048 * SECTOR, SECTOR), 500) == (2049, 2047, 0x820)
    assert _read(gpt_disk, BIOS_BOOT_START + BIOS_BOOT_SIZE - SECTOR, SECTOR) == core[-SECTOR:]
    assert _read(gpt_disk, ESP_START, SECTOR) == esp_before


def test_install_bios_boot_rejects_a_core_larger_than_the_partition(gpt_disk: Path) -> None:
    before = hashlib.sha256(_read(gpt_disk, 0, ESP_START + MiB)).digest()
    with pytest.raises(StrataError, match=r"core\.img"):
        install_bios_boot(gpt_disk, _boot_img(), os.urandom(BIOS_BOOT_SIZE + 1))
    assert hashlib.sha256(_read(gpt_disk, 0, ESP_START + MiB)).digest() == before


# --------------------------------------------------------------------------- ESP


def _mtools(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(list(args), capture_output=True, check=True, env=env)


@_tool("mkfs.vfat", "mmd", "mcopy", "mdir", "mtype")
def test_make_esp(tmp_path: Path) -> None:
    efi = tmp_path / "grubx64.efi"
    payload = b"MZ" + os.urandom(70_000)
    efi.write_bytes(payload)
    esp = tmp_path / "esp.vfat"
    esp.write_bytes(b"an old file that make_esp replaces")
    make_esp(esp, efi, IDS)
    assert esp.stat().st_size == ESP_SIZE
    listing = _mtools("mdir", "-b", "-i", str(esp), "::/EFI/BOOT").stdout.decode()
    assert [line.strip() for line in listing.splitlines() if line.strip()] == ["::/EFI/BOOT/BOOTX64.EFI"]
    assert _mtools("mtype", "-i", str(esp), "::/EFI/BOOT/BOOTX64.EFI").stdout == payload
    copy = tmp_path / "copy.efi"
    _mtools("mcopy", "-i", str(esp), "::/EFI/BOOT/BOOTX64.EFI", str(copy))
    assert copy.read_bytes() == payload
    # FAT32 boot sector: volume id (little-endian) and label.
    boot = _read(esp, 0, SECTOR)
    assert boot[0x52:0x5A] == b"FAT32   "
    assert struct.unpack_from("<I", boot, 0x43)[0] == int(IDS.esp_serial, 16)
    assert boot[0x47:0x52] == b"ESP        "


@_tool("mkfs.vfat", "mmd", "mcopy", "blkid")
def test_fstab_esp_uuid_matches_the_filesystem(tmp_path: Path) -> None:
    efi = tmp_path / "grubx64.efi"
    efi.write_bytes(b"MZ")
    esp = tmp_path / "esp.vfat"
    make_esp(esp, efi, IDS)
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    write_boot_config(tree, IDS, [], "t")
    fs_uuid = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "UUID", str(esp)], capture_output=True, text=True, check=True
    ).stdout.strip()
    fstab = (tree / "etc/fstab").read_text().splitlines()
    assert fstab[1].split()[0] == f"UUID={fs_uuid}"


# --------------------------------------------------------------------------- splice


def _holes_supported(tmp_path: Path) -> bool:
    probe = _sparse(tmp_path / "probe", 16 * MiB)
    try:
        return probe.stat().st_blocks * 512 < MiB
    finally:
        probe.unlink()


def test_splice_writes_data_and_leaves_holes(tmp_path: Path) -> None:
    if not _holes_supported(tmp_path):
        pytest.skip("tmp_path's file system does not keep holes")
    src = _sparse(tmp_path / "fs.img", 12 * MiB + 100)
    data = os.urandom(4096)
    with src.open("r+b") as f:
        f.seek(5 * MiB + 7)
        f.write(data)
        f.seek(12 * MiB + 50)
        f.write(b"tail")
    target = _sparse(tmp_path / "disk.raw", 64 * MiB)
    offset = 8 * MiB
    splice(src, target, offset, "test")
    assert target.stat().st_size == 64 * MiB
    assert _read(target, offset + 5 * MiB + 7, len(data)) == data
    assert _read(target, offset + 12 * MiB + 50, 4) == b"tail"
    assert _read(target, offset + 5 * MiB + 7 - 16, 16) == b"\0" * 16
    assert _read(target, 0, offset) == b"\0" * offset
    # Two 4 MiB chunks hold data (the one at 4 MiB and the partial last one); the rest stays a hole.
    assert target.stat().st_blocks * 512 <= 4 * MiB + 100 + 64 * 1024
    assert target.stat().st_blocks * 512 >= 4 * MiB
    spliced = _read(target, offset, src.stat().st_size)
    assert hashlib.sha256(spliced).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_splice_of_an_all_zero_source_writes_nothing(tmp_path: Path) -> None:
    if not _holes_supported(tmp_path):
        pytest.skip("tmp_path's file system does not keep holes")
    src = _sparse(tmp_path / "zero.img", 9 * MiB)
    target = _sparse(tmp_path / "disk.raw", 32 * MiB)
    splice(src, target, MiB, "zero")
    assert target.stat().st_blocks * 512 < MiB
    assert target.stat().st_size == 32 * MiB


def test_splice_dense_source(tmp_path: Path) -> None:
    src = tmp_path / "dense.img"
    payload = os.urandom(5 * MiB + 3)
    src.write_bytes(payload)
    target = _sparse(tmp_path / "disk.raw", 16 * MiB)
    splice(src, target, 3 * MiB, "dense")
    assert _read(target, 3 * MiB, len(payload)) == payload
    assert _read(target, 3 * MiB + len(payload), 100) == b"\0" * 100


# --------------------------------------------------------------------------- boot config


def test_write_boot_config(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    write_boot_config(tree, IDS, ["quiet", "net.ifnames=0"], "strata test")
    cfg = (tree / "boot/grub/grub.cfg").read_text()
    [linux] = [line.strip() for line in cfg.splitlines() if line.strip().startswith("linux ")]
    args = linux.split()
    assert args[:2] == ["linux", "/vmlinuz"]
    assert f"root=UUID={IDS.root_fs}" in args
    assert "console=tty0" in args
    assert "console=ttyS0,115200n8" in args
    # Extra arguments come after the consoles, so the serial console stays the primary one.
    assert args[-2:] == ["quiet", "net.ifnames=0"]
    assert args.index("console=ttyS0,115200n8") < args.index("quiet")
    assert f"search --no-floppy --fs-uuid --set=root {IDS.root_fs}" in cfg
    assert "menuentry 'strata test'" in cfg
    assert "initrd /initrd.img" in cfg
    assert "serial --unit=0 --speed=115200" in cfg

    fstab = [line.split() for line in (tree / "etc/fstab").read_text().splitlines()]
    serial = IDS.esp_serial.upper()
    assert fstab == [
        [f"UUID={IDS.root_fs}", "/", "ext4", "errors=remount-ro", "0", "1"],
        [
            f"UUID={serial[:4]}-{serial[4:]}",
            "/boot/efi",
            "vfat",
            "umask=0077,nofail,x-systemd.device-timeout=10s",
            "0",
            "2",
        ],
    ]
    assert (tree / "boot/efi").is_dir()


def test_write_boot_config_overwrites(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/fstab").write_text("# debootstrap's empty fstab\n")
    other = DiskIds.derive("other")
    write_boot_config(tree, other, [], "one")
    write_boot_config(tree, IDS, [], "two")
    cfg = (tree / "boot/grub/grub.cfg").read_text()
    assert other.root_fs not in cfg and IDS.root_fs in cfg
    fstab = (tree / "etc/fstab").read_text()
    assert "debootstrap" not in fstab and other.root_fs not in fstab
