"""Reduced-precision matrix products while training: bfloat16 autocast on CPUs that multiply bfloat16 natively.

On a CPU with AVX512-BF16 or AMX, oneDNN multiplies bfloat16 matrices 3-4 times faster than float32 ones, and
the default MLP's step is mostly matrix products. Under :func:`torch.autocast` the weights, gradients and
optimizer state stay float32; only the products (and their inputs) are bfloat16, with float32 sums. This is
the CPU's counterpart of TensorFloat-32 on a GPU (``StreamConfig.tf32``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache

import torch


@cache
def native_bf16_cpu() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX tiles) that torch can use.

    False where torch cannot tell (older torch, other architectures): there bfloat16 would be emulated,
    which is slower than float32.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # noqa: BLE001 - a probe: any failure means "do not use it"
        return False


def training_precision(device: torch.device, cpu_bf16: bool) -> str:
    """``"bf16-mixed"`` where the step's products run in bfloat16 (a CPU, ``cpu_bf16``, native support), else ``"32"``."""
    return "bf16-mixed" if device.type == "cpu" and cpu_bf16 and native_bf16_cpu() else "32"


def autocast(precision: str) -> AbstractContextManager:
    """The forward pass's context for ``precision`` (from :func:`training_precision`)."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()
