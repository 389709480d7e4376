"""What this machine's CPU does natively, for choices that only pay off on some hardware.

bfloat16 autocast is faster than float32 on a CPU only where the matrix units run bf16
(Intel AMX, or AVX-512 BF16). Elsewhere torch emulates it: on an AVX2-only AMD EPYC the
compact cell model classified 4x slower and trained 5x slower in bf16 than in fp32,
measured side by side (docs/benchmarks.md, cell model). The settings that ask for bf16 on
CPU (``amp_cpu``) are therefore honoured only where :func:`cpu_bf16_native` is true.
"""

from __future__ import annotations

import functools
import os

__all__ = ["BF16_ENV", "cpu_bf16_native", "cpu_bf16_reason", "use_bf16"]

#: Environment variable that forces the CPU bf16 decision: ``1`` on, ``0`` off.
BF16_ENV = "SLIDECENSUS_CPU_BF16"


@functools.cache
def _native() -> tuple[bool, str]:
    try:
        import torch

        amx = bool(torch.cpu._is_amx_tile_supported())
        avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):  # an old torch: read the CPU flags
        flags = _cpu_flags()
        amx, avx512_bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
    if amx:
        return True, "the CPU has AMX"
    if avx512_bf16:
        return True, "the CPU has AVX-512 BF16"
    return False, "the CPU has neither AMX nor AVX-512 BF16 (bf16 would be emulated, slower)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native() -> bool:
    """Whether bf16 autocast on this CPU is native (AMX or AVX-512 BF16); ``SLIDECENSUS_CPU_BF16``
    set to ``1`` or ``0`` overrides the detection."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _native()[0]


def cpu_bf16_reason() -> str:
    """Why :func:`cpu_bf16_native` says what it says, for the log."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return f"{BF16_ENV}={forced}"
    return _native()[1]


def use_bf16(device_type: str, on_cuda: bool, on_cpu: bool) -> bool:
    """Whether to autocast to bf16 on ``device_type``: ``on_cuda`` on a GPU; on a CPU,
    ``on_cpu`` and only where the CPU runs bf16 natively."""
    if device_type == "cuda":
        return on_cuda
    return on_cpu and cpu_bf16_native()
