"""The optimiser and the finite-gradients check the training loop uses every step."""

from __future__ import annotations

import torch


def any_nonfinite(tensors: list[torch.Tensor]) -> bool:
    """Whether any tensor holds a NaN or an inf: one fused pass (the kernel torch's GradScaler uses, with a unit
    scale) instead of one norm per tensor (timing in BENCHMARKS.md); norms where that kernel is missing."""
    if not tensors:
        return False
    found = torch.zeros(1, device=tensors[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=found.device))
    except (AttributeError, RuntimeError, NotImplementedError):
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    return bool(found.item())


def adam(params, options: dict) -> torch.optim.Optimizer:
    try:
        # fused Adam: one kernel for all parameters instead of a per-parameter loop (timing in BENCHMARKS.md,
        # from benchmarks/bench_vae_train.py); needs torch >= 2.4 on CPU
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **options)
