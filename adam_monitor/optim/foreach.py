"""The step of many tensors with torch's kernels: its multi-tensor ``_foreach_`` kernels
(``foreach_step_``, any configuration without statistics) and its own fused AdamW kernel
(``torch_fused_step_``, plain Adam). Both compute ``adam_step_`` (``optim/reference.py``) and are
tested against it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adam_monitor._runtime import host_values
from adam_monitor.optim.reference import ATAN2_A, ATAN2_B, NORMALIZE

__all__ = ["TORCH_FUSED_DTYPES", "foreach_step_", "torch_fused_available", "torch_fused_step_"]


def foreach_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    eps_sq: float,
    inv_c1: float,
    inv_sqrt_c2: float,
    update_clip: float | None,
    normalize: str,
    **_: Any,
) -> None:
    """``adam_step_`` (without statistics) on every tensor of the lists with torch's multi-tensor
    ``_foreach_`` kernels, all sharing the step's scalars: a few launches per step whatever the
    number of tensors. The GPU path: there a step's device time is so short that the compiled
    path's fixed cost per call (dynamo guards, one call per few tensors) would dominate it
    (``tests/benchmarks/bench_optim.py --device cuda``). Temporaries: one to three times the
    tensors' size (√v̂, the direction, the clipping ratio): ``Adam`` steps them in runs of at most
    ``FOREACH_CHUNK_NUMEL`` elements (``adam_monitor._runtime``).
    """
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    sqrt_v_hat = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(sqrt_v_hat, inv_sqrt_c2)
    if update_clip is not None:
        # RMS_t² = mean(g²/max(v̂_t, ε²)), from √v̂_t: max(√v̂_t, ε)² = max(v̂_t, ε²)
        floor = torch._foreach_maximum(sqrt_v_hat, eps_sq**0.5)
        ratio = torch._foreach_div(grads, floor)
        del floor
        norms = torch._foreach_norm(ratio)
        del ratio
        numels = host_values([g.numel() for g in grads], norms[0].dtype, grads[0].device)
        rms = torch.stack(norms) / numels.sqrt()
        scales = (update_clip / rms).clamp_max(1.0)  # RMS_t = 0: d/0 = inf → 1
    torch._foreach_mul_(exp_avgs, beta1)
    if normalize == "laprop":
        torch._foreach_add_(sqrt_v_hat, eps)
        normalized = torch._foreach_div(grads, sqrt_v_hat)
        torch._foreach_add_(exp_avgs, normalized, alpha=1 - beta1)
        del normalized
    else:
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    if update_clip is None and normalize != "atan2":
        # without a scale, straight into the params: no temporary for the direction
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        if normalize == "adam":
            torch._foreach_add_(sqrt_v_hat, eps)
            torch._foreach_addcdiv_(params, exp_avgs, sqrt_v_hat, value=-lr * inv_c1)
        else:  # laprop
            torch._foreach_add_(params, exp_avgs, alpha=-lr * inv_c1)
        return None
    if normalize == "adam":
        torch._foreach_add_(sqrt_v_hat, eps)
        update = torch._foreach_div(exp_avgs, sqrt_v_hat)
        torch._foreach_mul_(update, inv_c1)
    elif normalize == "laprop":
        update = torch._foreach_mul(exp_avgs, inv_c1)
    elif normalize == "atan2":
        # no multi-tensor atan2: one kernel per tensor
        momentum = torch._foreach_mul(exp_avgs, inv_c1)
        update = [torch.atan2(m, ATAN2_B * x) for m, x in zip(momentum, sqrt_v_hat)]
        del momentum
        torch._foreach_mul_(update, ATAN2_A)
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    del sqrt_v_hat
    if update_clip is None:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, update, alpha=-lr)
        return None
    # the clipped lr also sets the decay (see adam_step_)
    scale_list = list(scales.to(update[0].dtype).unbind())
    torch._foreach_mul_(update, scale_list)
    torch._foreach_mul_(params, list((1 - lr * weight_decay * scales).to(params[0].dtype).unbind()))
    torch._foreach_add_(params, update, alpha=-lr)
    return None


#: The dtypes torch's fused AdamW kernel steps (``torch_fused_step_``).
TORCH_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def torch_fused_available() -> bool:
    return hasattr(torch, "_fused_adamw_")


def torch_fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    t: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    inv_c1: float,
    **_: Any,
) -> None:
    """``normalize="adam"`` without clipping, β2 schedule or statistics, on torch's own fused
    AdamW kernel (the one ``torch.optim.AdamW(fused=True)`` runs): one pass over the state, on
    the CPU and on CUDA.

    That kernel divides the momentum by ``1 - β1^t``. Without momentum bias correction
    (``inv_c1 = 1``) it gets ``lr·(1 - β1^t)``, which cancels that division, and the weight decay
    ``λ/(1 - β1^t)``, which keeps the decay ``η·λ``: the same step up to rounding (a relative
    1e-16 in float64, tested against the specification). Its v̂ is ``v/(1 - β2^t)``, so a β2
    schedule, whose bias correction is ``1 - Π β2_k``, does not come here.
    """
    bias_correction1 = 1 - beta1**t
    lr_kernel = lr * bias_correction1 * inv_c1  # = lr with momentum bias correction
    decay_kernel = weight_decay * lr / lr_kernel if lr_kernel else weight_decay
    step = host_values([float(t)], torch.float32, params[0].device).reshape(())
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [step] * len(params),
        lr=lr_kernel,
        beta1=beta1,
        beta2=beta2,
        weight_decay=decay_kernel,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
