"""The optimiser and the finite-gradients check the training loop uses every step."""

from __future__ import annotations

import torch
from torch.optim import optimizer as torch_optimizer


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


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; a fused Adam goes through ``fused_adam_step`` when that covers it."""
    if not fused_adam_step(optimizer):
        optimizer.step()


def fused_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """One step of a fused ``torch.optim.Adam`` by calling its kernel (``torch._fused_adam_``) directly, on the
    parameters that have gradients: the update ``optimizer.step()`` makes, bit for bit (tested), without
    torch.optim's per-step Python around the kernel (grouping tensors by device and dtype, per-parameter state
    checks, step hooks; its share of a small model's step is in BENCHMARKS.md).

    Returns False, having changed nothing, where it does not apply: another optimiser, a non-fused Adam, amsgrad,
    maximize, capturable, differentiable or decoupled weight decay, a tensor learning rate, step hooks, a parameter
    without optimiser state yet (the first step initialises it), sparse gradients, or tensors on several devices
    or of several dtypes. The caller then calls ``optimizer.step()``.
    """
    kernel = getattr(torch, "_fused_adam_", None)
    if (kernel is None or type(optimizer) is not torch.optim.Adam or not optimizer.defaults.get("fused")
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
            or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)):
        return False
    calls = []
    for group in optimizer.param_groups:
        if (group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable")
                or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor)):
            return False
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = optimizer.state.get(p)
            if not state or grad.is_sparse:
                return False
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            calls.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
    kinds = {(p.device, p.dtype, g.dtype) for _, params, grads, *_ in calls for p, g in zip(params, grads)}
    if len(kinds) > 1:
        return False
    for group, params, grads, exp_avgs, exp_avg_sqs, steps in calls:
        beta1, beta2 = (float(b) for b in group["betas"])
        torch._foreach_add_(steps, 1)
        kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    return True


def adam(params, options: dict) -> torch.optim.Optimizer:
    try:
        # fused Adam: one kernel for all parameters instead of a per-parameter loop (timing in BENCHMARKS.md,
        # from benchmarks/bench_vae_train.py); needs torch >= 2.4 on CPU
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **options)
