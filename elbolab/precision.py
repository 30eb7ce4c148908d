"""Mixed precision: matrix products in bfloat16 (or float16 on a GPU) through autocast, everything numerically
sensitive in float32 or float64.

Where the line is drawn: the networks' linear and convolution layers run in the low precision; the encoder's and the
decoder's outputs are cast to float32 before any distribution is built (``networks.GaussianEncoder``,
``LatentVariableModel.decode``), so log-likelihood sums over pixels, KL terms and log q are float32; the evaluator
accumulates log-sum-exp over importance samples and the ESS in float64; the weights and Adam's state stay float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from elbolab.errors import ElbolabError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision name, refusing one the device cannot run."""
    if precision not in PRECISIONS:
        raise ElbolabError(f"expected --precision in {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ElbolabError("--precision fp16 needs a GPU (float16 autocast is slow and unsupported on the CPU); "
                           "use bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """A context in which matrix products run in ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and
    slower than fp32 (as measured on an Intel Xeon without either: BENCHMARKS.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
