"""Unit tests for builder.iso: the volume label and the GRUB hybrid MBR written over the system area."""

from __future__ import annotations

import struct
from pathlib import Path

import pycdlib

from builder.iso import ELTORITO_PATCH_OFFSET, MBR_KERNEL_SECTOR, make_hybrid, volume_label


def test_volume_label_is_d_characters_and_fits_joliet() -> None:
    assert volume_label("strata") == "STRATA_STRATA"
    long_a, long_b = volume_label("strata-killtest"), volume_label("strata-killtest2")
    assert len(long_a) == 16 and long_a.startswith("STRATA_STRA") and long_a != long_b
    assert set(long_a) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def test_long_names_write_an_iso(tmp_path: Path) -> None:
    """pycdlib refuses a Joliet volume id over 16 characters; every label must be accepted."""
    iso = pycdlib.PyCdlib()
    label = volume_label("a-rather-long-image-name")
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    iso.write(str(tmp_path / "x.iso"))
    iso.close()
    assert label.encode() in (tmp_path / "x.iso").read_bytes()


def test_hybrid_mbr_points_at_grub_and_the_efi_image(tmp_path: Path) -> None:
    iso = tmp_path / "x.iso"
    size = 64 * 2048
    iso.write_bytes(b"\xaa" * 512 + bytes(size - 512))
    boot_hybrid = bytes(range(256)) * 2
    make_hybrid(iso, boot_hybrid, eltorito_lba=20, efi_lba=30, efi_sectors=16, disk_id=0x12345678)
    data = iso.read_bytes()
    assert len(data) == size
    mbr = data[:512]
    assert mbr[:MBR_KERNEL_SECTOR] == boot_hybrid[:MBR_KERNEL_SECTOR]  # GRUB's code, untouched
    assert struct.unpack_from("<Q", mbr, MBR_KERNEL_SECTOR)[0] == 20 * 4 + 4
    assert struct.unpack_from("<I", mbr, 0x1B8)[0] == 0x12345678
    assert mbr[510:] == b"\x55\xaa"
    first, second = mbr[0x1BE:0x1CE], mbr[0x1CE:0x1DE]
    assert first[0] == 0x80 and first[4] == 0x00  # active, type 0: the whole ISO, for BIOS
    assert struct.unpack_from("<II", first, 8) == (0, size // 512)
    assert second[0] == 0x00 and second[4] == 0xEF  # the EFI image as an ESP, for UEFI sticks
    assert struct.unpack_from("<II", second, 8) == (30 * 4, 16)
    assert mbr[0x1DE:0x1FE] == bytes(32)
    patched = struct.unpack_from("<Q", data, 20 * 2048 + ELTORITO_PATCH_OFFSET)[0]
    assert patched == 20 * 4 + 5  # diskboot's block list: the core image follows it
