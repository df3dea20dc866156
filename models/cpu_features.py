"""What this process's CPU can do, read once, for choosing the CPU fast paths (``models.cpu_kernels``).

- ``FLAGS``: the instruction-set flags of ``/proc/cpuinfo`` (Linux; empty elsewhere).
- ``AVX512``: AVX-512 F/BW/VL/DQ (from the flags; elsewhere torch's own dispatch level,
  ``torch.backends.cpu.get_cpu_capability() == "AVX512"``).
- ``NATIVE_BF16``: bfloat16 arithmetic in hardware (``avx512_bf16`` or ``amx_bf16``). Without it
  bfloat16 runs on converted values (oneDNN on AVX-512) or, on AVX2 CPUs, on scalar fallbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("models.cpu")

_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_SHOWN = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def read_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The ``flags`` of the first processor in ``cpuinfo`` (default: ``/proc/cpuinfo``), or empty."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86 / arm64
            return frozenset(value.split())
    return frozenset()


FLAGS = read_flags()
CAPABILITY = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
AVX512 = _AVX512_CORE <= FLAGS if FLAGS else CAPABILITY == "AVX512"
NATIVE_BF16 = any(flag in FLAGS for flag in _BF16_FLAGS)


def describe() -> str:
    """One line for logs and benchmark reports, e.g. ``AVX2 (avx2 fma f16c; no native bf16)``."""
    shown = " ".join(f for f in _SHOWN if f in FLAGS) or "flags unknown"
    return f"{CAPABILITY} ({shown}; {'native' if NATIVE_BF16 else 'no native'} bf16)"


_warned_bf16 = False


def warn_if_bf16_is_emulated(dtype: torch.dtype, device: torch.device) -> bool:
    """Log one warning per process when bfloat16 is asked for on a CPU without native bf16.

    Returns whether this call logged it. There every bfloat16 operation runs on converted values:
    the networks' linears, convolutions and attention products are run as float32 kernels
    (``cpu_kernels.BF16_VIA_FLOAT32``), everything else (the text encoder, Stage A under autocast)
    is several times slower than in float32, which is the CPU default and at least as accurate.
    """
    global _warned_bf16
    if dtype != torch.bfloat16 or device.type != "cpu" or NATIVE_BF16 or _warned_bf16:
        return False
    _warned_bf16 = True
    logger.warning(
        "bfloat16 on a CPU without native bf16 (%s): it is emulated and slower than float32; "
        "use float32 here (dtype auto, CASCADE_DTYPE=auto, picks it on the CPU)",
        describe(),
    )
    return True

