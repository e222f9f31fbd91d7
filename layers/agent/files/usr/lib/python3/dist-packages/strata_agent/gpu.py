"""NVIDIA GPU detection from `lspci -Dnn`, with details from nvidia-smi when the driver is there."""

from __future__ import annotations

import re
from typing import Any

from .system import Runner

NVIDIA_VENDOR = "[10de:"
GPU_CLASSES = ("[0300]", "[0302]", "[0380]")  # VGA, 3D controller, display controller
LSPCI_COMMAND = ("lspci", "-Dnn")
NVIDIA_SMI_COMMAND = (
    "nvidia-smi",
    "--query-gpu=name,memory.total,driver_version",
    "--format=csv,noheader",
)

# 0000:01:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 PCIe] [10de:2331] (rev a1)
_LSPCI_LINE = re.compile(
    r"^(?P<slot>\S+)\s+.*?\[(?P<cls>[0-9a-f]{4})\]:\s+(?P<name>.*?)\s+\[(?P<id>10de:[0-9a-f]{4})\]"
)


def parse_lspci(text: str) -> list[dict[str, Any]]:
    """The NVIDIA display/3D devices: slot, name and PCI id."""
    devices: list[dict[str, Any]] = []
    for line in text.splitlines():
        if NVIDIA_VENDOR not in line or not any(cls in line for cls in GPU_CLASSES):
            continue
        match = _LSPCI_LINE.match(line.strip())
        if match:
            devices.append({"slot": match["slot"], "name": match["name"], "pci_id": match["id"]})
        else:
            devices.append({"slot": line.split()[0], "name": line.strip(), "pci_id": None})
    return devices


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader`."""
    rows = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 3 and fields[0]:
            rows.append({"model": fields[0], "memory": fields[1], "driver": fields[2]})
    return rows


def detect_gpu(runner: Runner) -> tuple[dict[str, Any], list[str]]:
    """The gpu record {"present", "devices", "driver"} and notes on what could not be read."""
    notes: list[str] = []
    lspci = runner.run(LSPCI_COMMAND)
    if lspci.missing:
        return {"present": False, "devices": [], "driver": None}, ["lspci is not installed: no GPU detection"]
    if not lspci.ok:
        notes.append(f"lspci failed (exit {lspci.returncode}): {lspci.stderr.strip()}")
    devices = parse_lspci(lspci.stdout) if lspci.ok else []
    driver = None
    if devices:
        smi = runner.run(NVIDIA_SMI_COMMAND)
        if smi.missing:
            notes.append("nvidia-smi is not installed: no driver details")
        elif not smi.ok:
            notes.append(f"nvidia-smi failed (exit {smi.returncode}): {smi.stderr.strip()}")
        else:
            rows = parse_nvidia_smi(smi.stdout)
            if rows:
                driver = rows[0]["driver"]
            # nvidia-smi lists GPUs in PCI bus order, as lspci does.
            if len(rows) == len(devices):
                for device, row in zip(devices, rows, strict=True):
                    device.update(model=row["model"], memory=row["memory"])
    return {"present": bool(devices), "devices": devices, "driver": driver}, notes
