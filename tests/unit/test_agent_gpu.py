"""strata agent: NVIDIA GPU detection from lspci and nvidia-smi output."""

from __future__ import annotations

from pathlib import Path

from agent_fakes import H100_LSPCI, H100_SMI, FakeRunner, FakeSystem
from strata_agent.gpu import detect_gpu, parse_lspci, parse_nvidia_smi

TWO_GPUS = """\
0000:00:1f.0 ISA bridge [0601]: Intel Corporation C621 Series Chipset LPC/eSPI Controller [8086:a1c1]
0000:3b:00.0 VGA compatible controller [0300]: NVIDIA Corporation GA102 [GeForce RTX 3090] [10de:2204]
0000:3b:00.1 Audio device [0403]: NVIDIA Corporation GA102 High Definition Audio Controller [10de:1aef]
0000:af:00.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 PCIe 40GB] [10de:20f1] (rev a1)
0000:b0:00.0 Display controller [0380]: NVIDIA Corporation Device [10de:1234] (rev a1)
0000:c0:00.0 VGA compatible controller [0300]: Advanced Micro Devices, Inc. [AMD/ATI] Navi 21 [1002:73bf]
0000:d0:00.0 Bridge [0680]: NVIDIA Corporation MCP55 Memory Controller [10de:0369] (rev a2)
"""


def _runner(lspci: str | None, smi: str | None) -> FakeRunner:
    return FakeRunner(FakeSystem(Path("/nonexistent"), lspci=lspci, nvidia_smi=smi))


def test_parse_h100_line() -> None:
    assert parse_lspci(H100_LSPCI) == [
        {"slot": "0000:01:00.0", "name": "NVIDIA Corporation GH100 [H100 PCIe]", "pci_id": "10de:2331"}
    ]


def test_only_nvidia_display_and_3d_classes_count() -> None:
    assert [(d["slot"], d["pci_id"]) for d in parse_lspci(TWO_GPUS)] == [
        ("0000:3b:00.0", "10de:2204"),
        ("0000:af:00.0", "10de:20f1"),
        ("0000:b0:00.0", "10de:1234"),
    ]
    assert parse_lspci(TWO_GPUS)[1]["name"] == "NVIDIA Corporation GA100 [A100 PCIe 40GB]"


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 PCIe, 81559 MiB, 550.54.15\nNVIDIA A100-PCIE-40GB, 40960 MiB, 550.54.15\n\n"
    assert parse_nvidia_smi(text) == [
        {"model": "NVIDIA H100 PCIe", "memory": "81559 MiB", "driver": "550.54.15"},
        {"model": "NVIDIA A100-PCIE-40GB", "memory": "40960 MiB", "driver": "550.54.15"},
    ]


def test_detect_with_driver_adds_details() -> None:
    gpu, notes = detect_gpu(_runner(H100_LSPCI, H100_SMI))
    assert notes == []
    assert gpu == {
        "present": True,
        "devices": [
            {
                "slot": "0000:01:00.0",
                "name": "NVIDIA Corporation GH100 [H100 PCIe]",
                "pci_id": "10de:2331",
                "model": "NVIDIA H100 PCIe",
                "memory": "81559 MiB",
            }
        ],
        "driver": "550.54.15",
    }


def test_detect_without_nvidia_smi() -> None:
    runner = _runner(H100_LSPCI, None)
    gpu, notes = detect_gpu(runner)
    assert gpu["present"] is True and gpu["driver"] is None and "model" not in gpu["devices"][0]
    assert notes == ["nvidia-smi is not installed: no driver details"]


def test_no_nvidia_gpu_does_not_ask_nvidia_smi() -> None:
    runner = _runner("0000:00:02.0 VGA compatible controller [0300]: Device [1234:1111] (rev 02)\n", H100_SMI)
    assert detect_gpu(runner)[0] == {"present": False, "devices": [], "driver": None}
    assert runner.count("nvidia-smi") == 0


def test_missing_lspci_is_not_an_error() -> None:
    gpu, notes = detect_gpu(_runner(None, H100_SMI))
    assert gpu == {"present": False, "devices": [], "driver": None}
    assert notes == ["lspci is not installed: no GPU detection"]
