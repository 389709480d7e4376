"""bf16 autocast on CPU only where the CPU runs it natively."""

from __future__ import annotations

import sys

import pytest

from slidecensus import hardware


def test_override_forces_the_cpu_choice(monkeypatch):
    monkeypatch.setenv(hardware.BF16_ENV, "1")
    assert hardware.use_bf16("cpu", on_cuda=False, on_cpu=True)
    assert not hardware.use_bf16("cpu", on_cuda=True, on_cpu=False)  # the setting still rules
    monkeypatch.setenv(hardware.BF16_ENV, "0")
    assert not hardware.use_bf16("cpu", on_cuda=True, on_cpu=True)
    assert hardware.BF16_ENV in hardware.cpu_bf16_reason()


def test_cuda_follows_its_own_setting(monkeypatch):
    monkeypatch.setenv(hardware.BF16_ENV, "0")
    assert hardware.use_bf16("cuda", on_cuda=True, on_cpu=False)
    assert not hardware.use_bf16("cuda", on_cuda=False, on_cpu=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_detection_agrees_with_the_kernels_cpu_flags(monkeypatch):
    monkeypatch.delenv(hardware.BF16_ENV, raising=False)
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = bool({"amx_bf16", "amx_tile", "avx512_bf16"} & flags)
    assert hardware.cpu_bf16_native() == expected


def test_trainer_autocasts_only_where_bf16_is_native(monkeypatch):
    import torch

    from slidecensus.models import preset_config
    from slidecensus.models.train import InfoGANTrainer

    cfg = preset_config("fast", amp_cpu=True, width=8)
    for forced, expected in (("0", False), ("1", True)):
        monkeypatch.setenv(hardware.BF16_ENV, forced)
        tr = InfoGANTrainer(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert tr.use_amp is expected
